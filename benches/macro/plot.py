#!/usr/bin/env python3
"""Draws the macro benchmarks' results as SVG bar charts (stdlib only).

  plot.py [RESULTS_DIR]   reads lazy-start*.json and flows*.json, writes *.svg beside them
"""
import html
import json
import pathlib
import sys


def bars(title, unit, rows, path):
    """Horizontal bars: rows = [(label, value, highlight)]."""
    width, left, bar_h, gap, top = 760, 330, 22, 8, 44
    height = top + len(rows) * (bar_h + gap) + 30
    vmax = max(v for _, v, _ in rows) or 1
    scale = (width - left - 90) / vmax
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="12" y="26" font-size="15" font-weight="bold">{html.escape(title)}</text>',
    ]
    for i, (label, value, hot) in enumerate(rows):
        y = top + i * (bar_h + gap)
        w = max(1, value * scale)
        color = "#2b7bb9" if hot else "#9aa5b1"
        out.append(f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">{html.escape(label)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
        out.append(f'<text x="{left + w + 6:.1f}" y="{y + 16}">{value:.2f} {unit}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")


def main():
    d = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "results")
    for f in sorted(d.glob("lazy-start*.json")):
        r = json.loads(f.read_text())
        m = r["median_seconds"]
        net = r.get("network", "loopback")
        bars(
            f"time to a running `import numpy` ({net}; {f.stem})",
            "s",
            [
                ("clip v2 mount, empty cache", m["clip_cold_start"], True),
                ("clip v2 mount + prefetch profile", m["clip_cold_start_prefetch"], True),
                ("skopeo copy + umoci unpack + run", m["old_pipeline"], False),
                ("run on an unpacked local copy", m["native_cold_import"], False),
            ],
            f.with_suffix(".svg"),
        )
    for f in sorted(d.glob("flows*.json")):
        r = json.loads(f.read_text())
        m = r["median_seconds"]
        net = r.get("network", "loopback")
        bars(
            f"worker flows, Debian + numpy ({net}; {f.stem})",
            "s",
            [
                ("pull, clipVersion 2", m["pull_v2"], True),
                ("pull, clipVersion 1", m["pull_v1"], False),
                ("skopeo copy + umoci unpack", m["skopeo_umoci"], False),
                ("build, clipVersion 2", m["build_v2"], True),
                ("build, clipVersion 1", m["build_v1"], False),
                ("clip extract (v1)", m["clip_extract"], True),
                ("tar -x", m["tar_x"], False),
            ],
            f.with_suffix(".svg"),
        )


if __name__ == "__main__":
    main()
