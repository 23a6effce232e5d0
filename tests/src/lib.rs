//! husk's own integration and end-to-end machinery, on top of the shared
//! helpers in `husk-test-support`: [`guest`] boots one sandbox VM through
//! the shim's own sandbox code and tears it down, checking that nothing is
//! left on the host; [`containerd`] runs a private containerd for the e2e
//! tier, the demo and the bench; [`cri`] and [`cri_stream`] are kubelet's
//! side of CRI and of its streaming server; [`bench`] what the benches
//! share.

pub mod bench;
pub mod containerd;
pub mod cri;
pub mod cri_stream;
pub mod guest;
