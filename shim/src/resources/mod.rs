//! Host resources the shim manages for a pod while its VM runs.
//!
//! [`SharedDirectory`]: the per-container rootfs directories in the pod's
//! share, added and removed on the host while the guest reads the share
//! over virtio-fs.

mod shared_dir;

pub use shared_dir::{SharedDirError, SharedDirectory};
