//! The husk shim as a library: the lifecycle actions, the task service
//! over the pod model, the pod's sandbox behind the hypervisor seam, the
//! host resources of containers, stdio plumbing, events and the
//! configuration. `docs/architecture.md` draws the whole.

pub mod boot_phases;
pub mod config;
pub mod debug_console;
pub mod events;
pub mod fault;
pub mod hypervisor;
pub mod ids;
pub mod lifecycle;
pub mod logging;
pub mod management;
pub mod metrics;
pub mod network;
pub mod options;
pub mod paths;
pub mod pod;
pub mod random;
pub mod resources;
pub mod sandbox;
pub mod spec;
pub mod stdio;
pub mod task;

#[cfg(test)]
mod testing;
