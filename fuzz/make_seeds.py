#!/usr/bin/env python3
"""Writes the hand-made seed corpora of husk's fuzz targets.

Each seed is a meaningful input in the target's own encoding (see the
module documentation of each target in fuzz-targets/src/): a guest opening,
using and closing a vsock stream; a FUSE session that looks up, opens,
reads, writes and tries the symlinks leading out of the share; a driver
bringing up a virtio-mmio device; the handshake lines; the shipped shim
configuration; the agent's answers. Run it from anywhere:

    python3 fuzz/make_seeds.py

It rewrites fuzz/corpus/<target>/seed-* and leaves other files (crash
reproducers, named repro-*) alone.
"""

import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def u8(v):
    return struct.pack("<B", v & 0xFF)


def u16(v):
    return struct.pack("<H", v & 0xFFFF)


def u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v):
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def write(target, name, data):
    directory = os.path.join(CORPUS, target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "seed-" + name), "wb") as f:
        f.write(data)


def clear_seeds(target):
    directory = os.path.join(CORPUS, target)
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith("seed-"):
                os.remove(os.path.join(directory, name))


# ---- vsock_packets ---------------------------------------------------------

REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)


def vs_packet(op, guest_port=0, host_pick=0, flags=0, credit=0, honest=1,
              payload=b"", payload_sel=None, shape=0, extra=b""):
    """A structured guest packet (shape bit 0 clear)."""
    out = u8(0) + u8(shape) + u8(guest_port) + u8(host_pick) + u8(op) + u8(flags)
    out += u8(credit) + u8(honest)
    if payload_sel is None:
        payload_sel = 1 if payload else 0
    out += u8(payload_sel)
    if payload_sel == 1:
        out += u8(len(payload)) + payload
    elif payload_sel == 2:
        out += u16(len(payload)) + payload[:512]
    elif payload_sel == 3:
        out += payload[:512]
    return out + extra


def vs_raw(header, payload_sel=0, shape=1, extra=b""):
    """A packet with a raw 44-byte header (shape bit 0 set)."""
    return u8(0) + u8(shape) + header + u8(payload_sel) + extra


def vsock_header(src_cid=3, dst_cid=2, src_port=49152, dst_port=1024, length=0,
                 type_=1, op=REQUEST, flags=0, buf_alloc=256 * 1024, fwd_cnt=0):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length,
                       type_, op, flags, buf_alloc, fwd_cnt)


def host_write(peer=0, length=100, seed=7):
    return u8(4) + u8(peer) + u16(length) + u8(seed)


def host_action(action, peer=0):
    return u8(5) + u8(action) + u8(peer)


def host_connect(guest_port=0, extra=None):
    if extra is None:
        return u8(6) + u8(0) + u8(guest_port)
    return u8(6) + u8(1) + u8(guest_port) + u8(len(extra)) + extra


TICK = u8(8)


def vsock_seeds():
    t = "vsock_packets"
    clear_seeds(t)
    # A guest-initiated stream: REQUEST, data both ways, SHUTDOWN, RST.
    write(t, "guest-stream", b"".join([
        vs_packet(REQUEST),
        vs_packet(RW, payload=b"hello, host", shape=4),
        host_action(0),
        host_write(length=3000),
        TICK,
        vs_packet(CREDIT_UPDATE),
        vs_packet(CREDIT_REQUEST),
        vs_packet(SHUTDOWN, flags=3),
        TICK,
        vs_packet(RST),
    ]))
    # A host-initiated stream: CONNECT, the guest's RESPONSE (to the
    # ephemeral port the device announced), data, the host closes.
    write(t, "host-stream", b"".join([
        host_connect(0, b"early bytes"),
        vs_packet(RESPONSE, host_pick=4),
        vs_packet(RW, host_pick=4, payload=b"from the guest"),
        host_action(0),
        host_write(length=5000),
        TICK,
        host_action(1),
        TICK,
        host_action(3),
        TICK,
        vs_packet(RST, host_pick=4),
    ]))
    # A guest that exceeds its credit: 64 KiB packets past the window.
    write(t, "credit-overrun", vs_packet(REQUEST, host_pick=1) + b"".join(
        vs_packet(RW, host_pick=1, payload=b"x" * 16, payload_sel=3) for _ in range(5)))
    # A host service that writes more than the guest's small credit allows.
    write(t, "small-credit", b"".join([
        u8(0) + u8(0) + u8(0) + u8(0) + u8(REQUEST) + u8(0) + u8(2) + u16(100) + u8(1) + u8(0),
        host_write(length=4000),
        TICK,
        u8(0) + u8(0) + u8(0) + u8(0) + u8(CREDIT_UPDATE) + u8(0) + u8(2) + u16(3000) + u8(1)
        + u8(0),
        TICK,
    ]))
    # Stray packets while rx is withheld, in a burst that fills the backlog.
    write(t, "orphan-burst", b"".join([
        u8(7) + u8(0),
        # shape 0x80: a burst of 1 + 200 * 8 RWs to a port nobody serves.
        u8(0) + u8(0x80) + u8(0) + u8(6) + u8(RW) + u8(0) + u8(0) + u8(1) + u8(1) + u8(1)
        + b"?" + u8(200),
        u8(7) + u8(0),
        TICK,
    ]))
    # Malformed packets: foreign CIDs, SEQPACKET, oversized, truncated,
    # a writable descriptor, split headers, an empty descriptor.
    write(t, "malformed", b"".join([
        vs_raw(vsock_header(src_cid=4)),
        vs_raw(vsock_header(type_=2)),
        vs_raw(vsock_header(op=RW, length=70000)),
        vs_raw(vsock_header(op=RW, length=10), shape=1 | 0x40, extra=u16(20)),
        vs_raw(vsock_header(), shape=1 | 0x20),
        vs_raw(vsock_header(), shape=1 | 0x0C, extra=u16(3) + u16(10) + u16(20) + u16(43)),
        vs_raw(vsock_header(op=9), shape=1 | 0x10),
        vs_raw(vsock_header(op=RW, dst_port=7777, length=4), payload_sel=1,
               extra=u8(4) + b"data"),
    ]))
    # Odd rx buffers: short, readable, split.
    write(t, "odd-rx-buffers", b"".join([
        u8(7) + u8(0),
        u8(7) + u8(1) + u8(10),
        u8(7) + u8(2),
        u8(7) + u8(3) + u8(20),
        u8(7) + u8(4),
        vs_packet(REQUEST),
        u8(7) + u8(0),
        host_write(length=9000),
        TICK,
    ]))
    # A driver reset in the middle of live streams.
    write(t, "reset", b"".join([
        vs_packet(REQUEST),
        host_connect(1),
        host_write(length=10),
        u8(9) + u8(0),
        vs_packet(RW, payload=b"after reset"),
        TICK,
    ]))
    # Malformed host-client lines.
    write(t, "host-lines", b"".join([
        u8(6) + u8(2) + u8(9) + b"HELLO 12\n",
        u8(6) + u8(2) + u8(40) + b"A" * 40,
        u8(6) + u8(2) + u8(6) + b"CONNEC",
        TICK,
    ]))


# ---- fuse_requests ---------------------------------------------------------

FUSE_ALL = [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23,
            24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
            44, 45, 46, 47, 48, 49, 50, 51, 0, 7]
FUSE_NAMES = [b"hello.txt", b"dir", b"nested", b"empty", b"up", b"secret", b"abs", b"..",
              b".", b"new", b"new2", b"dir/nested", b"../sentinel", b"/", b"", b"sentinel"]
(LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME,
 LINK, OPEN, READ, WRITE, STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR,
 REMOVEXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR) = (
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 25, 26,
    27, 28, 29)
CREATE, DESTROY, FALLOCATE, READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE = 35, 38, 43, 44, 45, 46, 47

ROOT, NODE, RAW_NODE = 0, 1, 3
REPLY_4K, REPLY_128K, REPLY_HEADER, REPLY_NONE = 0x40, 0x60, 0x20, 0x00


def fuse(opcode, node=ROOT, node_pick=0, struct_bytes=b"", patches=(), names=(), tail=b"",
         tail_sel=None, reply=REPLY_4K, layout=0, raw_node=None, lie_len=None, creds=None):
    """One request in fuse_requests' encoding.

    patches: (offset, "fh" or "node", pick); names: bytes (a NAMES entry
    or raw).
    """
    out = u8(FUSE_ALL.index(opcode))
    flags = node | reply | (layout << 3)
    if lie_len is not None:
        flags |= 4
    if creds is not None:
        flags |= 0x80
    out += u8(flags)
    if node in (1, 2):
        out += u8(node_pick)
    elif node == 3:
        out += u64(raw_node)
    out += u8(len(struct_bytes)) + struct_bytes
    out += u8(len(patches))
    for offset, kind, pick in patches:
        out += u8(offset // 8) + u8(0 if kind == "fh" else 1) + u8(pick)
    out += u8(len(names))
    for name in names:
        if name in FUSE_NAMES:
            out += u8(FUSE_NAMES.index(name))
        else:
            out += u8(255) + u8(len(name)) + name
    if tail_sel is None:
        tail_sel = 3 if tail else 0
    out += u8(tail_sel) + tail
    if creds is not None:
        out += u32(creds[0]) + u32(creds[1])
    if lie_len is not None:
        out += u32(lie_len)
    if layout == 2:
        out += u16(17)
    elif layout == 3:
        out += u16(5) + u16(44)
    return out


def open_in(flags):
    return u32(flags) + u32(0)


def read_in(offset=0, size=4096):
    return u64(0) + u64(offset) + u32(size) + u32(0) + u64(0) + u32(0) + u32(0)


def write_in(offset=0, size=16):
    return u64(0) + u64(offset) + u32(size) + u32(0) + u64(0) + u32(0) + u32(0)


def setattr_in(valid, size=0, mode=0, uid=0, gid=0):
    return (u32(valid) + u32(0) + u64(0) + u64(size) + u64(0) + u64(0) + u64(0) + u64(0)
            + u32(0) + u32(0) + u32(0) + u32(mode) + u32(0) + u32(uid) + u32(gid) + u32(0))


FH0 = [(0, "fh", 0)]
O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND = 0, 1, 2, 0o100, 0o1000, 0o2000
FATTR_MODE, FATTR_UID, FATTR_SIZE = 1, 2, 8


def fuse_seeds():
    t = "fuse_requests"
    clear_seeds(t)
    setup = u8(0) + u32(0x0400_0000 | 0x1 | 0x20)  # auto cache, INIT with some flags
    write(t, "read-write", setup + b"".join([
        fuse(LOOKUP, names=[b"hello.txt"]),
        fuse(OPEN, node=NODE, struct_bytes=open_in(O_RDWR)),
        fuse(READ, node=NODE, struct_bytes=read_in(), patches=FH0),
        fuse(WRITE, node=NODE, struct_bytes=write_in(size=16), patches=FH0,
             tail=b"written by guest"),
        fuse(FLUSH, node=NODE, struct_bytes=u64(0) + u32(0) + u32(0) + u64(0), patches=FH0),
        fuse(RELEASE, node=NODE, struct_bytes=u64(0) + u32(0) + u32(0) + u64(0), patches=FH0),
        fuse(GETATTR, node=NODE, struct_bytes=u32(0) + u32(0) + u64(0)),
        fuse(FORGET, node=NODE, struct_bytes=u64(1), reply=REPLY_NONE),
    ]))
    write(t, "directories", setup + b"".join([
        fuse(OPENDIR, struct_bytes=open_in(0)),
        fuse(READDIR, struct_bytes=read_in(size=4096), patches=FH0),
        fuse(READDIRPLUS, struct_bytes=read_in(size=8192), patches=FH0, reply=REPLY_128K),
        fuse(MKDIR, struct_bytes=u32(0o755) + u32(0o022), names=[b"new"]),
        fuse(LOOKUP, names=[b"dir"]),
        fuse(RENAME, struct_bytes=u64(1), names=[b"new", b"new2"]),
        fuse(RMDIR, names=[b"new2"]),
        fuse(UNLINK, node=NODE, names=[b"nested"]),
        fuse(STATFS),
        fuse(RELEASEDIR, struct_bytes=u64(0) + u32(0) + u32(0) + u64(0), patches=FH0),
    ]))
    # Everything a guest might try to leave the share with.
    write(t, "escapes", setup + b"".join([
        fuse(LOOKUP, names=[b".."]),
        fuse(LOOKUP, names=[b"up"]),
        fuse(READLINK, node=NODE),
        fuse(OPEN, node=NODE, struct_bytes=open_in(O_RDWR)),
        fuse(OPENDIR, node=NODE, struct_bytes=open_in(0)),
        fuse(LOOKUP, names=[b"secret"]),
        fuse(OPEN, node=NODE, node_pick=1, struct_bytes=open_in(O_WRONLY | O_TRUNC)),
        fuse(SETATTR, node=NODE, node_pick=1, struct_bytes=setattr_in(FATTR_SIZE)),
        fuse(SETATTR, node=NODE, node_pick=1, struct_bytes=setattr_in(FATTR_MODE, mode=0o777)),
        fuse(LINK, struct_bytes=u64(0), patches=[(0, "node", 1)], names=[b"hard"]),
        fuse(LOOKUP, names=[b"abs"]),
        fuse(SETXATTR, node=NODE, node_pick=2, struct_bytes=u32(3) + u32(0),
             names=[b"user.escape"], tail=b"abc", tail_sel=3),
        fuse(LOOKUP, names=[b"../sentinel"]),
        fuse(LOOKUP, names=[b"dir/nested"]),
        fuse(SYMLINK, names=[b"etc", b"/etc"]),
        fuse(OPEN, node=NODE, node_pick=3, struct_bytes=open_in(O_RDONLY)),
        fuse(RENAME2, struct_bytes=u64(1) + u32(2) + u32(0), names=[b"dir", b"up"]),
    ]))
    write(t, "create-and-grow", setup + b"".join([
        fuse(CREATE, struct_bytes=u32(O_RDWR | O_CREAT) + u32(0o644) + u32(0o022) + u32(0),
             names=[b"new"]),
        fuse(WRITE, node=NODE, struct_bytes=write_in(offset=1 << 40, size=16), patches=FH0,
             tail=b"far far away...."),
        fuse(FALLOCATE, node=NODE, struct_bytes=u64(0) + u64(0) + u64(1 << 36) + u32(0) + u32(0),
             patches=FH0),
        fuse(LSEEK, node=NODE, struct_bytes=u64(0) + u64(0) + u32(3) + u32(0), patches=FH0),
        fuse(COPY_FILE_RANGE, node=NODE,
             struct_bytes=u64(0) + u64(0) + u64(1) + u64(0) + u64(0) + u64(4096) + u64(0),
             patches=FH0 + [(16, "node", 0)]),
        fuse(FSYNC, node=NODE, struct_bytes=u64(0) + u32(0) + u32(0), patches=FH0),
        fuse(SETATTR, node=NODE, struct_bytes=setattr_in(FATTR_UID, uid=1000)),
    ]))
    write(t, "device-nodes", setup + b"".join([
        fuse(MKNOD, struct_bytes=u32(0o60644) + u32(0x800) + u32(0) + u32(0), names=[b"sda"]),
        fuse(MKNOD, struct_bytes=u32(0o20644) + u32(0x103) + u32(0) + u32(0), names=[b"null"]),
        fuse(MKNOD, struct_bytes=u32(0o20000) + u32(0) + u32(0) + u32(0), names=[b"whiteout"]),
        fuse(MKNOD, struct_bytes=u32(0o10644) + u32(0) + u32(0) + u32(0), names=[b"fifo"]),
        fuse(MKNOD, struct_bytes=u32(0o140644) + u32(0) + u32(0) + u32(0), names=[b"sock"]),
    ]))
    write(t, "xattrs", setup + b"".join([
        fuse(SETXATTR, struct_bytes=u32(5) + u32(0), names=[b"user.test"], tail=b"value",
             tail_sel=3),
        fuse(GETXATTR, struct_bytes=u32(64) + u32(0), names=[b"user.test"]),
        fuse(LISTXATTR, struct_bytes=u32(4096) + u32(0)),
        fuse(REMOVEXATTR, names=[b"user.test"]),
        fuse(SETXATTR, struct_bytes=u32(5) + u32(0), names=[b"trusted.x"], tail=b"value",
             tail_sel=3),
    ]))
    # No INIT first, then INIT twice, DESTROY, and a request after.
    write(t, "sessions", u8(8) + b"".join([
        fuse(LOOKUP, names=[b"hello.txt"]),
        fuse(INIT, struct_bytes=u32(7) + u32(31) + u32(0) + u32(0)),
        fuse(LOOKUP, names=[b"hello.txt"]),
        fuse(INIT, struct_bytes=u32(7) + u32(38) + u32(0) + u32(0xffffffff)),
        fuse(DESTROY),
        fuse(GETATTR, node=NODE, struct_bytes=u32(0) + u32(0) + u64(0)),
    ]))
    # Lies: header lengths, odd opcodes, node ids, credentials, layouts.
    write(t, "lies", u8(3) + u32(0) + b"".join([
        fuse(LOOKUP, names=[b"hello.txt"], lie_len=0xFFFFFFFF),
        fuse(LOOKUP, names=[b"hello.txt"], lie_len=12),
        fuse(GETATTR, node=RAW_NODE, raw_node=0xDEADBEEF),
        fuse(0, reply=REPLY_HEADER),
        fuse(7),
        fuse(LOOKUP, names=[b"hello.txt"], layout=2),
        fuse(LOOKUP, names=[b"dir"], layout=3, creds=(1000, 1000)),
        fuse(MKDIR, struct_bytes=u32(0o777) + u32(0), names=[b"new"], creds=(1000, 1000)),
        fuse(READ, struct_bytes=read_in(size=1 << 20), reply=REPLY_128K),
        fuse(LOOKUP, names=[b"x" * 60], reply=REPLY_NONE),
    ]))


# ---- mmio_registers --------------------------------------------------------

MMIO_REGS = [0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038,
             0x044, 0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4,
             0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC, 0x0C0, 0x0FC, 0x100, 0x104]


def mmio_write(reg, value):
    return u8(0) + u8(MMIO_REGS.index(reg)) + u8(2) + u32(value)


def mmio_read(reg):
    return u8(3) + u8(MMIO_REGS.index(reg))


def mmio_status(step):
    return u8(7) + u8(step)


def mmio_queue(index, size_pick, base):
    return u8(6) + u8(index) + u8(size_pick) + u16(base >> 4)


def mmio_mem(addr, data):
    return u8(5) + u32(addr) + u8(len(data)) + data


def ring_with_one_chain(base, size):
    """A descriptor table at base with one two-descriptor chain, and the
    avail ring (after the table) offering it."""
    desc = struct.pack("<QIHH", 0x8000, 64, 1, 1) + struct.pack("<QIHH", 0x9000, 32, 2, 0)
    avail = struct.pack("<HHH", 0, 1, 0)
    return mmio_mem(base, desc) + mmio_mem(base + 16 * size, avail)


def mmio_bring_up(kind, offered, queues):
    out = u8(kind) + u64(offered)
    out += mmio_status(0) + mmio_status(1) + mmio_status(2)
    out += mmio_read(0x070)
    for index, base in enumerate(queues):
        out += ring_with_one_chain(base, 16)
        out += mmio_queue(index, 2, base)
    out += mmio_status(3)
    out += mmio_read(0x060) + mmio_write(0x064, 1) + mmio_write(0x050, 0)
    out += mmio_read(0x100) + mmio_read(0x104)
    return out


def mmio_seeds():
    t = "mmio_registers"
    clear_seeds(t)
    write(t, "walker-bring-up", mmio_bring_up(0, 1 << 29, [0x1000, 0x10000, 0x20000]))
    write(t, "walker-reset", mmio_bring_up(0, 0, [0x1000, 0x10000]) + mmio_status(4)
          + mmio_read(0x070) + mmio_bring_up(0, 0, [0x30000])[9:])
    write(t, "vsock-bring-up", mmio_bring_up(6, 0, [0x1000, 0x10000, 0x20000]) + mmio_status(4))
    write(t, "fs-bring-up", mmio_bring_up(7, 0, [0x1000, 0x10000]) + mmio_status(4))
    # Negotiation the transport must refuse: unoffered bits, no VERSION_1.
    write(t, "bad-features", u8(0) + u64(1 << 3) + b"".join([
        mmio_status(1),
        mmio_write(0x024, 0), mmio_write(0x020, 1 << 5),
        mmio_write(0x024, 1), mmio_write(0x020, 1),
        mmio_write(0x070, 11), mmio_read(0x070),
        mmio_write(0x024, 0), mmio_write(0x020, 1 << 3),
        mmio_write(0x024, 1), mmio_write(0x020, 0),
        mmio_write(0x070, 11), mmio_read(0x070),
        mmio_write(0x024, 7), mmio_write(0x020, 0xFFFFFFFF),
        mmio_write(0x014, 5), mmio_read(0x010),
    ]))
    # Queues the transport must not activate: unaligned, out of memory,
    # a size that is no power of two, an unknown queue index.
    write(t, "bad-queues", u8(0) + u64(0) + b"".join([
        mmio_status(2),
        mmio_queue(0, 4, 0xFFF0),
        mmio_queue(1, 6, 0x100),
        mmio_queue(3, 3, 0x2000),
        mmio_write(0x030, 9), mmio_read(0x034), mmio_write(0x044, 1),
        mmio_write(0x080, 0xFFFFFFFF), mmio_write(0x084, 0xFFFFFFFF),
        mmio_status(3), mmio_read(0x070),
    ]))
    # Accesses of the wrong width and to unknown offsets.
    write(t, "widths", u8(0) + u64(0) + b"".join([
        u8(4) + u8(MMIO_REGS.index(0x070)) + u8(0) + u8(0),
        u8(4) + u8(MMIO_REGS.index(0x070)) + u8(1) + u8(1) + b"\x0f",
        u8(4) + u8(MMIO_REGS.index(0x030)) + u8(3) + u8(1) + b"\x01\x00\x00\x00\x00\x00\x00\x00",
        u8(3) + u8(255) + u16(0x1F8),
        u8(0) + u8(255) + u16(0x0C4) + u8(2) + u32(7),
    ]))


# ---- hybrid_vsock_connect --------------------------------------------------

def hybrid_seeds():
    t = "hybrid_vsock_connect"
    clear_seeds(t)
    lines = {
        "connect": b"CONNECT 1024\n",
        "connect-early-data": b"CONNECT 1024\nearly bytes for the guest",
        "connect-crlf": b"CONNECT 52\r\n",
        "connect-spaces": b"CONNECT  7 \n",
        "connect-max-port": b"CONNECT 4294967295\n",
        "connect-port-overflow": b"CONNECT 4294967296\n",
        "connect-not-a-number": b"CONNECT abc\n",
        "connect-partial": b"CONNECT 10",
        "overlong": b"A" * 40,
        "other-verb": b"HELLO 1024\n",
        "ok": b"OK 1073741824\n",
        "ok-then-data": b"OK 1073741824\nguest data",
        "ok-unterminated": b"OK 12",
        "failed": b"FAILED no listener\n",
        "ok-long": b"OK 1" + b" " * 70 + b"\n",
    }
    for name, data in lines.items():
        write(t, name, data)


# ---- shim_config -----------------------------------------------------------

def shim_config_seeds():
    t = "shim_config"
    clear_seeds(t)
    shipped = os.path.join(HERE, "..", "shim", "configuration.toml")
    with open(shipped, "rb") as f:
        write(t, "shipped", f.read())
    write(t, "annotations", b"""log_level = "debug"
#!vcpus=2
#!memory=512
[hypervisor]
kind = "qemu"
default_vcpus = 1
default_memory_mib = 256
[limits]
max_vcpus = 4
min_memory_mib = 64
max_memory_mib = 1024
""")
    write(t, "annotations-out-of-range", b"""#!vcpus=10000
#!memory= 18446744073709551616
[limits]
max_vcpus = 2
""")
    write(t, "invalid", b"""[hypervisor]
kind = "firecracker"
unknown_key = 1
[shared_fs]
cache = "sometimes"
""")
    write(t, "limits-inverted", b"""[limits]
min_memory_mib = 4096
max_memory_mib = 64
""")
    write(t, "timeouts", b"""[timeouts]
agent_ready_ms = 18446744073709551615
shutdown_ms = 0
[shared_fs]
cache = "never"
xattr = false
""")
    # runtimeoptions.v1.Options: type_url (1) and config_path (2).
    path = b"/etc/husk/configuration.toml"
    write(t, "runtime-options", b"\x0a\x03url\x12" + bytes([len(path)]) + path + b"\x18\x01")


# ---- agent_responses -------------------------------------------------------

def varint(v):
    out = b""
    v &= 0xFFFFFFFFFFFFFFFF
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field_varint(n, v):
    return varint(n << 3) + varint(v)


def field_bytes(n, data):
    return varint(n << 3 | 2) + varint(len(data)) + data


def ttrpc_response(payload=b"", code=None, message=b""):
    out = b""
    if code is not None:
        out += field_bytes(1, field_varint(1, code) + field_bytes(2, message))
    return out + field_bytes(2, payload)


def frame(stream_id, body, type_=2, flags=0):
    return struct.pack(">IIBB", len(body), stream_id, type_, flags) + body


AGENT_METHODS = {
    0: ("check", field_varint(1, 1)),
    1: ("start", field_varint(1, 4242)),
    2: ("processes", field_bytes(1, field_varint(1, 1) + field_bytes(2, b"sh"))
        + field_bytes(1, field_varint(1, 77) + field_bytes(2, b"sleep 10"))),
    3: ("stats", field_bytes(1, field_varint(1, 5000) + field_varint(2, 3000)
                             + field_varint(3, 2000) + field_varint(4, 1) + field_varint(5, 9))
        + field_bytes(2, field_varint(1, 4096) + field_varint(2, 1 << 30) + field_varint(6, 1))
        + field_bytes(3, field_varint(1, 3) + field_varint(2, 100))
        + field_bytes(4, field_varint(1, 512) + field_varint(2, 1024))),
    4: ("exec", field_varint(1, 4243)),
    5: ("wait", field_varint(1, (-1) & 0xFFFFFFFFFFFFFFFF) + field_varint(2, (-1) & 0xFFFFFFFFFFFFFFFF)),
    6: ("events", field_bytes(1, field_varint(1, 7) + field_bytes(3, field_bytes(1, b"c1")))
        + field_bytes(1, field_varint(1, 9) + field_bytes(2, field_bytes(1, b"c1")
                                                       + field_varint(4, 137)))),
    7: ("details", field_bytes(1, b"6.12.0-husk") + field_varint(2, 1 << 28) + field_varint(3, 2)
        + field_bytes(4, b"0.1.0")),
    8: ("log", field_bytes(1, b"agent log line\n") + field_varint(2, 15)),
    9: ("empty", b""),
}


def agent_seeds():
    t = "agent_responses"
    clear_seeds(t)
    for method, (name, payload) in AGENT_METHODS.items():
        write(t, "decode-" + name, u8(method) + payload)
        write(t, "wire-" + name, u8(0x10 | method) + ttrpc_response(payload))
    write(t, "wire-error-not-found", u8(0x10 | 1) + ttrpc_response(code=5, message=b"no such"))
    write(t, "wire-garbage-payload", u8(0x10 | 3) + ttrpc_response(b"\xff\xff\xff"))
    write(t, "decode-wait-min", u8(5) + field_varint(2, 1 << 63))
    # Raw frames: the right stream id (3: the call after Check), a wrong
    # one, a request type, an oversized length, a truncated body.
    good = ttrpc_response(AGENT_METHODS[1][1])
    write(t, "raw-good", u8(0x30 | 1) + frame(3, good))
    write(t, "raw-wrong-stream", u8(0x30 | 1) + frame(5, good) + frame(3, good))
    write(t, "raw-request-type", u8(0x30 | 1) + frame(3, good, type_=1))
    write(t, "raw-data-frame", u8(0x30 | 1) + frame(3, good, type_=3, flags=1))
    write(t, "raw-oversized", u8(0x30 | 1) + struct.pack(">IIBB", 5 << 20, 3, 2, 0) + good)
    write(t, "raw-truncated", u8(0x30 | 1) + frame(3, good)[:-2])


def main():
    vsock_seeds()
    fuse_seeds()
    mmio_seeds()
    hybrid_seeds()
    shim_config_seeds()
    agent_seeds()
    total = 0
    for target in sorted(os.listdir(CORPUS)):
        files = os.listdir(os.path.join(CORPUS, target))
        size = sum(os.path.getsize(os.path.join(CORPUS, target, f)) for f in files)
        total += size
        print(f"{target}: {len(files)} files, {size} bytes")
    print(f"total {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
