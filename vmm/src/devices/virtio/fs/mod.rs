//! virtio-fs served in-process by fuse-backend-rs. (Being written.)
