//! `containerd-shim-kata-v2`: the containerd shim v2 for runtime type
//! `io.containerd.kata.v2`. One shim process per pod holds the pod's microVM
//! (see `../shared/ARCHITECTURE.md`). The task service is not built yet; the
//! binary says so and fails rather than pretending to serve containerd.

fn main() {
    eprintln!(
        "containerd-shim-kata-v2 (husk {}): the task service is not built yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(1);
}
