//! Shared helpers for husk's integration and end-to-end suites: locating
//! built artifacts (guest kernel, initramfs, binaries) and reporting which
//! form of a test ran and why.
