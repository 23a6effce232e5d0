//! virtio-fs: a host directory shared into the guest, served in-process by
//! fuse-backend-rs's passthrough file system.
//!
//! | module | concern |
//! | --- | --- |
//! | `model` | the device model ([`FsDeviceModel`]): descriptor chains to FUSE requests and replies, for any transport |
//! | `filesystem` | the passthrough file system plus the INIT flags, MKNOD and xattr policies the protocol layer leaves to us |
//! | `limits` | the accounts of inodes and handles the guest holds, against the share's limits |
//! | `xattr` | where guest xattr names live on the host under [`XattrPolicy::Mapped`] |
//! | `config` | the share's configuration ([`FsConfig`]) and its validation |
//! | `mmio` | [`VirtioFs`], the [`VirtioDevice`](crate::VirtioDevice) adapter for virtio-mmio: one worker thread per queue, woken by the queue's ioeventfd |
//! | `vhost_user` | the vhost-user backend and [`serve_vhost_user`], which serves the model to an external VMM (QEMU's `vhost-user-fs-device`) from a thread of the caller |

mod config;
mod filesystem;
mod limits;
mod mmio;
mod model;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
mod vhost_user;
mod xattr;

use std::path::PathBuf;

use crate::vhost_user::ServerError;

pub use config::{
    CachePolicy, ConfigError, FsConfig, XattrPolicy, DEFAULT_MAX_OPEN_HANDLES,
    DEFAULT_MAX_OPEN_INODES,
};
pub use mmio::VirtioFs;
pub use model::FsDeviceModel;
pub use vhost_user::{serve_vhost_user, VhostUserServer};
pub use xattr::{GUEST_NAMESPACE_PREFIX, RESERVED_PREFIX};

/// Why a virtio-fs device or server could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// fuse-backend-rs could not set up the passthrough file system.
    #[error("cannot set up the passthrough file system for {path}: {source}")]
    Passthrough {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An eventfd or epoll instance for the worker threads could not be made.
    #[error("cannot create the {what} for the virtio-fs workers: {source}")]
    EventSetup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A worker thread could not be spawned.
    #[error("cannot spawn virtio-fs thread {name}: {source}")]
    SpawnThread {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// The vhost-user daemon could not be created.
    #[error("cannot create the vhost-user-fs daemon for {socket}: {reason}")]
    VhostUserDaemon { socket: PathBuf, reason: String },
    /// The vhost-user server could not start, or its session failed.
    #[error(transparent)]
    VhostUserServer(#[from] ServerError),
}
