//! The `qemu` hypervisor backend. (Being written.)
