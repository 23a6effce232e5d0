#!/usr/bin/env python3
"""Packs the husk guest initramfs: a gzip-compressed newc cpio archive with
the static husk-agent as /init and the few nodes the kernel needs before
init runs (/dev/console for init's stdio).

The archive is reproducible: entries are written in a fixed order with fixed
owners, inode numbers and timestamps, and gzip records no name or time, so
the same agent binary always gives the same bytes.

Usage: mkinitramfs.py AGENT_BINARY OUTPUT.cpio.gz [--busybox PATH] [--add SRC:DEST[:MODE]]...

--busybox installs a static busybox as /bin/busybox with /bin/sh and the
other applets as symlinks (test and debug images only; the product image
holds the agent alone). --add copies one host file into the image.
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


# Applets linked into /bin when --busybox is given.
BUSYBOX_APPLETS = [
    "sh", "ash", "cat", "cp", "mv", "rm", "ln", "ls", "mkdir", "rmdir", "mount",
    "umount", "echo", "test", "[", "sha256sum", "md5sum", "dd", "head", "tail",
    "wc", "stat", "time", "chmod", "chown", "touch", "sync", "sleep", "uname", "grep",
    "sed", "awk", "find", "xargs", "seq", "true", "false", "env", "id", "ps",
    "kill", "unshare", "hostname", "readlink", "realpath", "cut", "tr", "sort", "uniq",
    "printf", "expr", "date", "cmp", "diff", "tee", "mktemp", "basename", "dirname",
]


def read_elf(path, what):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        sys.exit(f"mkinitramfs: {what} {path} is not an ELF binary")
    return data


def build(agent_path, busybox=None, extra_files=()):
    agent = read_elf(agent_path, "the agent binary")
    archive = b""
    inode = 1
    directories = list(DIRECTORIES)
    if busybox:
        directories.append("bin")
    for _, dest, _ in extra_files:
        parts = dest.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in directories:
                directories.append(d)
    for directory in directories:
        archive += newc_entry(inode, directory, stat.S_IFDIR | 0o755, nlink=2)
        inode += 1
    if busybox:
        archive += newc_entry(inode, "bin/busybox", stat.S_IFREG | 0o755, data=read_elf(busybox, "busybox"))
        inode += 1
        for applet in BUSYBOX_APPLETS:
            archive += newc_entry(inode, f"bin/{applet}", stat.S_IFLNK | 0o777, data=b"busybox")
            inode += 1
    for src, dest, mode in extra_files:
        with open(src, "rb") as f:
            archive += newc_entry(inode, dest.strip("/"), stat.S_IFREG | mode, data=f.read())
        inode += 1
    for path, mode, major, minor in CHAR_DEVICES:
        archive += newc_entry(inode, path, stat.S_IFCHR | mode, rdev=(major, minor))
        inode += 1
    archive += newc_entry(inode, "init", stat.S_IFREG | 0o755, data=agent)
    archive += newc_entry(0, "TRAILER!!!", 0)
    archive += b"\0" * (-len(archive) % 512)
    return archive


def main():
    args = sys.argv[1:]
    positional, busybox, extra = [], None, []
    while args:
        arg = args.pop(0)
        if arg == "--busybox" and args:
            busybox = args.pop(0)
        elif arg == "--add" and args:
            spec = args.pop(0).split(":")
            if len(spec) not in (2, 3) or not spec[1].startswith("/"):
                sys.exit(f"mkinitramfs: --add wants SRC:/DEST[:OCTAL_MODE], got {':'.join(spec)}")
            mode = int(spec[2], 8) if len(spec) == 3 else 0o755
            extra.append((spec[0], spec[1], mode))
        else:
            positional.append(arg)
    if len(positional) != 2:
        sys.exit("usage: mkinitramfs.py AGENT_BINARY OUTPUT.cpio.gz [--busybox PATH] [--add SRC:DEST[:MODE]]...")
    agent_path, output = positional
    if not os.path.isfile(agent_path):
        sys.exit(f"mkinitramfs: the agent binary {agent_path} does not exist (build it first: make build)")
    for src, _, _ in extra:
        if not os.path.isfile(src):
            sys.exit(f"mkinitramfs: --add source {src} does not exist")
    archive = build(agent_path, busybox, extra)
    tmp = output + ".tmp"
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(archive)
    os.replace(tmp, output)
    print(f"initramfs: {output} ({os.path.getsize(output)} bytes, agent {os.path.getsize(agent_path)} bytes)")


if __name__ == "__main__":
    main()
