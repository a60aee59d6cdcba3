//! The driver side of a virtio-net device: TX and RX rings of each queue pair, frames in and
//! out in bursts (to be written).
