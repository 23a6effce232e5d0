//! The vsock wire format and access to the descriptor chains that carry it.
//!
//! A packet is `struct virtio_vsock_hdr` (virtio 1.2, 5.10.6: 44 bytes,
//! little endian) followed by `len` payload bytes. The driver may split the
//! header and payload over any number of descriptors, so a chain is flattened
//! into a list of guest-memory [`Segment`]s and the header is read or written
//! through that list. Payload bytes never pass through an intermediate
//! buffer: [`TxPayload::write_to`] hands the guest pages to one vectored
//! `sendmsg(2)` and
//! [`RxBuffer::read_payload_from`] lets `readv(2)` fill them directly.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemory};

/// Size of `struct virtio_vsock_hdr` (virtio 1.2, 5.10.6).
pub const HDR_LEN: usize = 44;
/// `VIRTIO_VSOCK_TYPE_STREAM` (virtio 1.2, 5.10.6).
pub const TYPE_STREAM: u16 = 1;
/// `VIRTIO_VSOCK_TYPE_SEQPACKET` (virtio 1.2, 5.10.6); not offered by us,
/// so only the tests send it.
#[cfg(test)]
pub const TYPE_SEQPACKET: u16 = 2;

/// Packet operations, `VIRTIO_VSOCK_OP_*` (virtio 1.2, 5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data (virtio 1.2, 5.10.6.4).
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data (virtio 1.2, 5.10.6.4).
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Largest payload we accept in one tx packet or put in one rx packet:
/// Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE` (64 KiB), the most its driver
/// ever sends in one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// At most this many iovecs go to one `readv`/`sendmsg`; a longer chain is
/// moved in several calls. Linux uses one or two descriptors per packet.
const MAX_IOVECS: usize = 16;

/// One `struct virtio_vsock_hdr`, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Decodes the little-endian wire layout.
    pub fn decode(bytes: &[u8; HDR_LEN]) -> Self {
        // The sub-slices below have constant, in-bounds ranges, so the
        // array conversions cannot fail.
        let u64_at =
            |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        let u32_at =
            |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
        let u16_at =
            |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap_or_default());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes into the little-endian wire layout.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut out = [0u8; HDR_LEN];
        out[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        out[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..30].copy_from_slice(&self.type_.to_le_bytes());
        out[30..32].copy_from_slice(&self.op.to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        out
    }
}

/// A contiguous run of guest memory named by one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: usize,
}

/// Why a descriptor chain does not hold a usable packet or buffer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// A tx chain contained a device-writable descriptor.
    #[error("tx descriptor chain {head} has a device-writable descriptor")]
    WritableInTx { head: u16 },
    /// An rx chain contained a device-readable descriptor.
    #[error("rx descriptor chain {head} has a device-readable descriptor")]
    ReadableInRx { head: u16 },
    /// The chain is shorter than a header.
    #[error("descriptor chain {head} holds {len} bytes, less than the {HDR_LEN}-byte header")]
    HeaderTruncated { head: u16, len: usize },
    /// The header announces more payload than any packet may carry.
    #[error("descriptor chain {head} announces a {len}-byte payload, more than {MAX_PKT_PAYLOAD}")]
    PayloadTooLarge { head: u16, len: u32 },
    /// The header announces more payload than the chain holds.
    #[error("descriptor chain {head} announces {len} payload bytes but holds {available}")]
    PayloadTruncated {
        head: u16,
        len: u32,
        available: usize,
    },
    /// A descriptor points outside guest memory.
    #[error("descriptor chain {head} points outside guest memory at {addr:#x} (+{len})")]
    BadAddress { head: u16, addr: u64, len: usize },
}

/// Flattens the device-readable (`want_writable == false`) or device-writable
/// part of a chain into `segments`; fails on a descriptor of the other kind.
fn collect_segments<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    want_writable: bool,
    segments: &mut Vec<Segment>,
) -> Result<usize, PacketError> {
    let head = chain.head_index();
    segments.clear();
    let mut total = 0usize;
    for desc in chain {
        if desc.is_write_only() != want_writable {
            return Err(if want_writable {
                PacketError::ReadableInRx { head }
            } else {
                PacketError::WritableInTx { head }
            });
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), len) {
            return Err(PacketError::BadAddress {
                head,
                addr: desc.addr().0,
                len,
            });
        }
        segments.push(Segment {
            addr: desc.addr(),
            len,
        });
        total += len;
    }
    Ok(total)
}

/// Copies `dst.len()` bytes starting `offset` bytes into `segments`.
fn read_bytes<M: GuestMemory>(
    mem: &M,
    segments: &[Segment],
    offset: usize,
    dst: &mut [u8],
) -> bool {
    let mut done = 0;
    for (seg, skip) in segments_from(segments, offset) {
        if done == dst.len() {
            break;
        }
        let n = (seg.len - skip).min(dst.len() - done);
        let Some(addr) = seg.addr.0.checked_add(skip as u64) else {
            return false;
        };
        if vm_memory::Bytes::read_slice(mem, &mut dst[done..done + n], GuestAddress(addr)).is_err()
        {
            return false;
        }
        done += n;
    }
    done == dst.len()
}

/// Copies `src` to `offset` bytes into `segments`.
fn write_bytes<M: GuestMemory>(mem: &M, segments: &[Segment], offset: usize, src: &[u8]) -> bool {
    let mut done = 0;
    for (seg, skip) in segments_from(segments, offset) {
        if done == src.len() {
            break;
        }
        let n = (seg.len - skip).min(src.len() - done);
        let Some(addr) = seg.addr.0.checked_add(skip as u64) else {
            return false;
        };
        if vm_memory::Bytes::write_slice(mem, &src[done..done + n], GuestAddress(addr)).is_err() {
            return false;
        }
        done += n;
    }
    done == src.len()
}

/// The segments from byte `offset` on, each with how much of its start to skip.
fn segments_from(
    segments: &[Segment],
    mut offset: usize,
) -> impl Iterator<Item = (&Segment, usize)> {
    segments.iter().filter_map(move |seg| {
        if offset >= seg.len {
            offset -= seg.len;
            None
        } else {
            let skip = offset;
            offset = 0;
            Some((seg, skip))
        }
    })
}

/// Builds iovecs over up to `max_len` bytes of `segments` starting at
/// `offset`. Returns the number of iovecs filled.
fn build_iovecs<M: GuestMemory>(
    mem: &M,
    segments: &[Segment],
    offset: usize,
    max_len: usize,
    iovecs: &mut [libc::iovec; MAX_IOVECS],
) -> io::Result<usize> {
    let mut count = 0;
    let mut remaining = max_len;
    'outer: for (seg, skip) in segments_from(segments, offset) {
        if remaining == 0 {
            break;
        }
        let want = (seg.len - skip).min(remaining);
        let start = GuestAddress(seg.addr.0 + skip as u64);
        // A descriptor may straddle two memory regions: get_slices splits it.
        for slice in mem.get_slices(start, want) {
            if count == MAX_IOVECS {
                break 'outer;
            }
            let slice = slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            iovecs[count] = libc::iovec {
                // The pointer stays valid after the guard is gone because the
                // region is mapped for as long as `mem` is borrowed, which
                // outlives the system call our caller makes.
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            };
            count += 1;
            remaining -= slice.len();
        }
    }
    Ok(count)
}

/// Marks `len` bytes from `offset` dirty in the memory's bitmap (for live
/// migration through vhost-user's dirty log; a no-op without a bitmap).
fn mark_dirty<M: GuestMemory>(mem: &M, segments: &[Segment], offset: usize, len: usize) {
    let mut remaining = len;
    for (seg, skip) in segments_from(segments, offset) {
        if remaining == 0 {
            break;
        }
        let n = (seg.len - skip).min(remaining);
        for slice in mem
            .get_slices(GuestAddress(seg.addr.0 + skip as u64), n)
            .flatten()
        {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        remaining -= n;
    }
}

/// Parses a driver-to-device chain. `segments` is scratch space reused
/// across packets; on success it holds the chain's segments and the payload
/// starts [`HDR_LEN`] bytes in.
pub fn parse_tx<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    segments: &mut Vec<Segment>,
) -> Result<PacketHeader, PacketError> {
    let head = chain.head_index();
    let total = collect_segments(mem, chain, false, segments)?;
    if total < HDR_LEN {
        return Err(PacketError::HeaderTruncated { head, len: total });
    }
    let mut raw = [0u8; HDR_LEN];
    if !read_bytes(mem, segments, 0, &mut raw) {
        return Err(PacketError::HeaderTruncated { head, len: total });
    }
    let header = PacketHeader::decode(&raw);
    if header.len as usize > MAX_PKT_PAYLOAD {
        return Err(PacketError::PayloadTooLarge {
            head,
            len: header.len,
        });
    }
    // Only RW carries data; other ops have len 0 by the spec, and a driver
    // that says otherwise is ignored for those bytes.
    let available = total - HDR_LEN;
    if header.op == op::RW && header.len as usize > available {
        return Err(PacketError::PayloadTruncated {
            head,
            len: header.len,
            available,
        });
    }
    Ok(header)
}

/// The payload of a parsed tx packet, still in guest memory.
pub struct TxPayload<'a, M> {
    mem: &'a M,
    segments: &'a [Segment],
    len: usize,
}

impl<'a, M: GuestMemory> TxPayload<'a, M> {
    /// The payload of the packet parsed into `segments`, `len` bytes long.
    pub fn new(mem: &'a M, segments: &'a [Segment], len: usize) -> Self {
        Self { mem, segments, len }
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Writes payload bytes from `skip` on to the socket `fd` with one
    /// vectored `sendmsg`.
    /// Returns how many bytes the kernel took.
    pub fn write_to(&self, fd: BorrowedFd<'_>, skip: usize) -> io::Result<usize> {
        if skip >= self.len {
            return Ok(0);
        }
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVECS];
        let count = build_iovecs(
            self.mem,
            self.segments,
            HDR_LEN + skip,
            self.len - skip,
            &mut iovecs,
        )?;
        loop {
            // sendmsg rather than writev: MSG_NOSIGNAL turns a vanished peer
            // into EPIPE instead of a process-killing SIGPIPE.
            // SAFETY: msghdr is plain data; all-zero is valid.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iovecs.as_mut_ptr();
            msg.msg_iovlen = count as _;
            // SAFETY: the iovecs point into mapped guest memory borrowed for
            // this call (see build_iovecs); sendmsg only reads them.
            let ret = unsafe {
                libc::sendmsg(
                    fd.as_raw_fd(),
                    &msg,
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if ret >= 0 {
                return Ok(ret as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Appends payload bytes from `skip` on to `out`.
    pub fn copy_to_vec(&self, skip: usize, out: &mut Vec<u8>) -> bool {
        if skip >= self.len {
            return true;
        }
        let start = out.len();
        out.resize(start + self.len - skip, 0);
        read_bytes(self.mem, self.segments, HDR_LEN + skip, &mut out[start..])
    }
}

/// A device-writable rx chain, ready to receive one packet.
pub struct RxBuffer<'a, M> {
    mem: &'a M,
    segments: &'a [Segment],
    capacity: usize,
}

/// Parses a device-to-driver chain into `segments` (scratch reused across
/// buffers). Returns the total writable size, header included.
pub fn parse_rx<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    segments: &mut Vec<Segment>,
) -> Result<usize, PacketError> {
    let head = chain.head_index();
    let total = collect_segments(mem, chain, true, segments)?;
    if total < HDR_LEN {
        return Err(PacketError::HeaderTruncated { head, len: total });
    }
    Ok(total)
}

impl<'a, M: GuestMemory> RxBuffer<'a, M> {
    /// A buffer over the segments [`parse_rx`] produced (`total` bytes).
    pub fn new(mem: &'a M, segments: &'a [Segment], total: usize) -> Self {
        Self {
            mem,
            segments,
            capacity: total.saturating_sub(HDR_LEN),
        }
    }

    /// How many payload bytes fit after the header.
    pub fn payload_capacity(&self) -> usize {
        self.capacity.min(MAX_PKT_PAYLOAD)
    }

    /// Writes the header; returns false if guest memory refused it.
    pub fn write_header(&self, header: &PacketHeader) -> bool {
        write_bytes(self.mem, self.segments, 0, &header.encode())
    }

    /// Reads at most `max` bytes from `fd` straight into the payload area
    /// with one `readv`. `Ok(0)` is end of stream.
    pub fn read_payload_from(&self, fd: BorrowedFd<'_>, max: usize) -> io::Result<usize> {
        let max = max.min(self.payload_capacity());
        if max == 0 {
            return Ok(0);
        }
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVECS];
        let count = build_iovecs(self.mem, self.segments, HDR_LEN, max, &mut iovecs)?;
        let read = loop {
            // SAFETY: the iovecs point into mapped guest memory borrowed for
            // this call and lie inside descriptors the driver made
            // device-writable (see build_iovecs).
            let ret = unsafe { libc::readv(fd.as_raw_fd(), iovecs.as_ptr(), count as libc::c_int) };
            if ret >= 0 {
                break ret as usize;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        };
        mark_dirty(self.mem, self.segments, HDR_LEN, read);
        Ok(read)
    }
}

/// Reads the payload of an rx buffer back (for the tests).
#[cfg(test)]
pub fn read_segments<M: GuestMemory>(
    mem: &M,
    segments: &[Segment],
    offset: usize,
    dst: &mut [u8],
) -> bool {
    read_bytes(mem, segments, offset, dst)
}
