//! virtio-net (VIRTIO 1.2 §5.1).
