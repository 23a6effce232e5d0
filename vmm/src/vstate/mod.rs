//! KVM state of one microVM: the VM (guest memory slots, irqchip, PIT) and
//! its vCPUs (one host thread each).

pub mod vcpu;
pub mod vm;
