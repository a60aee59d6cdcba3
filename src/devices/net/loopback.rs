//! The loopback net device: every frame the driver transmits comes back on the receive queue of
//! the same pair with its Ethernet source and destination swapped. Frames that find no RX
//! buffer are dropped and counted. A self-contained peer for tests and benchmarks.

use std::cell::RefCell;

use super::{check_tx, copy_out, deliver, Delivery, NetCore, NetOptions, NetPort};
use crate::backend::Rings;
use crate::protocol::ProtocolFeatures;
use crate::virtio::net::{self as vnet, NetHeader};
use crate::virtqueue::{AnyDeviceQueue, ChainBatch, VirtqueueError};

thread_local! {
    /// One frame's bounce buffer per worker thread (a 64 KiB GSO frame and its header).
    static FRAME: RefCell<Vec<u8>> = RefCell::new(vec![0u8; vnet::HDR_LEN + vnet::MAX_FRAME_LEN]);
}

/// The loopback device.
#[derive(Debug)]
pub struct Loopback {
    core: NetCore,
}

impl Loopback {
    /// A loopback device with `options` (offloads are never offered: frames come back as sent).
    pub fn new(mut options: NetOptions) -> Loopback {
        options.offloads = false;
        Loopback { core: NetCore::new(options) }
    }

    /// The shared net state (counters, config, negotiated features).
    pub fn core(&self) -> &NetCore {
        &self.core
    }

    /// TX chains of `pair`: each frame comes back on the pair's RX, MACs swapped.
    fn send_back(
        &self,
        pair: u16,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
        others: &mut Rings<'_>,
    ) -> Result<(), VirtqueueError> {
        let header_len = self.core.header_len();
        let mrg = self.core.mrg_rxbuf();
        let mut rx = others.get(vnet::rx_queue(pair));
        let (mut frames, mut bytes, mut errors, mut delivered, mut rx_bytes, mut dropped) = (0u64, 0u64, 0u64, 0, 0, 0);
        FRAME.with(|buf| -> Result<(), VirtqueueError> {
            let mut buf = buf.borrow_mut();
            for chain in batch.chains() {
                let len = match check_tx(chain, header_len) {
                    Ok(len) => len,
                    Err(_) => {
                        errors += 1;
                        queue.complete(batch, chain, 0)?;
                        continue;
                    }
                };
                let n = copy_out(batch.readable(chain), header_len, &mut buf[..len]);
                queue.complete(batch, chain, 0)?;
                frames += 1;
                bytes += n as u64;
                let frame = &mut buf[..n];
                let mut swapped = [0u8; 12];
                swapped[..6].copy_from_slice(&frame[6..12]);
                swapped[6..].copy_from_slice(&frame[..6]);
                frame[..12].copy_from_slice(&swapped);
                let outcome = match rx.as_mut() {
                    Some(rx) => deliver(rx, NetHeader::default(), header_len, mrg, &[frame])?,
                    None => Delivery::NoBuffers,
                };
                if outcome == Delivery::Delivered {
                    delivered += 1;
                    rx_bytes += n as u64;
                } else {
                    dropped += 1;
                }
            }
            Ok(())
        })?;
        if let Some(c) = self.core.counters(pair) {
            c.count_tx(frames, bytes, errors);
            c.count_rx(delivered, rx_bytes, dropped);
        }
        Ok(())
    }
}

impl NetPort for Loopback {
    fn core(&self) -> &NetCore {
        &self.core
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        // No RARP: a loopback port has nobody to announce the guest to.
        ProtocolFeatures::MTU | ProtocolFeatures::DEVICE_STATE
    }
    fn transmit(
        &self,
        pair: u16,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
        others: &mut Rings<'_>,
    ) -> Result<(), VirtqueueError> {
        self.send_back(pair, queue, batch, others)
    }
}
