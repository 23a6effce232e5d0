//! The helpers husk's test suites share, once each: the host tier
//! (`agent/tests`, `runtime/tests`), the guest tier and the e2e tier
//! (`tests/`), and the benches.
//!
//! | module | concern |
//! | --- | --- |
//! | [`artifacts`] | the workspace, the cargo target dir, the guest kernel, the static guest programs, the product and test initramfs, busybox, the host's kernel release |
//! | [`bundle`] | busybox rootfs trees, container specs, process JSON |
//! | [`stdio`] | the host ends of a process's stdio streams, reads with timeouts |
//! | [`agent`] | the agent's CreateContainer and ExecProcess with their streams opened |
//! | [`form`] | the `husk-test-form:` line a suite announces its form with |
//! | [`mounts`] | the mount points below a directory |
//! | [`host`] | the processes and sockets on the host, for leak checks |
//! | [`tempdir`] | one test-directory type |
//! | [`virtqueue`] | the driver's half of a split virtqueue, for device-model tests |

pub mod agent;
pub mod artifacts;
pub mod bundle;
pub mod form;
pub mod host;
pub mod mounts;
pub mod stdio;
pub mod tempdir;
pub mod virtqueue;
