//! virtio-vsock with a hybrid (AF_UNIX) host side. (Being written.)
