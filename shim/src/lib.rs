//! The husk shim as a library: configuration today; the task service, the
//! sandbox lifecycle, stdio plumbing and events build on it.

pub mod config;
