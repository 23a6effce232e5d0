//! `containerd-shim-kata-v2`: the containerd shim v2 for runtime type
//! `io.containerd.kata.v2`. One shim process per pod holds the pod's
//! microVM (see `docs/architecture.md`).

use husk_shim::lifecycle::{shim_config, HuskShim};

/// The runtime id containerd knows this shim by.
const RUNTIME_ID: &str = "io.containerd.kata.v2";

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<HuskShim>(RUNTIME_ID, Some(shim_config())).await;
}
