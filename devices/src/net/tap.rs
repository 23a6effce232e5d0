//! The host side of the card: a TAP interface, and the seam the model
//! reaches it through.
//!
//! [`Tap::open`] creates the interface (or attaches to an existing,
//! persistent one) in the calling thread's network namespace, with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte virtio-net header and a
//! non-blocking fd. It also probes which offloads the TUN driver accepts
//! (`TUNSETOFFLOAD` refuses bits it does not know, which is how the
//! kernel's own documentation says to test for them) and leaves them all
//! off, so nothing reaches a guest that has not negotiated it.
//!
//! The model never names [`Tap`]: it works on a [`FrameDevice`], a packet
//! fd where one `read` returns one frame after its virtio-net header and
//! one `writev` sends one, plus the offload switch. The unit tests stand a
//! datagram socket pair in for the TAP through it.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use super::{NetError, VNET_HDR_LEN};

/// The TUN/TAP control device (Documentation/networking/tuntap.rst).
const TUN_DEVICE: &CStr = c"/dev/net/tun";
/// Flags the device needs from TUNSETIFF: Ethernet frames, no packet-info
/// prefix, a virtio-net header in front of every frame.
const TAP_FLAGS: [(libc::c_int, &str); 3] = [
    (libc::IFF_TAP, "IFF_TAP"),
    (libc::IFF_NO_PI, "IFF_NO_PI"),
    (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
];

/// Offloads a TAP can take for frames it hands to its reader (the guest's
/// receive side). Frames written to a TAP with a virtio-net header may ask
/// for the same offloads whatever is set here; the kernel completes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapOffloads {
    /// Frames with a partial checksum (`TUN_F_CSUM`).
    pub csum: bool,
    /// TCP-over-IPv4 segmentation offload (`TUN_F_TSO4`, needs `csum`).
    pub tso4: bool,
    /// TCP-over-IPv6 segmentation offload (`TUN_F_TSO6`, needs `csum`).
    pub tso6: bool,
}

impl TapOffloads {
    /// No offload: every frame complete and checksummed.
    pub const NONE: Self = Self {
        csum: false,
        tso4: false,
        tso6: false,
    };

    /// The `TUN_F_*` bits for TUNSETOFFLOAD. The kernel ignores TSO
    /// without CSUM, so TSO is only asked for with it.
    pub(crate) fn tun_flags(self) -> libc::c_uint {
        let mut flags = 0;
        if self.csum {
            flags |= libc::TUN_F_CSUM;
            if self.tso4 {
                flags |= libc::TUN_F_TSO4;
            }
            if self.tso6 {
                flags |= libc::TUN_F_TSO6;
            }
        }
        flags
    }

    /// What both `self` and `other` allow.
    pub(crate) fn intersect(self, other: Self) -> Self {
        Self {
            csum: self.csum && other.csum,
            tso4: self.tso4 && other.tso4,
            tso6: self.tso6 && other.tso6,
        }
    }
}

/// What the model needs of the host side of the card.
pub(crate) trait FrameDevice: Send + Sync {
    /// The interface's name, for logs and thread names.
    fn name(&self) -> &str;
    /// A non-blocking packet fd: one `read` returns one frame preceded by
    /// its [`VNET_HDR_LEN`]-byte header, one `writev` sends one.
    fn frame_fd(&self) -> BorrowedFd<'_>;
    /// The offloads [`Self::set_offloads`] can turn on.
    fn supported_offloads(&self) -> TapOffloads;
    /// Turns the receive-side offloads to exactly `offloads`.
    fn set_offloads(&self, offloads: TapOffloads) -> io::Result<()>;
}

/// An open TAP interface: the fd that carries its frames, and its name.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    supported: TapOffloads,
    /// The `TUN_F_*` bits last set, so an unchanged set costs no ioctl (a
    /// guest that takes no offload never makes the device thread issue
    /// one); `u32::MAX` before the first.
    applied: AtomicU32,
}

impl Tap {
    /// Creates (or attaches to) TAP interface `name` in the calling
    /// thread's network namespace: `/dev/net/tun`, TUNSETIFF with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking, TUNSETVNETHDRSZ
    /// 12 (`virtio_net_hdr_v1`). Probes the offloads the driver accepts,
    /// then turns them all off. Needs CAP_NET_ADMIN in that namespace (or
    /// a persistent TAP the caller owns); the fd works from any thread
    /// afterwards, whatever its namespace.
    pub fn open(name: &str) -> Result<Tap, NetError> {
        validate_name(name)?;
        // SAFETY: a NUL-terminated literal path; the result is checked.
        let raw = unsafe {
            libc::open(
                TUN_DEVICE.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(NetError::OpenTun {
                path: "/dev/net/tun",
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` was just opened here and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut tap = Tap {
            fd,
            name: name.to_owned(),
            supported: TapOffloads::NONE,
            applied: AtomicU32::new(u32::MAX),
        };
        tap.check_driver_features()?;
        tap.set_iff()?;
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at a live local.
        let ret = unsafe { libc::ioctl(tap.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_len) };
        if ret < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        tap.supported = tap.probe_offloads();
        tap.set_offloads(TapOffloads::NONE)
            .map_err(|source| NetError::TapIoctl {
                name: tap.name.clone(),
                request: "TUNSETOFFLOAD",
                source,
            })?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offloads this TAP accepts, probed by [`Self::open`]; they
    /// decide which virtio-net offload features the device offers.
    pub fn supported_offloads(&self) -> TapOffloads {
        self.supported
    }

    fn ioctl_error(&self, request: &'static str) -> NetError {
        NetError::TapIoctl {
            name: self.name.clone(),
            request,
            source: io::Error::last_os_error(),
        }
    }

    /// Refuses a kernel whose TUN driver lacks a flag we need (TUNSETIFF
    /// would silently ignore some of them).
    fn check_driver_features(&self) -> Result<(), NetError> {
        let mut features: libc::c_uint = 0;
        // SAFETY: TUNGETFEATURES writes one unsigned int through the
        // pointer, which points at a live local.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNGETFEATURES, &mut features) };
        if ret < 0 {
            return Err(self.ioctl_error("TUNGETFEATURES"));
        }
        for (flag, feature) in TAP_FLAGS {
            if features & flag as libc::c_uint == 0 {
                return Err(NetError::TapUnsupported {
                    name: self.name.clone(),
                    feature,
                });
            }
        }
        Ok(())
    }

    fn set_iff(&self) -> Result<(), NetError> {
        // SAFETY: ifreq is plain data (a name and a union of integers and
        // addresses); all zeros is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        // validate_name checked the length, so the name and its NUL fit.
        for (slot, byte) in request.ifr_name.iter_mut().zip(self.name.bytes()) {
            *slot = byte as libc::c_char;
        }
        let flags = TAP_FLAGS.iter().fold(0, |flags, (flag, _)| flags | flag);
        request.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq through the pointer,
        // which points at a live local.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if ret < 0 {
            return Err(self.ioctl_error("TUNSETIFF"));
        }
        Ok(())
    }

    /// Tries each offload set on its own; the driver refuses (EINVAL) the
    /// bits it does not implement.
    fn probe_offloads(&self) -> TapOffloads {
        let accepts = |offloads: TapOffloads| self.set_offloads(offloads).is_ok();
        let csum = accepts(TapOffloads {
            csum: true,
            ..TapOffloads::NONE
        });
        let with_csum = |tso4, tso6| TapOffloads {
            csum: true,
            tso4,
            tso6,
        };
        TapOffloads {
            csum,
            tso4: csum && accepts(with_csum(true, false)),
            tso6: csum && accepts(with_csum(false, true)),
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl FrameDevice for Tap {
    fn name(&self) -> &str {
        &self.name
    }

    fn frame_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn supported_offloads(&self) -> TapOffloads {
        self.supported
    }

    fn set_offloads(&self, offloads: TapOffloads) -> io::Result<()> {
        let flags = offloads.tun_flags();
        if self.applied.load(Ordering::Relaxed) == flags {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // involved.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            // Unknown now: the next call tries again whatever it asks.
            self.applied.store(u32::MAX, Ordering::Relaxed);
            return Err(io::Error::last_os_error());
        }
        self.applied.store(flags, Ordering::Relaxed);
        Ok(())
    }
}

/// The kernel's rules for an interface name (`dev_valid_name`), plus no
/// `%`: TUNSETIFF would treat it as a template and pick a name itself.
fn validate_name(name: &str) -> Result<(), NetError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() >= libc::IFNAMSIZ {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("it is . or ..")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == b'%' || b == 0 || b.is_ascii_whitespace())
    {
        Some("it contains '/', ':', '%', whitespace or NUL")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetError::InvalidTapName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_the_kernel_would_refuse_are_refused_before_any_syscall() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "tap%d",
            "a b",
            "sixteen-bytes-xx",
        ] {
            assert!(
                matches!(validate_name(bad), Err(NetError::InvalidTapName { .. })),
                "{bad:?} accepted"
            );
        }
        for good in ["tap0", "husk-0123456789", "eth0.1"] {
            assert!(validate_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn tso_is_only_asked_for_with_checksum_offload() {
        let tso_only = TapOffloads {
            csum: false,
            tso4: true,
            tso6: true,
        };
        assert_eq!(tso_only.tun_flags(), 0);
        let all = TapOffloads {
            csum: true,
            tso4: true,
            tso6: true,
        };
        assert_eq!(
            all.tun_flags(),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        assert_eq!(
            all.intersect(TapOffloads {
                csum: true,
                ..TapOffloads::NONE
            }),
            TapOffloads {
                csum: true,
                ..TapOffloads::NONE
            }
        );
    }
}
