//! husk's low-level OCI runtime: creates namespaced containers from OCI
//! bundles. The guest agent uses it for every container, and a thin
//! runc-compatible CLI over it (`husk-runc`) is tested against runc.
//!
//! Entry points: [`ContainerBuilder`] creates a container from a bundle
//! (the init then waits for `start`, as the OCI lifecycle wants), and
//! [`Container`] loads an existing one to start, exec into, signal, pause,
//! resume, inspect or delete it. Each concern has its own module: spec
//! validation, namespaces, rootfs and mounts, devices, capabilities, process
//! setup, seccomp, cgroups, hooks, state, and the console socket.

pub mod capabilities;
pub mod cgroups;
pub mod console;
pub mod container;
pub mod error;
pub mod hooks;
pub mod namespaces;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod signals;
pub mod spec;
pub mod state;
pub mod sync;

pub use container::{Container, ContainerBuilder, ExecOptions};
pub use error::{Error, Result};
pub use state::Status;

/// Where containers' state lives when no `--root` is given.
pub const DEFAULT_STATE_ROOT: &str = "/run/husk-runc";
