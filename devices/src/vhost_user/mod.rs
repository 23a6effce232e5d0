//! The vhost-user transport's shared part: one server that every device
//! model uses to serve an external VMM's frontend (QEMU's
//! `vhost-user-*-device`) from a thread of this process.
//!
//! Each device supplies its `VhostUserBackend` and says, through
//! [`Sessions`], how it serves frontends; [`serve`] runs the server and the
//! returned [`Server`] stops it. [`connections`] finds the connection the
//! daemon accepted, which is how a stop reaches a connected frontend.
//! [`relay`] sits between a frontend and its daemon for devices whose
//! frontend sends `SET_VRING_ENABLE` before the features that allow it
//! (QEMU's virtio-net), answering those early requests itself.

mod connections;
mod relay;
mod server;

use connections::{accepted_connections, FdDirectory};
pub use server::{serve, Confinement, Server, ServerError, Sessions};
