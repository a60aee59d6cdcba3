//! Built-in virtio-net devices and what they share: the queue layout (pairs, then the control
//! queue), config space, negotiated header size, per-pair counters, the control queue, and the
//! two directions of a frame — TX chains read out of guest memory and frames delivered into RX
//! chains (merged over several when MRG_RXBUF is on). A net device puts each queue pair in one
//! ring group, so its worker owns both rings of the pair and TX can fill RX without a lock.

mod loopback;
mod tap;

pub use loopback::Loopback;
pub use tap::TapNet;

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Mutex;

use std::os::fd::RawFd;

use crate::backend::{Device, DeviceRequest, RingHandle, Rings, StateReader, StateWriter};
use crate::protocol::{ProtocolFeatures, VirtioFeatures};
use crate::virtio::net::{self as vnet, ctrl, feature, NetConfig, NetHeader, QueueRole};
use crate::virtqueue::{for_each_span, AnyDeviceQueue, Chain, ChainBatch, KeptChains, Segment, VirtqueueError};

/// What makes one net device differ from another: where transmitted frames go and where
/// received ones come from. Every `NetPort` is a [`Device`] with what all net devices share —
/// the queue layout (pairs, then the control queue), a pair's rings on one worker, RX buffers
/// kept until frames arrive, the control queue, GET_QUEUE_NUM in pairs, NET_SET_MTU — so a new
/// net device implements only these methods.
pub trait NetPort: Send + Sync + 'static {
    /// Counters, config and negotiated state.
    fn core(&self) -> &NetCore;
    /// A batch of chains the driver put on pair `pair`'s transmit queue: complete each on
    /// `queue` (the receive queue of the pair is in `others`).
    fn transmit(
        &self,
        pair: u16,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
        others: &mut Rings<'_>,
    ) -> Result<(), VirtqueueError>;
    /// Virtio features offered.
    fn features(&self) -> u64 {
        self.core().features()
    }
    /// Protocol features offered on top of the session's (RARP only if SEND_RARP is handled).
    fn protocol_features(&self) -> ProtocolFeatures {
        self.core().protocol_features()
    }
    /// SET_FEATURES, after the core recorded them.
    fn features_acked(&self, _features: u64) {}
    /// SEND_RARP / NET_SET_MTU (default: NET_SET_MTU checked and stored, SEND_RARP refused).
    fn device_request(&self, request: DeviceRequest) -> Result<(), String> {
        self.core().set_mtu(request)
    }
    /// Fds that feed pair `pair`'s receive queue, watched by its worker.
    fn rx_fds(&self, _pair: u16) -> Vec<RawFd> {
        Vec::new()
    }
    /// `fd` of [`rx_fds`](NetPort::rx_fds) is readable: fill `rx`. False parks the fds until
    /// the driver kicks the receive queue.
    fn rx_event(
        &self,
        _pair: u16,
        _fd: RawFd,
        _rx: &mut RingHandle<'_>,
        _others: &mut Rings<'_>,
    ) -> Result<bool, VirtqueueError> {
        Ok(false)
    }
    /// A batch of the control queue (default: the core's handling).
    fn control(&self, queue: &mut AnyDeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError> {
        self.core().control(queue, batch)
    }
    /// See [`Device::reset`].
    fn reset(&self) {}
    /// See [`Device::queue_started`].
    fn queue_started(&self, _queue_index: u16) {}
    /// See [`Device::queue_stopped`].
    fn queue_stopped(&self, _queue_index: u16) {}
    /// See [`Device::wake_scope`].
    fn wake_scope(&self, run: &mut dyn FnMut()) {
        run()
    }
    /// See [`Device::save_state`] (default: the core's state, which is all a built-in port has).
    fn save_state(&self) -> Result<Vec<u8>, String> {
        Ok(self.core().save_state())
    }
    /// See [`Device::load_state`].
    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        self.core().load_state(state)
    }
}

impl<P: NetPort> Device for P {
    fn num_queues(&self) -> u16 {
        self.core().num_queues()
    }
    fn max_queue_size(&self) -> u16 {
        self.core().max_queue_size()
    }
    fn queue_num(&self) -> u64 {
        u64::from(self.core().queue_pairs())
    }
    fn ring_group(&self, queue_index: u16) -> u16 {
        // A pair's receive and transmit queues on one thread: TX fills RX without a lock.
        queue_index / 2
    }
    fn features(&self) -> u64 {
        NetPort::features(self)
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        NetPort::protocol_features(self)
    }
    fn config(&self) -> Vec<u8> {
        self.core().config()
    }
    fn features_acked(&self, features: u64) {
        self.core().features_acked(features);
        NetPort::features_acked(self, features);
    }
    fn device_request(&self, request: DeviceRequest) -> Result<(), String> {
        NetPort::device_request(self, request)
    }
    fn reset(&self) {
        NetPort::reset(self)
    }
    fn queue_started(&self, queue_index: u16) {
        NetPort::queue_started(self, queue_index)
    }
    fn queue_stopped(&self, queue_index: u16) {
        NetPort::queue_stopped(self, queue_index)
    }
    fn wake_scope(&self, run: &mut dyn FnMut()) {
        NetPort::wake_scope(self, run)
    }
    fn save_state(&self) -> Result<Vec<u8>, String> {
        NetPort::save_state(self)
    }
    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        NetPort::load_state(self, state)
    }
    fn event_fds(&self, queue_index: u16) -> Vec<RawFd> {
        match vnet::queue_role(queue_index, self.core().queue_pairs()) {
            Some(QueueRole::Rx(pair)) => self.rx_fds(pair),
            _ => Vec::new(),
        }
    }
    fn event(&self, fd: RawFd, mut ring: RingHandle<'_>, others: &mut Rings<'_>) -> Result<bool, VirtqueueError> {
        match vnet::queue_role(ring.index(), self.core().queue_pairs()) {
            Some(QueueRole::Rx(pair)) => self.rx_event(pair, fd, &mut ring, others),
            _ => Ok(false),
        }
    }
    fn process(
        &self,
        _queue_index: u16,
        _queue: &mut AnyDeviceQueue,
        _batch: &ChainBatch,
    ) -> Result<(), VirtqueueError> {
        // The worker calls process_batch; nothing reaches here.
        Ok(())
    }
    fn process_batch(
        &self,
        queue_index: u16,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
        kept: &mut KeptChains,
        others: &mut Rings<'_>,
    ) -> Result<(), VirtqueueError> {
        match vnet::queue_role(queue_index, self.core().queue_pairs()) {
            // Receive buffers wait for frames.
            Some(QueueRole::Rx(_)) => {
                kept.keep_all(batch);
                Ok(())
            }
            Some(QueueRole::Tx(pair)) => self.transmit(pair, queue, batch, others),
            Some(QueueRole::Ctrl) => self.control(queue, batch),
            None => Ok(()),
        }
    }
}

/// Tag and format version of a net device's saved state (DEVICE_STATE).
const NET_STATE_TAG: &[u8; 4] = b"VNT1";

/// Counters of one queue pair. `tx` is what the driver transmitted, `rx` what was delivered
/// into its receive queue.
#[derive(Debug, Default)]
pub struct PairCounters {
    /// Frames the driver transmitted (TX chains handled).
    pub tx_frames: AtomicU64,
    /// Their bytes (frames without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// TX chains refused as malformed (no room for a header, writable parts, too long) or
    /// that the peer could not take.
    pub tx_errors: AtomicU64,
    /// Frames delivered into the driver's RX ring.
    pub rx_frames: AtomicU64,
    /// Their bytes.
    pub rx_bytes: AtomicU64,
    /// Frames dropped because the RX ring had no (or too few, or too small) buffers.
    pub rx_dropped: AtomicU64,
}

/// A snapshot of the counters (summed over pairs or for one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// See [`PairCounters`].
    pub tx_frames: u64,
    /// See [`PairCounters`].
    pub tx_bytes: u64,
    /// See [`PairCounters`].
    pub tx_errors: u64,
    /// See [`PairCounters`].
    pub rx_frames: u64,
    /// See [`PairCounters`].
    pub rx_bytes: u64,
    /// See [`PairCounters`].
    pub rx_dropped: u64,
}

impl PairCounters {
    /// Adds a burst's transmit-side counts.
    pub fn count_tx(&self, frames: u64, bytes: u64, errors: u64) {
        self.tx_frames.fetch_add(frames, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.tx_errors.fetch_add(errors, Ordering::Relaxed);
    }

    /// Adds a burst's receive-side counts.
    pub fn count_rx(&self, frames: u64, bytes: u64, dropped: u64) {
        self.rx_frames.fetch_add(frames, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.rx_dropped.fetch_add(dropped, Ordering::Relaxed);
    }

    fn snapshot(&self) -> NetCounters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetCounters {
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_errors: l(&self.tx_errors),
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
        }
    }
}

/// Options common to every net device.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Queue pairs (1..=0x8000 by the spec; GET_QUEUE_NUM's answer).
    pub queue_pairs: u16,
    /// The MAC address offered in the config space (VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
    /// The MTU offered (VIRTIO_NET_F_MTU); `None`: the MTU feature is not offered.
    pub mtu: Option<u16>,
    /// Offer the offload bits (CSUM, TSO, ECN both ways): only for a peer that handles
    /// partial checksums and GSO frames (a TAP with a virtio-net header).
    pub offloads: bool,
    /// Largest ring size accepted.
    pub max_queue_size: u16,
}

impl Default for NetOptions {
    fn default() -> NetOptions {
        NetOptions {
            queue_pairs: 1,
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: None,
            offloads: false,
            max_queue_size: 1024,
        }
    }
}

/// RX filtering state set through the control queue (kept so a device or a test can read it;
/// the built-in devices deliver every frame, as a promiscuous port does).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RxMode {
    /// `ctrl::RX_*` command → on/off.
    pub flags: [bool; 6],
    /// Unicast filter table (MAC_TABLE_SET).
    pub unicast: Vec<[u8; 6]>,
    /// Multicast filter table.
    pub multicast: Vec<[u8; 6]>,
}

/// What every net device shares: configuration, negotiated state, counters, control queue.
#[derive(Debug)]
pub struct NetCore {
    options: NetOptions,
    config: Mutex<NetConfig>,
    acked: AtomicU64,
    /// Queue pairs in use (VQ_PAIRS_SET).
    active_pairs: AtomicU16,
    mtu: AtomicU16,
    rx_mode: Mutex<RxMode>,
    counters: Vec<PairCounters>,
    announce_pending: AtomicBool,
}

impl NetCore {
    /// A core for `options` (queue pairs clamped to 1..=0x8000).
    pub fn new(mut options: NetOptions) -> NetCore {
        options.queue_pairs = options.queue_pairs.clamp(1, ctrl::MQ_VQ_PAIRS_MAX);
        let pairs = options.queue_pairs;
        let config = NetConfig {
            mac: options.mac,
            status: vnet::S_LINK_UP,
            max_virtqueue_pairs: pairs,
            mtu: options.mtu.unwrap_or(1500),
        };
        NetCore {
            mtu: AtomicU16::new(config.mtu),
            config: Mutex::new(config),
            acked: AtomicU64::new(0),
            active_pairs: AtomicU16::new(1),
            rx_mode: Mutex::new(RxMode::default()),
            counters: (0..pairs).map(|_| PairCounters::default()).collect(),
            announce_pending: AtomicBool::new(false),
            options,
        }
    }

    /// Queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.options.queue_pairs
    }

    /// Rings: the pairs, then the control queue.
    pub fn num_queues(&self) -> u16 {
        self.options.queue_pairs * 2 + 1
    }

    /// The largest ring size accepted.
    pub fn max_queue_size(&self) -> u16 {
        self.options.max_queue_size
    }

    /// Virtio features offered.
    pub fn features(&self) -> u64 {
        // RING_PACKED: RX buffers kept across wake-ups and handed back on stop, control queue
        // and inflight tracking run on either format.
        let mut f = VirtioFeatures::VERSION_1.bits()
            | VirtioFeatures::EVENT_IDX.bits()
            | VirtioFeatures::INDIRECT_DESC.bits()
            | VirtioFeatures::RING_PACKED.bits()
            | feature::MRG_RXBUF
            | feature::MAC
            | feature::STATUS
            | feature::CTRL_VQ
            | feature::CTRL_RX
            | feature::CTRL_MAC_ADDR
            | feature::GUEST_ANNOUNCE;
        if self.options.queue_pairs > 1 {
            f |= feature::MQ;
        }
        if self.options.mtu.is_some() {
            f |= feature::MTU;
        }
        if self.options.offloads {
            f |= feature::OFFLOADS;
        }
        f
    }

    /// Protocol features a net device implements (SEND_RARP needs the device's `rarp`;
    /// DEVICE_STATE saves this core, see [`save_state`](Self::save_state)).
    pub fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::MTU | ProtocolFeatures::RARP | ProtocolFeatures::DEVICE_STATE
    }

    /// DEVICE_STATE: what the driver set and would not set again after a migration — the
    /// config space (MAC from MAC_ADDR_SET, link and announce status), the MTU from
    /// NET_SET_MTU, the queue pairs in use (VQ_PAIRS_SET) and the RX filters (RX mode, MAC
    /// tables). Counters are statistics of this back-end and stay behind.
    pub fn save_state(&self) -> Vec<u8> {
        let config = self.net_config();
        let rx = self.rx_mode();
        let mut w = StateWriter::new(NET_STATE_TAG);
        w.u16(self.options.queue_pairs).bytes(&config.mac).u16(config.status).u16(config.mtu);
        w.u16(self.mtu()).u16(self.active_pairs()).u8(u8::from(self.announce_pending.load(Ordering::Relaxed)));
        for f in rx.flags {
            w.u8(u8::from(f));
        }
        for table in [&rx.unicast, &rx.multicast] {
            w.u64(table.len() as u64);
            for mac in table {
                w.bytes(mac);
            }
        }
        w.finish()
    }

    /// Restores [`save_state`](Self::save_state)'s output; a state of a device with another
    /// number of queue pairs is refused (the driver would address rings that do not exist).
    pub fn load_state(&self, state: &[u8]) -> Result<(), String> {
        let mut r = StateReader::new(state, NET_STATE_TAG)?;
        let pairs = r.u16()?;
        if pairs != self.options.queue_pairs {
            return Err(format!("the source device had {pairs} queue pairs, this one {}", self.options.queue_pairs));
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(r.bytes(6)?);
        let (status, config_mtu, mtu, active, announce) = (r.u16()?, r.u16()?, r.u16()?, r.u16()?, r.u8()? != 0);
        if !(ctrl::MQ_VQ_PAIRS_MIN..=pairs).contains(&active) {
            return Err(format!("{active} queue pairs in use is outside 1..={pairs}"));
        }
        let mut rx = RxMode::default();
        for f in &mut rx.flags {
            *f = r.u8()? != 0;
        }
        for table in [&mut rx.unicast, &mut rx.multicast] {
            let n = r.u64()?;
            // Bounded by what is left: a forged count cannot make us allocate.
            if n > (state.len() / 6) as u64 {
                return Err("a MAC table is longer than the state".into());
            }
            for _ in 0..n {
                let mut m = [0u8; 6];
                m.copy_from_slice(r.bytes(6)?);
                table.push(m);
            }
        }
        r.end()?;
        self.update_config(|c| {
            c.mac = mac;
            c.status = status;
            c.mtu = config_mtu;
        });
        self.mtu.store(mtu, Ordering::Relaxed);
        self.active_pairs.store(active, Ordering::Relaxed);
        self.announce_pending.store(announce, Ordering::Relaxed);
        *self.rx_mode.lock().unwrap_or_else(|e| e.into_inner()) = rx;
        Ok(())
    }

    /// The config space.
    pub fn config(&self) -> Vec<u8> {
        self.config.lock().unwrap_or_else(|e| e.into_inner()).to_bytes()
    }

    /// The current config.
    pub fn net_config(&self) -> NetConfig {
        *self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates the config (the caller sends CONFIG_CHANGE_MSG if it should reach the driver).
    pub fn update_config(&self, f: impl FnOnce(&mut NetConfig)) {
        f(&mut self.config.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// SET_FEATURES.
    pub fn features_acked(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
    }

    /// What the driver acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// The virtio-net header size for the negotiated features.
    pub fn header_len(&self) -> usize {
        vnet::header_len(self.acked())
    }

    /// Whether receive buffers may be merged.
    pub fn mrg_rxbuf(&self) -> bool {
        self.acked() & feature::MRG_RXBUF != 0
    }

    /// The MTU in force (config, or NET_SET_MTU).
    pub fn mtu(&self) -> u16 {
        self.mtu.load(Ordering::Relaxed)
    }

    /// Queue pairs the driver uses (VQ_PAIRS_SET; 1 until set).
    pub fn active_pairs(&self) -> u16 {
        self.active_pairs.load(Ordering::Relaxed)
    }

    /// RX filtering state from the control queue.
    pub fn rx_mode(&self) -> RxMode {
        self.rx_mode.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Counters of pair `pair`.
    pub fn counters(&self, pair: u16) -> Option<&PairCounters> {
        self.counters.get(usize::from(pair))
    }

    /// Counters summed over the pairs.
    pub fn totals(&self) -> NetCounters {
        let mut t = NetCounters::default();
        for c in &self.counters {
            let s = c.snapshot();
            t.tx_frames += s.tx_frames;
            t.tx_bytes += s.tx_bytes;
            t.tx_errors += s.tx_errors;
            t.rx_frames += s.rx_frames;
            t.rx_bytes += s.rx_bytes;
            t.rx_dropped += s.rx_dropped;
        }
        t
    }

    /// Counters of one pair as a snapshot.
    pub fn pair_totals(&self, pair: u16) -> Option<NetCounters> {
        self.counters(pair).map(PairCounters::snapshot)
    }

    /// Sets S_ANNOUNCE in the status (GUEST_ANNOUNCE negotiated): the driver announces itself
    /// after the config change and acks with ANNOUNCE_ACK. Returns false without the feature.
    pub fn request_announce(&self) -> bool {
        if self.acked() & feature::GUEST_ANNOUNCE == 0 {
            return false;
        }
        self.announce_pending.store(true, Ordering::Relaxed);
        self.update_config(|c| c.status |= vnet::S_ANNOUNCE);
        true
    }

    /// Link status (S_LINK_UP); the caller sends CONFIG_CHANGE_MSG.
    pub fn set_link(&self, up: bool) {
        self.update_config(|c| if up { c.status |= vnet::S_LINK_UP } else { c.status &= !vnet::S_LINK_UP });
    }

    /// The part of a device request common to net devices: NET_SET_MTU is checked against the
    /// spec's range (DPDK accepts 68..=65535) and stored. SEND_RARP is left to the device.
    pub fn set_mtu(&self, request: DeviceRequest) -> Result<(), String> {
        match request {
            DeviceRequest::NetSetMtu(mtu) => {
                if !(u64::from(vnet::MIN_MTU)..=65535).contains(&mtu) {
                    return Err(format!("MTU {mtu} is outside {}..=65535", vnet::MIN_MTU));
                }
                self.mtu.store(mtu as u16, Ordering::Relaxed);
                Ok(())
            }
            DeviceRequest::SendRarp(_) => Err("not a NET_SET_MTU".into()),
        }
    }

    /// Handles a batch of the control queue: every command gets its ack byte (OK or ERR); a
    /// chain without a writable byte cannot be answered and is returned with 0 bytes.
    pub fn control(&self, queue: &mut AnyDeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError> {
        self.control_with(queue, batch, &|_, _, _| None)
    }

    /// [`control`](Self::control) with a device hook that sees each command first
    /// (`class`, `command`, data) and answers it (`Some(ok)`) or leaves it to the defaults.
    pub fn control_with(
        &self,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
        hook: &ControlHook<'_>,
    ) -> Result<(), VirtqueueError> {
        let mut cmd = [0u8; 4096];
        for chain in batch.chains() {
            let readable = batch.readable(chain);
            let n = copy_out(readable, 0, &mut cmd);
            let status = if chain.writable_len == 0 {
                None
            } else if chain.readable_len as usize > cmd.len() {
                Some(ctrl::ERR)
            } else {
                Some(self.handle_command(&cmd[..n], hook))
            };
            let written = match status {
                Some(s) => {
                    copy_in(batch.writable(chain), 0, &[s]);
                    1
                }
                None => 0,
            };
            queue.complete(batch, chain, written)?;
        }
        Ok(())
    }

    /// Answers one control command (`class`, `command`, data...) as read from the driver's
    /// buffers: `hook` first, then the defaults. Anything malformed is ERR.
    pub fn handle_command(&self, bytes: &[u8], hook: &ControlHook<'_>) -> u8 {
        let [class, command, data @ ..] = bytes else { return ctrl::ERR };
        match hook(*class, *command, data) {
            Some(true) => ctrl::OK,
            Some(false) => ctrl::ERR,
            None => self.command(*class, *command, data),
        }
    }

    fn command(&self, class: u8, command: u8, data: &[u8]) -> u8 {
        let acked = self.acked();
        let ok = match (class, command) {
            (ctrl::CLASS_RX, c) if acked & feature::CTRL_RX != 0 && c <= ctrl::RX_NOBCAST && data.len() == 1 => {
                self.rx_mode.lock().unwrap_or_else(|e| e.into_inner()).flags[usize::from(c)] = data[0] != 0;
                true
            }
            (ctrl::CLASS_MAC, ctrl::MAC_TABLE_SET) if acked & feature::CTRL_RX != 0 => match parse_mac_tables(data) {
                Some((unicast, multicast)) => {
                    let mut m = self.rx_mode.lock().unwrap_or_else(|e| e.into_inner());
                    m.unicast = unicast;
                    m.multicast = multicast;
                    true
                }
                None => false,
            },
            (ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET) if acked & feature::CTRL_MAC_ADDR != 0 && data.len() == 6 => {
                self.update_config(|c| c.mac.copy_from_slice(data));
                true
            }
            (ctrl::CLASS_ANNOUNCE, ctrl::ANNOUNCE_ACK) if acked & feature::GUEST_ANNOUNCE != 0 && data.is_empty() => {
                self.announce_pending.store(false, Ordering::Relaxed);
                self.update_config(|c| c.status &= !vnet::S_ANNOUNCE);
                true
            }
            (ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET) if acked & feature::MQ != 0 && data.len() == 2 => {
                let pairs = u16::from_le_bytes([data[0], data[1]]);
                if (ctrl::MQ_VQ_PAIRS_MIN..=self.options.queue_pairs).contains(&pairs) {
                    self.active_pairs.store(pairs, Ordering::Relaxed);
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        if ok {
            ctrl::OK
        } else {
            ctrl::ERR
        }
    }
}

/// A device's look at a control command first: (class, command, data) → `Some(ok)` answers
/// it, `None` leaves it to the defaults.
pub type ControlHook<'a> = dyn Fn(u8, u8, &[u8]) -> Option<bool> + 'a;

/// A MAC filter table.
type MacTable = Vec<[u8; 6]>;

/// Parses MAC_TABLE_SET's two `{ le32 entries; u8 macs[entries][6]; }` tables, which must fill
/// the command exactly.
fn parse_mac_tables(data: &[u8]) -> Option<(MacTable, MacTable)> {
    let mut at = 0usize;
    let mut table = || -> Option<Vec<[u8; 6]>> {
        let n = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        let bytes = data.get(at..at.checked_add(n.checked_mul(6)?)?)?;
        at += bytes.len();
        Some(bytes.chunks_exact(6).map(|m| m.try_into().unwrap_or([0; 6])).collect())
    };
    let unicast = table()?;
    let multicast = table()?;
    (at == data.len()).then_some((unicast, multicast))
}

/// Copies bytes `[skip, skip + out.len())` of `segments` into `out`; returns how many there were.
pub fn copy_out(segments: &[Segment], skip: usize, out: &mut [u8]) -> usize {
    let len = out.len();
    for_each_span(segments.iter().map(|s| (s.host, s.len as usize)), skip, len, |host, at, n| {
        // SAFETY: `host` is valid for n bytes inside a live mapping (the queue's table); `out`
        // has room for at + n bytes. Guest memory may change under us: we copy, never borrow.
        unsafe { std::ptr::copy_nonoverlapping(host.cast_const(), out[at..].as_mut_ptr(), n) };
    })
}

/// Copies `data` into `segments` from byte `skip`; returns how many bytes fitted.
pub fn copy_in(segments: &[Segment], skip: usize, data: &[u8]) -> usize {
    for_each_span(segments.iter().map(|s| (s.host, s.len as usize)), skip, data.len(), |host, at, n| {
        // SAFETY: as in copy_out; the segments are device-writable buffers of a live mapping.
        unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), host, n) };
    })
}

/// Why a TX chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxError {
    /// A transmit buffer must be device-readable only.
    Writable,
    /// Shorter than the header plus an Ethernet header.
    TooShort,
    /// Longer than the header plus [`vnet::MAX_FRAME_LEN`].
    TooLong,
}

/// Checks a TX chain: readable only, header plus at least an Ethernet header, at most a
/// 64 KiB GSO frame. Returns the frame length (without the header).
pub fn check_tx(chain: &Chain, header_len: usize) -> Result<usize, TxError> {
    if chain.writable_len != 0 {
        return Err(TxError::Writable);
    }
    let len = chain.readable_len as usize;
    if len < header_len + vnet::MIN_FRAME_LEN {
        return Err(TxError::TooShort);
    }
    if len - header_len > vnet::MAX_FRAME_LEN {
        return Err(TxError::TooLong);
    }
    Ok(len - header_len)
}

/// What [`deliver`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// In the RX ring (used entries written; the worker publishes them).
    Delivered,
    /// No (or not enough) RX buffers now: nothing was consumed; try again after a kick.
    NoBuffers,
    /// The frame can never fit (larger than a buffer without MRG_RXBUF, or than the ring):
    /// dropped, the buffers left as they were.
    TooLarge,
}

/// Most RX buffers one merged frame may use.
const MAX_MERGE: usize = 256;

/// Delivers one frame into the RX ring `rx`: header (`hdr`, with `num_buffers` set here)
/// then `frame` (given in pieces, e.g. a header and a payload), into one kept chain or, with
/// `mrg`, as many as it needs. Takes buffers from the ring as needed (up to `refill` at a
/// time).
pub fn deliver(
    rx: &mut RingHandle<'_>,
    mut hdr: NetHeader,
    header_len: usize,
    mrg: bool,
    frame: &[&[u8]],
) -> Result<Delivery, VirtqueueError> {
    let frame_len: usize = frame.iter().map(|p| p.len()).sum();
    let total = header_len + frame_len;
    // How many kept chains are needed, refilling until they cover the frame.
    let mut need = 0usize;
    let mut room = 0usize;
    loop {
        while room < total {
            match rx.kept().get(need) {
                Some(c) => {
                    room += c.writable_len as usize;
                    need += 1;
                    if !mrg {
                        break;
                    }
                }
                None => break,
            }
        }
        if room >= total || (!mrg && need == 1) {
            break;
        }
        if need >= MAX_MERGE || rx.refill(64) == 0 {
            break;
        }
    }
    if need == 0 {
        return Ok(Delivery::NoBuffers);
    }
    if room < total {
        if !mrg {
            return Ok(Delivery::TooLarge);
        }
        return Ok(if need >= MAX_MERGE || need >= usize::from(rx.queue().size()) {
            Delivery::TooLarge
        } else {
            Delivery::NoBuffers
        });
    }
    hdr.num_buffers = if header_len >= vnet::HDR_LEN { need as u16 } else { 0 };
    let header = hdr.to_bytes();
    let mut left_hdr = &header[..header_len];
    let mut pieces = frame.iter().copied();
    let mut piece: &[u8] = pieces.next().unwrap_or(&[]);
    for _ in 0..need {
        let Some(chain) = rx.take(0) else { break };
        let mut at = 0usize;
        let cap = chain.writable_len as usize;
        while at < cap {
            let src = if !left_hdr.is_empty() {
                &mut left_hdr
            } else {
                while piece.is_empty() {
                    match pieces.next() {
                        Some(p) => piece = p,
                        None => break,
                    }
                }
                if piece.is_empty() {
                    break;
                }
                &mut piece
            };
            let n = copy_in(chain.writable(), at, &src[..src.len().min(cap - at)]);
            if n == 0 {
                break;
            }
            *src = &src[n..];
            at += n;
        }
        // Header and frame fill the chain from its start and nothing else is written: only
        // those bytes are logged (an RX buffer can be 64 KiB for a 60-byte frame).
        rx.complete_prefix(chain, at as u32)?;
    }
    Ok(Delivery::Delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_tables_must_fill_the_command_exactly() {
        let mut t = 2u32.to_le_bytes().to_vec();
        t.extend([1u8; 12]);
        t.extend(1u32.to_le_bytes());
        t.extend([0x33u8; 6]);
        let (u, m) = parse_mac_tables(&t).unwrap();
        assert_eq!((u.len(), m, u[1]), (2, vec![[0x33; 6]], [1; 6]));
        assert!(parse_mac_tables(&t[..t.len() - 1]).is_none());
        let mut long = t.clone();
        long.push(0);
        assert!(parse_mac_tables(&long).is_none());
        // An entry count whose bytes would overflow the multiplication.
        let huge = [0xffu8, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert!(parse_mac_tables(&huge).is_none());
    }

    #[test]
    fn transmit_chains_are_checked() {
        let chain = |readable_len, writable_len| Chain::for_tests(0, readable_len, writable_len);
        assert_eq!(check_tx(&chain(12 + 60, 0), 12), Ok(60));
        assert_eq!(check_tx(&chain(12 + 60, 1), 12), Err(TxError::Writable));
        assert_eq!(check_tx(&chain(12 + 13, 0), 12), Err(TxError::TooShort));
        assert_eq!(check_tx(&chain((12 + vnet::MAX_FRAME_LEN + 1) as u32, 0), 12), Err(TxError::TooLong));
    }

    #[test]
    fn state_round_trips_and_foreign_states_are_refused() {
        let src = NetCore::new(NetOptions { queue_pairs: 2, ..NetOptions::default() });
        src.features_acked(src.features());
        src.update_config(|c| c.mac = [2, 0, 0, 0, 0, 9]);
        assert_eq!(src.command(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &2u16.to_le_bytes()), ctrl::OK);
        assert_eq!(src.command(ctrl::CLASS_RX, ctrl::RX_PROMISC, &[1]), ctrl::OK);
        let mut tables = 1u32.to_le_bytes().to_vec();
        tables.extend([0x0a; 6]);
        tables.extend(0u32.to_le_bytes());
        assert_eq!(src.command(ctrl::CLASS_MAC, ctrl::MAC_TABLE_SET, &tables), ctrl::OK);
        src.set_mtu(DeviceRequest::NetSetMtu(9000)).unwrap();
        let state = src.save_state();

        let dst = NetCore::new(NetOptions { queue_pairs: 2, ..NetOptions::default() });
        dst.load_state(&state).unwrap();
        assert_eq!(dst.net_config(), src.net_config());
        assert_eq!((dst.rx_mode(), dst.mtu(), dst.active_pairs()), (src.rx_mode(), 9000, 2));

        let other = NetCore::new(NetOptions::default());
        assert!(other.load_state(&state).unwrap_err().contains("queue pairs"));
        for cut in [0, 3, 10, state.len() - 1] {
            assert!(dst.load_state(&state[..cut]).is_err(), "truncated at {cut}");
        }
        let mut long = state.clone();
        long.push(0);
        assert!(dst.load_state(&long).is_err());
    }

    #[test]
    fn control_commands_follow_the_negotiated_features() {
        let core = NetCore::new(NetOptions { queue_pairs: 4, ..NetOptions::default() });
        core.features_acked(core.features());
        assert_eq!(core.command(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &4u16.to_le_bytes()), ctrl::OK);
        assert_eq!(core.active_pairs(), 4);
        assert_eq!(core.command(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &5u16.to_le_bytes()), ctrl::ERR);
        assert_eq!(core.command(ctrl::CLASS_RX, ctrl::RX_NOBCAST, &[1]), ctrl::OK);
        assert!(core.rx_mode().flags[usize::from(ctrl::RX_NOBCAST)]);
        assert!(core.request_announce());
        assert_eq!(core.net_config().status & vnet::S_ANNOUNCE, vnet::S_ANNOUNCE);
        assert_eq!(core.command(ctrl::CLASS_ANNOUNCE, ctrl::ANNOUNCE_ACK, &[]), ctrl::OK);
        assert_eq!(core.net_config().status & vnet::S_ANNOUNCE, 0);
        // Without the features, the same commands fail.
        core.features_acked(0);
        assert_eq!(core.command(ctrl::CLASS_RX, ctrl::RX_PROMISC, &[1]), ctrl::ERR);
        assert_eq!(core.command(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &1u16.to_le_bytes()), ctrl::ERR);
        assert!(!core.request_announce());
        assert!(core.set_mtu(DeviceRequest::NetSetMtu(67)).is_err());
        assert!(core.set_mtu(DeviceRequest::NetSetMtu(9000)).is_ok());
        assert_eq!(core.mtu(), 9000);
    }
}
