#!/usr/bin/env python3
"""Splits a Debian root filesystem that has more packages than a base tree into layer file lists.

usage: layers.py BASE FULL OUTDIR PKG[,PKG...]

Every path of FULL that is new or changed relative to BASE (type, size, mode, owner, mtime or
symlink target differ; directories only when new) goes to OUTDIR/top.list when a package in
PKG owns it (per FULL's /var/lib/dpkg/info/PKG[:arch].list), else to OUTDIR/mid.list. The lists
hold ./relative paths for `tar --no-recursion -T`. Nothing is deleted between the trees (apt
installs only add), so no whiteouts are needed.
"""
import os
import stat
import sys


def owned(full, pkgs):
    paths = set()
    info = os.path.join(full, "var/lib/dpkg/info")
    for name in os.listdir(info):
        if name.endswith(".list") and name[:-5].split(":")[0] in pkgs:
            with open(os.path.join(info, name), encoding="utf-8", errors="surrogateescape") as f:
                paths.update(line.rstrip("\n").lstrip("/") for line in f if line.strip() not in ("", "/."))
    return paths


def changed(base, full, rel):
    try:
        b = os.lstat(os.path.join(base, rel))
    except FileNotFoundError:
        return True
    f = os.lstat(os.path.join(full, rel))
    if stat.S_IFMT(b.st_mode) != stat.S_IFMT(f.st_mode):
        return True
    if stat.S_ISDIR(f.st_mode):
        return False
    if (b.st_mode, b.st_uid, b.st_gid, b.st_size, int(b.st_mtime)) != (f.st_mode, f.st_uid, f.st_gid, f.st_size, int(f.st_mtime)):
        return True
    if stat.S_ISLNK(f.st_mode):
        return os.readlink(os.path.join(base, rel)) != os.readlink(os.path.join(full, rel))
    return False


def main():
    base, full, out, pkgs = sys.argv[1], sys.argv[2], sys.argv[3], set(sys.argv[4].split(","))
    top_paths = owned(full, pkgs)
    top, mid = [], []
    for dirpath, dirnames, filenames in os.walk(full):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), full)
            if changed(base, full, rel):
                (top if rel in top_paths else mid).append("./" + rel)
    for name, paths in (("top.list", top), ("mid.list", mid)):
        with open(os.path.join(out, name), "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("".join(p + "\n" for p in paths))
    print(f"{len(mid)} paths in mid.list, {len(top)} in top.list", file=sys.stderr)


main()
