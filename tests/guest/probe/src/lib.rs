//! Shared by the guest-side probe (`husk-guest-probe`, built static and
//! packed into test initramfs images) and the host side of guest-tier tests:
//! the deterministic data both sides generate, the checksum both sides
//! compute, and the guest's AF_VSOCK streams.
//!
//! Both sides must agree byte for byte, so the generator and the digest
//! live here once instead of in each test.

pub mod digest;
pub mod pattern;
#[cfg(target_os = "linux")]
pub mod vsock;
