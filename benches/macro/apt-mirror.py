#!/usr/bin/env python3
"""Prints the Debian mirror apt uses for bookworm main: the same rule as clip-testkit's
debian::mirror_in (only sources.list, *.list and *.sources files; deb lines, enabled stanzas,
no security archive); deb.debian.org if none."""
import glob
import os
import re

ETC = os.environ.get("APT_ETC", "/etc/apt")


def one_line(text):
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
        if m:
            yield m.group(2), [m.group(3)], m.group(4).split()


def deb822(text):
    for stanza in re.split(r"\n\s*\n", text):
        fields, last = {}, None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and last:
                fields[last] += " " + line.strip()
            elif ":" in line:
                k, v = line.split(":", 1)
                last = k.strip().lower()
                fields[last] = v.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        for uri in fields.get("uris", "").split():
            yield uri, fields.get("suites", "").split(), fields.get("components", "").split()


sources = []
if os.path.exists(f"{ETC}/sources.list"):
    sources += one_line(open(f"{ETC}/sources.list").read())
for f in sorted(glob.glob(f"{ETC}/sources.list.d/*")):
    name = os.path.basename(f)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        continue
    if name.endswith(".list"):
        sources += one_line(open(f).read())
    elif name.endswith(".sources"):
        sources += deb822(open(f).read())
for uri, suites, comps in sources:
    if "bookworm" in suites and "main" in comps and "security" not in uri:
        print(uri.rstrip("/"))
        break
else:
    print("http://deb.debian.org/debian")
