//! Shared helpers for husk's integration and end-to-end suites: locating
//! built artifacts (guest kernel, initramfs, binaries) and reporting which
//! form of a test ran and why.
//!
//! [`artifacts`] finds the guest kernel and builds the static agent and the
//! product initramfs; [`guest`] boots one sandbox VM (QEMU with our vsock
//! and virtio-fs device models over vhost-user) and tears it down, checking
//! that nothing is left on the host; [`container`] builds busybox rootfs
//! trees, OCI specs and the host ends of a process's stdio streams;
//! [`containerd`] runs a private containerd for the e2e tier, the demo and
//! the bench.

pub mod artifacts;
pub mod container;
pub mod containerd;
pub mod guest;
