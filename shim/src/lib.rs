//! The husk shim as a library: the lifecycle actions, the task service, the
//! pod's sandbox (VM, agent, share), the host resources it manages, stdio
//! plumbing, events and the configuration.

pub mod cleanup;
pub mod config;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod options;
pub mod paths;
pub mod process;
pub mod resources;
pub mod rootfs;
pub mod sandbox;
pub mod spec;
pub mod stdio;
pub mod task;
pub mod vm;
