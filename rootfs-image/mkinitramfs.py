#!/usr/bin/env python3
"""Packs the husk guest initramfs: a gzip-compressed newc cpio archive with
the static husk-agent as /init and the few nodes the kernel needs before
init runs (/dev/console for init's stdio).

The archive is reproducible: entries are written in a fixed order with fixed
owners, inode numbers and timestamps, and gzip records no name or time, so
the same agent binary always gives the same bytes.

Usage: mkinitramfs.py AGENT_BINARY OUTPUT.cpio.gz
"""
import gzip
import os
import stat
import sys

# Timestamps in the archive: the epoch, unless SOURCE_DATE_EPOCH says otherwise.
MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))

DIRECTORIES = ["dev", "proc", "sys", "run", "tmp", "etc", "mnt"]
# (path, mode, major, minor): character devices init needs before devtmpfs.
CHAR_DEVICES = [("dev/console", 0o600, 5, 1), ("dev/null", 0o666, 1, 3)]


def newc_entry(inode, name, mode, data=b"", rdev=(0, 0), nlink=1):
    """One newc header + name + data, each padded to 4 bytes."""
    name_bytes = name.encode() + b"\0"
    fields = [
        inode, mode, 0, 0, nlink, MTIME, len(data),
        0, 0,                      # device of the entry itself
        rdev[0], rdev[1],          # device it represents
        len(name_bytes), 0,        # name size, checksum (unused by newc)
    ]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    entry = header + name_bytes
    entry += b"\0" * (-len(entry) % 4)
    entry += data
    entry += b"\0" * (-len(entry) % 4)
    return entry


def build(agent_path):
    with open(agent_path, "rb") as f:
        agent = f.read()
    if agent[:4] != b"\x7fELF":
        sys.exit(f"mkinitramfs: {agent_path} is not an ELF binary")
    archive = b""
    inode = 1
    for directory in DIRECTORIES:
        archive += newc_entry(inode, directory, stat.S_IFDIR | 0o755, nlink=2)
        inode += 1
    for path, mode, major, minor in CHAR_DEVICES:
        archive += newc_entry(inode, path, stat.S_IFCHR | mode, rdev=(major, minor))
        inode += 1
    archive += newc_entry(inode, "init", stat.S_IFREG | 0o755, data=agent)
    archive += newc_entry(0, "TRAILER!!!", 0)
    archive += b"\0" * (-len(archive) % 512)
    return archive


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    agent_path, output = sys.argv[1], sys.argv[2]
    if not os.path.isfile(agent_path):
        sys.exit(f"mkinitramfs: the agent binary {agent_path} does not exist (build it first: make build)")
    archive = build(agent_path)
    tmp = output + ".tmp"
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(archive)
    os.replace(tmp, output)
    print(f"initramfs: {output} ({os.path.getsize(output)} bytes, agent {os.path.getsize(agent_path)} bytes)")


if __name__ == "__main__":
    main()
