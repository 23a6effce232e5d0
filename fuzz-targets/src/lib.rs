//! The bodies of husk's fuzz targets, one public function per target, each
//! taking the raw fuzz input: every parser of guest (or host-peer) input is
//! fed through its real entry point and checked by an oracle that panics.
//!
//! The crate builds on stable as a member of the main workspace; the
//! cargo-fuzz binaries in `fuzz/fuzz_targets/` are one-line wrappers, and
//! `tests/corpus_replay.rs` replays every committed corpus file through the
//! same functions in `make test`. See `fuzz/README.md`.
//!
//! | target | what it feeds |
//! | --- | --- |
//! | [`vsock_packets`] | guest tx packets and host socket activity to the vsock device model |
//! | [`fuse_requests`] | FUSE requests to the virtio-fs device model over a fresh share |
//! | [`mmio_registers`] | register reads and writes to the virtio-mmio transport |
//! | [`hybrid_vsock_connect`] | both ends of the `CONNECT <port>\n` / `OK <port>\n` handshake |
//! | [`shim_config`] | the shim's TOML configuration, pod annotations, runtime options |
//! | [`agent_responses`] | agent API answers, decoded and over the ttrpc wire |

pub mod agent_responses;
pub mod fuse_requests;
pub mod hybrid_vsock_connect;
pub mod input;
pub mod mmio_registers;
pub mod shim_config;
pub mod vsock_guest;
pub mod vsock_packets;

pub use agent_responses::agent_responses;
pub use fuse_requests::fuse_requests;
pub use hybrid_vsock_connect::hybrid_vsock_connect;
pub use mmio_registers::mmio_registers;
pub use shim_config::shim_config;
pub use vsock_packets::vsock_packets;

/// A target's body: it takes one input and panics when its oracle fails.
pub type TargetFn = fn(&[u8]);

/// Every target by the name of its corpus directory and cargo-fuzz binary.
pub const TARGETS: [(&str, TargetFn); 6] = [
    ("vsock_packets", vsock_packets),
    ("fuse_requests", fuse_requests),
    ("mmio_registers", mmio_registers),
    ("hybrid_vsock_connect", hybrid_vsock_connect),
    ("shim_config", shim_config),
    ("agent_responses", agent_responses),
];

/// A directory of this process, `husk-<name>-<pid>-<n>` in the temporary
/// directory, removed when the process exits: libFuzzer ends with `exit`,
/// which runs no destructors, so the removal is an `atexit` handler.
pub fn process_dir(name: &str) -> std::path::PathBuf {
    use std::sync::{Mutex, Once};
    static DIRS: Mutex<Vec<husk_test_support::tempdir::TestDir>> = Mutex::new(Vec::new());
    static AT_EXIT: Once = Once::new();
    extern "C" fn remove_dirs() {
        if let Ok(mut dirs) = DIRS.lock() {
            dirs.clear();
        }
    }
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain function with no arguments; it only
        // drops the directories recorded above.
        unsafe { libc::atexit(remove_dirs) };
    });
    let dir = husk_test_support::tempdir::TestDir::new(name)
        .unwrap_or_else(|e| panic!("cannot create a {name} directory: {e}"));
    let path = dir.path().to_owned();
    DIRS.lock().unwrap_or_else(|p| p.into_inner()).push(dir);
    path
}
