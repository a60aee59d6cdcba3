//! The loopback net device: every frame the driver transmits comes back on the receive queue of
//! the same pair with its Ethernet source and destination swapped. Frames that find no RX
//! buffer are dropped and counted. A self-contained peer for tests and benchmarks.

use std::cell::RefCell;

use super::{check_tx, copy_out, deliver, Delivery, NetCore, NetOptions};
use crate::backend::{Device, DeviceRequest, Rings};
use crate::protocol::ProtocolFeatures;
use crate::virtio::net::{self as vnet, NetHeader, QueueRole};
use crate::virtqueue::{ChainBatch, DeviceQueue, KeptChains, VirtqueueError};

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

    fn transmit(
        &self,
        pair: u16,
        queue: &mut DeviceQueue,
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
            use std::sync::atomic::Ordering::Relaxed;
            c.tx_frames.fetch_add(frames, Relaxed);
            c.tx_bytes.fetch_add(bytes, Relaxed);
            c.tx_errors.fetch_add(errors, Relaxed);
            c.rx_frames.fetch_add(delivered, Relaxed);
            c.rx_bytes.fetch_add(rx_bytes, Relaxed);
            c.rx_dropped.fetch_add(dropped, Relaxed);
        }
        Ok(())
    }
}

impl super::NetDevice for Loopback {
    fn core(&self) -> &NetCore {
        &self.core
    }
}

impl Device for Loopback {
    fn num_queues(&self) -> u16 {
        self.core.num_queues()
    }
    fn max_queue_size(&self) -> u16 {
        self.core.max_queue_size()
    }
    fn queue_num(&self) -> u64 {
        u64::from(self.core.queue_pairs())
    }
    fn ring_group(&self, queue_index: u16) -> u16 {
        queue_index / 2
    }
    fn features(&self) -> u64 {
        self.core.features()
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        // No RARP: a loopback port has nobody to announce the guest to.
        ProtocolFeatures::MTU
    }
    fn config(&self) -> Vec<u8> {
        self.core.config()
    }
    fn features_acked(&self, features: u64) {
        self.core.features_acked(features);
    }
    fn device_request(&self, request: DeviceRequest) -> Result<(), String> {
        self.core.set_mtu(request)
    }
    fn process(&self, _queue_index: u16, _queue: &mut DeviceQueue, _batch: &ChainBatch) -> Result<(), VirtqueueError> {
        // Every ring goes through process_batch.
        Ok(())
    }
    fn process_batch(
        &self,
        queue_index: u16,
        queue: &mut DeviceQueue,
        batch: &ChainBatch,
        kept: &mut KeptChains,
        others: &mut Rings<'_>,
    ) -> Result<(), VirtqueueError> {
        match vnet::queue_role(queue_index, self.core.queue_pairs()) {
            // Receive buffers wait for frames.
            Some(QueueRole::Rx(_)) => {
                kept.keep_all(batch);
                Ok(())
            }
            Some(QueueRole::Tx(pair)) => self.transmit(pair, queue, batch, others),
            Some(QueueRole::Ctrl) => self.core.control(queue, batch),
            None => Ok(()),
        }
    }
}
