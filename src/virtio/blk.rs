//! virtio-blk (VIRTIO 1.2 §5.2): feature bits, request header, request types, status codes,
//! config layout.
