//! virtio-fs: a host directory shared into the guest, served in-process by
//! fuse-backend-rs's passthrough file system.
//!
//! The device model ([`device::FsDeviceModel`]) turns descriptor chains into
//! FUSE requests and replies and knows nothing about transports; it serves
//! them with [`filesystem::SharedFs`], the passthrough file system plus the
//! INIT flags and MKNOD policy the protocol layer leaves to us. Two
//! adapters carry it: [`mmio::VirtioFs`] implements [`super::VirtioDevice`]
//! for the built-in VMM (one worker thread per queue, woken by the queue's
//! ioeventfd), and [`vhost_user::serve_vhost_user`] serves it to an external
//! VMM (QEMU's `vhost-user-fs-device`) from a shim thread. [`config`] holds
//! the share's configuration and its validation.

pub mod config;
pub mod device;
pub mod filesystem;
pub mod mmio;
pub mod vhost_user;

use std::path::PathBuf;

pub use config::{CachePolicy, ConfigError, FsConfig};
pub use device::FsDeviceModel;
pub use mmio::VirtioFs;
pub use vhost_user::{serve_vhost_user, VhostUserFsBackend, VhostUserServer};

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
    /// The vhost-user socket could not be bound.
    #[error("cannot listen on vhost-user socket {socket}: {reason}")]
    VhostUserListen { socket: PathBuf, reason: String },
    /// The vhost-user session ended with an error.
    #[error("vhost-user-fs session on {socket} failed: {reason}")]
    VhostUserSession { socket: PathBuf, reason: String },
    /// The vhost-user server thread panicked.
    #[error("the vhost-user-fs server thread for {socket} panicked")]
    ServerPanicked { socket: PathBuf },
}
