//! Python-written net devices (``vhostuser_rs.NetDevice``): the native half (``NetPort``: state,
//! counters, ``send``), the frames and headers ``receive`` gets, and the adapter that makes the
//! Python object a ``devices::net::NetPort``.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use super::errors::os_error;
use super::memory::GuestBuffer;
use super::net::{counters_dict, net_options};
use crate::backend::{DeviceRequest, RingHandle, Rings, StateReader, StateWriter};
use crate::devices::net::{check_tx, copy_out, deliver, Delivery, NetCore, NetPort};
use crate::eventfd;
use crate::memory::MemoryTable;
use crate::protocol::ProtocolFeatures;
use crate::virtio::net::{self as vnet, NetHeader};
use crate::virtqueue::{AnyDeviceQueue, ChainBatch, Segment, VirtqueueError};

/// Frames a send from outside the worker may queue per pair before it pushes back.
const PENDING_MAX: usize = 1024;

/// ``virtio_net_hdr``: the per-frame header (offload metadata) in front of every frame.
#[pyclass(module = "vhostuser_rs", name = "NetHeader", frozen, eq)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct PyNetHeader {
    inner: NetHeader,
}

#[pymethods]
impl PyNetHeader {
    #[new]
    #[pyo3(signature = (*, flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0, num_buffers=0))]
    fn new(
        flags: u8,
        gso_type: u8,
        hdr_len: u16,
        gso_size: u16,
        csum_start: u16,
        csum_offset: u16,
        num_buffers: u16,
    ) -> PyNetHeader {
        PyNetHeader { inner: NetHeader { flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers } }
    }

    /// Parses the first 12 (or 10) bytes of `data`.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<PyNetHeader> {
        if data.len() < vnet::HDR_LEN_LEGACY {
            return Err(PyValueError::new_err(format!(
                "a virtio-net header is {} or {} bytes, got {}",
                vnet::HDR_LEN_LEGACY,
                vnet::HDR_LEN,
                data.len()
            )));
        }
        Ok(PyNetHeader { inner: NetHeader::from_bytes(data) })
    }

    /// The 12 wire bytes.
    #[allow(clippy::wrong_self_convention)] // a Python method: pyo3 passes &self
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    #[getter]
    fn flags(&self) -> u8 {
        self.inner.flags
    }
    #[getter]
    fn gso_type(&self) -> u8 {
        self.inner.gso_type
    }
    #[getter]
    fn hdr_len(&self) -> u16 {
        self.inner.hdr_len
    }
    #[getter]
    fn gso_size(&self) -> u16 {
        self.inner.gso_size
    }
    #[getter]
    fn csum_start(&self) -> u16 {
        self.inner.csum_start
    }
    #[getter]
    fn csum_offset(&self) -> u16 {
        self.inner.csum_offset
    }
    #[getter]
    fn num_buffers(&self) -> u16 {
        self.inner.num_buffers
    }

    fn __repr__(&self) -> String {
        let h = &self.inner;
        format!(
            "NetHeader(flags={}, gso_type={}, hdr_len={}, gso_size={}, csum_start={}, csum_offset={}, num_buffers={})",
            h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset, h.num_buffers
        )
    }
}

#[derive(Clone, Copy)]
struct Piece {
    host: *mut u8,
    len: usize,
}

/// A frame the driver transmitted, as ``NetDevice.receive`` gets it: its header and a zero-copy
/// read-only view of the frame bytes in guest memory (``data``: a memoryview when the frame is
/// contiguous there, else a copy). The view keeps its mapping alive, so using it later is safe,
/// but the driver reuses the buffer once ``receive`` returns: copy what you keep.
#[pyclass(module = "vhostuser_rs", name = "Frame", frozen)]
pub(crate) struct PyFrame {
    header: NetHeader,
    pieces: Box<[Piece]>,
    len: usize,
    memory: Arc<MemoryTable>,
}

// SAFETY: the pieces point into mappings kept alive by `memory`; access is by copies and
// read-only memoryviews.
unsafe impl Send for PyFrame {}
// SAFETY: as above.
unsafe impl Sync for PyFrame {}

impl PyFrame {
    fn from_segments(
        header: NetHeader,
        segments: &[Segment],
        skip: usize,
        len: usize,
        memory: &Arc<MemoryTable>,
    ) -> PyFrame {
        let mut pieces = Vec::with_capacity(segments.len());
        crate::virtqueue::for_each_span(segments.iter().map(|s| (s.host, s.len as usize)), skip, len, |host, _, n| {
            pieces.push(Piece { host, len: n })
        });
        PyFrame { header, pieces: pieces.into_boxed_slice(), len, memory: memory.clone() }
    }

    fn copy_into(&self, out: &mut [u8]) -> usize {
        let mut at = 0;
        for p in self.pieces.iter() {
            let n = p.len.min(out.len() - at);
            // SAFETY: p.host..+n lies in a mapping `memory` keeps alive.
            unsafe { std::ptr::copy_nonoverlapping(p.host.cast_const(), out[at..].as_mut_ptr(), n) };
            at += n;
        }
        at
    }
}

#[pymethods]
impl PyFrame {
    /// The virtio-net header the driver put before the frame.
    #[getter]
    fn header(&self) -> PyNetHeader {
        PyNetHeader { inner: self.header }
    }

    /// The frame (Ethernet header onwards): a read-only memoryview over guest memory when
    /// contiguous there, else ``bytes``.
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if let [p] = &*self.pieces {
            let owner = self.memory.clone() as Arc<dyn std::any::Any + Send + Sync>;
            return Ok(GuestBuffer::view(py, GuestBuffer::new(owner, p.host, p.len, true))?.into_any());
        }
        Ok(self.__bytes__(py).into_any())
    }

    /// A copy of the frame.
    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new_with(py, self.len, |b| {
            self.copy_into(b);
            Ok(())
        })
        .unwrap_or_else(|_| PyBytes::new(py, b""))
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!("<vhostuser_rs.Frame {} bytes>", self.len)
    }
}

/// Where a ``send`` called from a device callback on the worker delivers directly.
#[derive(Clone, Copy)]
struct SendCtx {
    shared: *const NetShared,
    pair: u16,
    /// The RX ring itself when the callback runs on it (events), else null (find it in `others`).
    rx: *mut RingHandle<'static>,
    others: *mut Rings<'static>,
}

thread_local! {
    static CTX: Cell<Option<SendCtx>> = const { Cell::new(None) };
    static BOUNCE: RefCell<Vec<u8>> = RefCell::new(vec![0u8; vnet::MAX_FRAME_LEN]);
}

/// Runs `f` with `ctx` as this thread's send context (restored afterwards).
fn with_ctx<R>(ctx: SendCtx, f: impl FnOnce() -> R) -> R {
    let prev = CTX.with(|c| c.replace(Some(ctx)));
    let r = f();
    CTX.with(|c| c.set(prev));
    r
}

struct Pending {
    header: NetHeader,
    frame: Vec<u8>,
}

/// What the Python ``NetDevice`` object and its Rust adapter share.
pub(crate) struct NetShared {
    core: NetCore,
    /// Frames sent from outside the pair's worker, delivered by it.
    pending: Vec<Mutex<VecDeque<Pending>>>,
    /// One eventfd per pair, watched on its RX ring: pending frames are waiting.
    wake: Vec<OwnedFd>,
}

impl NetShared {
    fn count(&self, pair: u16, delivered: u64, bytes: u64, dropped: u64) {
        if let Some(c) = self.core.counters(pair) {
            c.count_rx(delivered, bytes, dropped);
        }
    }

    /// Moves queued frames of `pair` into its RX ring; false when the ring ran out of buffers.
    fn flush_pending(&self, pair: u16, rx: &mut RingHandle<'_>) -> Result<bool, VirtqueueError> {
        eventfd::drain(self.wake[usize::from(pair)].as_fd());
        let (header_len, mrg) = (self.core.header_len(), self.core.mrg_rxbuf());
        let mut queue = self.pending[usize::from(pair)].lock().unwrap_or_else(|e| e.into_inner());
        let (mut n, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        let mut more = true;
        while let Some(p) = queue.front() {
            match deliver(rx, p.header, header_len, mrg, &[&p.frame])? {
                Delivery::Delivered => {
                    n += 1;
                    bytes += p.frame.len() as u64;
                }
                Delivery::TooLarge => dropped += 1,
                Delivery::NoBuffers => {
                    // Re-arm kicks; go on only if buffers really came meanwhile.
                    if rx.arm()? && rx.refill(64) > 0 {
                        continue;
                    }
                    more = false;
                    break;
                }
            }
            queue.pop_front();
        }
        drop(queue);
        self.count(pair, n, bytes, dropped);
        Ok(more)
    }
}

/// The native half of a ``vhostuser_rs.NetDevice``: net state, counters and ``send``.
#[pyclass(module = "vhostuser_rs", name = "NetPort", frozen)]
pub(crate) struct PyNetPort {
    shared: Arc<NetShared>,
}

/// One frame given to ``send``, as bytes to copy.
enum Outgoing<'py> {
    Bytes(NetHeader, Bound<'py, PyBytes>),
    Buffer(NetHeader, Vec<u8>),
    Frame(NetHeader, Bound<'py, PyFrame>),
}

fn outgoing<'py>(item: &Bound<'py, PyAny>) -> PyResult<Outgoing<'py>> {
    let (header, data) = match item.cast::<PyTuple>() {
        Ok(t) if t.len() == 2 => (t.get_item(0)?.cast::<PyNetHeader>()?.get().inner, t.get_item(1)?),
        _ => (NetHeader::default(), item.clone()),
    };
    if let Ok(b) = data.cast::<PyBytes>() {
        return Ok(Outgoing::Bytes(header, b.clone()));
    }
    if let Ok(f) = data.cast::<PyFrame>() {
        return Ok(Outgoing::Frame(header, f.clone()));
    }
    let buf = pyo3::buffer::PyBuffer::<u8>::get(&data)?;
    Ok(Outgoing::Buffer(header, buf.to_vec(data.py())?))
}

impl Outgoing<'_> {
    fn len(&self) -> usize {
        match self {
            Outgoing::Bytes(_, b) => b.as_bytes().len(),
            Outgoing::Buffer(_, v) => v.len(),
            Outgoing::Frame(_, f) => f.get().len,
        }
    }

    fn header(&self) -> NetHeader {
        match self {
            Outgoing::Bytes(h, _) | Outgoing::Buffer(h, _) | Outgoing::Frame(h, _) => *h,
        }
    }

    /// Calls `f` with the frame's bytes (copied out of guest memory for a ``Frame``).
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            Outgoing::Bytes(_, b) => f(b.as_bytes()),
            Outgoing::Buffer(_, v) => f(v),
            Outgoing::Frame(_, fr) => BOUNCE.with(|buf| {
                let mut buf = buf.borrow_mut();
                let n = fr.get().copy_into(&mut buf);
                f(&buf[..n])
            }),
        }
    }
}

#[pymethods]
impl PyNetPort {
    #[new]
    #[pyo3(signature = (*, queue_pairs=1, mac=None, mtu=None, max_queue_size=1024))]
    fn new(queue_pairs: u16, mac: Option<&str>, mtu: Option<u16>, max_queue_size: u16) -> PyResult<PyNetPort> {
        let mut options = net_options(queue_pairs, mac, mtu)?;
        options.max_queue_size = max_queue_size;
        let core = NetCore::new(options);
        let pairs = usize::from(core.queue_pairs());
        let mut wake = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            wake.push(eventfd::new().map_err(|e| os_error(&e))?);
        }
        let pending = (0..pairs).map(|_| Mutex::new(VecDeque::new())).collect();
        Ok(PyNetPort { shared: Arc::new(NetShared { core, pending, wake }) })
    }

    /// Delivers `frames` to the driver's receive queue of `queue_pair`; returns how many were
    /// accepted (the rest did not fit: back-pressure, try again later). Called from a device
    /// callback on the pair's worker, frames go straight into RX buffers; from anywhere else
    /// they are queued (up to 1024 per pair) for that worker.
    fn send(&self, py: Python<'_>, queue_pair: u16, frames: &Bound<'_, PyAny>) -> PyResult<usize> {
        let shared = &*self.shared;
        if queue_pair >= shared.core.queue_pairs() {
            return Err(PyValueError::new_err(format!(
                "queue pair {queue_pair} does not exist (the device has {})",
                shared.core.queue_pairs()
            )));
        }
        let mut items = Vec::new();
        for item in frames.try_iter()? {
            let o = outgoing(&item?)?;
            if o.len() > vnet::MAX_FRAME_LEN || o.len() < vnet::MIN_FRAME_LEN {
                return Err(PyValueError::new_err(format!(
                    "a frame is {} bytes: frames are {}..={} bytes",
                    o.len(),
                    vnet::MIN_FRAME_LEN,
                    vnet::MAX_FRAME_LEN
                )));
            }
            items.push(o);
        }
        let ctx = CTX.with(|c| c.get()).filter(|c| std::ptr::eq(c.shared, shared) && c.pair == queue_pair);
        let Some(ctx) = ctx else {
            // Not on the pair's worker: queue for it.
            let mut q = shared.pending[usize::from(queue_pair)].lock().unwrap_or_else(|e| e.into_inner());
            let room = PENDING_MAX.saturating_sub(q.len());
            let n = items.len().min(room);
            for o in &items[..n] {
                let frame = o.with_bytes(|b| b.to_vec());
                q.push_back(Pending { header: o.header(), frame });
            }
            drop(q);
            if n > 0 {
                let _ = eventfd::signal(shared.wake[usize::from(queue_pair)].as_fd());
            }
            return Ok(n);
        };
        // SAFETY: the context is set only for the duration of a device callback on this
        // thread, during which the worker lends these rings and nothing else touches them.
        let mut found;
        let rx: &mut RingHandle<'_> = unsafe {
            if ctx.rx.is_null() {
                found = (*ctx.others).get(vnet::rx_queue(queue_pair));
                match found.as_mut() {
                    Some(r) => &mut *(r as *mut RingHandle<'_>),
                    None => return Ok(0),
                }
            } else {
                &mut *ctx.rx
            }
        };
        let (header_len, mrg) = (shared.core.header_len(), shared.core.mrg_rxbuf());
        let (mut n, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        let mut accepted = 0usize;
        for o in &items {
            let outcome = o.with_bytes(|b| deliver(rx, o.header(), header_len, mrg, &[b])).map_err(|e| {
                super::errors::to_pyerr(py, crate::error::Error::Queue { queue: rx.index(), source: e })
            })?;
            match outcome {
                Delivery::Delivered => {
                    n += 1;
                    bytes += o.len() as u64;
                }
                // Never deliverable (bigger than the driver's buffers): dropped and counted.
                Delivery::TooLarge => dropped += 1,
                Delivery::NoBuffers => {
                    // The driver kicks when it adds buffers (the device waits for that).
                    let _ = rx.arm();
                    break;
                }
            }
            accepted += 1;
        }
        shared.count(queue_pair, n, bytes, dropped);
        Ok(accepted)
    }

    /// Counters summed over the queue pairs, or of pair `queue_pair`.
    #[pyo3(signature = (queue_pair=None))]
    fn counters<'py>(&self, py: Python<'py>, queue_pair: Option<u16>) -> PyResult<Bound<'py, PyDict>> {
        let core = &self.shared.core;
        let c = match queue_pair {
            None => core.totals(),
            Some(p) => core.pair_totals(p).ok_or_else(|| PyValueError::new_err("no such queue pair"))?,
        };
        counters_dict(py, &c)
    }

    /// Sets or clears S_LINK_UP in the config space (send CONFIG_CHANGE_MSG afterwards).
    fn set_link(&self, up: bool) {
        self.shared.core.set_link(up);
    }

    /// Sets S_ANNOUNCE (GUEST_ANNOUNCE negotiated; send CONFIG_CHANGE_MSG afterwards). False
    /// when the driver did not negotiate GUEST_ANNOUNCE.
    fn request_announce(&self) -> bool {
        self.shared.core.request_announce()
    }

    /// The config space.
    fn config<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.shared.core.config())
    }

    /// Features offered by default for these options.
    #[getter]
    fn default_features(&self) -> u64 {
        self.shared.core.features()
    }

    /// Virtio features the driver acknowledged.
    #[getter]
    fn acked_features(&self) -> u64 {
        self.shared.core.acked()
    }

    /// The MTU in force.
    #[getter]
    fn mtu(&self) -> u16 {
        self.shared.core.mtu()
    }

    /// Queue pairs the driver uses (VQ_PAIRS_SET).
    #[getter]
    fn active_pairs(&self) -> u16 {
        self.shared.core.active_pairs()
    }

    /// RX filtering state: (flags for PROMISC, ALLMULTI, ALLUNI, NOMULTI, NOUNI, NOBCAST,
    /// unicast MACs, multicast MACs).
    fn rx_mode<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let m = self.shared.core.rx_mode();
        let macs = |v: &[[u8; 6]]| v.iter().map(|m| PyBytes::new(py, m)).collect::<Vec<_>>();
        PyTuple::new(
            py,
            [
                PyTuple::new(py, m.flags)?.into_any(),
                PyList::new(py, macs(&m.unicast))?.into_any(),
                PyList::new(py, macs(&m.multicast))?.into_any(),
            ],
        )
    }
}

/// Adapts a Python ``NetDevice`` to the back-end: rings, control queue and counters in Rust,
/// ``receive`` called once per TX batch (the GIL once per worker wake-up).
/// Tag and format version of a Python net device's state: the core's state, then the device's.
const PY_NET_STATE_TAG: &[u8; 4] = b"VPN1";

pub(crate) struct PyNetDevice {
    obj: Py<PyAny>,
    shared: Arc<NetShared>,
    features: u64,
    /// Methods the class overrides (others are not called at all).
    has_control: bool,
    has_rarp: bool,
    has_events: bool,
    /// The class overrides ``save_state`` and ``load_state``: DEVICE_STATE is offered.
    has_state: bool,
}

fn warn(py: Python<'_>, what: &str, err: &PyErr) {
    super::log::callback_failed(py, "vhostuser_rs::backend", &format!("net device {what}"), err);
}

impl PyNetDevice {
    /// The adapter for `obj`, a ``vhostuser_rs.NetDevice`` whose native port is `port`.
    pub(crate) fn new(py: Python<'_>, obj: Py<PyAny>, port: &Bound<'_, PyNetPort>) -> PyResult<PyNetDevice> {
        let b = obj.bind(py);
        let overrides = |name: &str| -> PyResult<bool> {
            let base = py.import("vhostuser_rs.net")?.getattr("NetDevice")?.getattr(name)?;
            Ok(!b.get_type().getattr(name)?.is(&base))
        };
        let shared = port.get().shared.clone();
        let features = match b.getattr("features")?.extract::<Option<u64>>()? {
            Some(f) => f,
            None => shared.core.features(),
        };
        Ok(PyNetDevice {
            has_control: overrides("control")?,
            has_rarp: overrides("send_rarp")?,
            has_events: overrides("event_fds")?,
            has_state: overrides("save_state")? && overrides("load_state")?,
            features,
            shared,
            obj,
        })
    }

    fn call<'py, A: pyo3::call::PyCallArgs<'py>>(
        &self,
        py: Python<'py>,
        name: &str,
        args: A,
    ) -> Option<Bound<'py, PyAny>> {
        match self.obj.bind(py).call_method1(name, args) {
            Ok(r) => Some(r),
            Err(e) => {
                warn(py, name, &e);
                None
            }
        }
    }

    /// A TX burst of `pair` as ``receive(pair, frames)``, with `send` going straight into the
    /// pair's RX ring meanwhile.
    fn hand_to_python(
        &self,
        pair: u16,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
        others: &mut Rings<'_>,
    ) -> Result<(), VirtqueueError> {
        let header_len = self.shared.core.header_len();
        let memory = queue.memory().clone();
        let (mut frames, mut bytes, mut errors) = (0u64, 0u64, 0u64);
        Python::attach(|py| {
            let mut list = Vec::with_capacity(batch.len());
            for chain in batch.chains() {
                let Ok(len) = check_tx(chain, header_len) else {
                    errors += 1;
                    continue;
                };
                let mut h = [0u8; vnet::HDR_LEN];
                copy_out(batch.readable(chain), 0, &mut h[..header_len]);
                let frame = PyFrame::from_segments(
                    NetHeader::from_bytes(&h[..header_len]),
                    batch.readable(chain),
                    header_len,
                    len,
                    &memory,
                );
                match Bound::new(py, frame) {
                    Ok(f) => list.push(f),
                    Err(_) => errors += 1,
                }
                frames += 1;
                bytes += len as u64;
            }
            if list.is_empty() {
                return;
            }
            let Ok(list) = PyList::new(py, list) else { return };
            let ctx = SendCtx {
                shared: &*self.shared,
                pair,
                rx: std::ptr::null_mut(),
                // SAFETY (of the later use): only dereferenced by `send` during this call.
                others: (others as *mut Rings<'_>).cast::<Rings<'static>>(),
            };
            with_ctx(ctx, || self.call(py, "receive", (pair, list)));
        });
        for chain in batch.chains() {
            queue.complete(batch, chain, 0)?;
        }
        if let Some(c) = self.shared.core.counters(pair) {
            c.count_tx(frames, bytes, errors);
        }
        Ok(())
    }
}

impl NetPort for PyNetDevice {
    fn core(&self) -> &NetCore {
        &self.shared.core
    }
    fn transmit(
        &self,
        pair: u16,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
        others: &mut Rings<'_>,
    ) -> Result<(), VirtqueueError> {
        self.hand_to_python(pair, queue, batch, others)
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        let mut p = ProtocolFeatures::MTU;
        if self.has_rarp {
            p |= ProtocolFeatures::RARP;
        }
        if self.has_state {
            p |= ProtocolFeatures::DEVICE_STATE;
        }
        p
    }
    /// The core's state (config, MTU, pairs in use, RX filters), then the Python device's own.
    fn save_state(&self) -> Result<Vec<u8>, String> {
        if !self.has_state {
            return Err("the device does not implement save_state and load_state".into());
        }
        let core = self.shared.core.save_state();
        let own = super::device::call_with_stream(&self.obj, "save_state", &[])?;
        Ok(StateWriter::new(PY_NET_STATE_TAG).u64(core.len() as u64).bytes(&core).bytes(&own).finish())
    }
    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        if !self.has_state {
            return Err("the device does not implement save_state and load_state".into());
        }
        let mut r = StateReader::new(state, PY_NET_STATE_TAG)?;
        let n = usize::try_from(r.u64()?).map_err(|_| "the core state length does not fit".to_string())?;
        let core = r.bytes(n)?;
        let own = r.rest();
        self.shared.core.load_state(core)?;
        super::device::call_with_stream(&self.obj, "load_state", own).map(|_| ())
    }
    fn device_request(&self, request: DeviceRequest) -> Result<(), String> {
        match request {
            DeviceRequest::NetSetMtu(mtu) => {
                let ok = Python::attach(|py| self.call(py, "set_mtu", (mtu,)).map(|r| r.is_truthy().unwrap_or(false)));
                if ok != Some(true) {
                    return Err("the device refused the MTU".into());
                }
                self.shared.core.set_mtu(request)
            }
            DeviceRequest::SendRarp(mac) if self.has_rarp => Python::attach(|py| {
                self.call(py, "send_rarp", (PyBytes::new(py, &mac),))
                    .map(|_| ())
                    .ok_or_else(|| "send_rarp failed".into())
            }),
            DeviceRequest::SendRarp(_) => Err("SEND_RARP is not implemented by this device".into()),
        }
    }
    fn reset(&self) {
        Python::attach(|py| {
            self.call(py, "reset", ());
        });
    }
    fn queue_started(&self, queue_index: u16) {
        Python::attach(|py| {
            self.call(py, "queue_started", (queue_index,));
        });
    }
    fn queue_stopped(&self, queue_index: u16) {
        Python::attach(|py| {
            self.call(py, "queue_stopped", (queue_index,));
        });
    }
    fn wake_scope(&self, run: &mut dyn FnMut()) {
        Python::attach(|_| run());
    }
    fn rx_fds(&self, pair: u16) -> Vec<RawFd> {
        let mut fds = vec![self.shared.wake[usize::from(pair)].as_raw_fd()];
        if self.has_events {
            Python::attach(|py| {
                if let Some(r) = self.call(py, "event_fds", (pair,)) {
                    match r.extract::<Vec<RawFd>>() {
                        Ok(v) => fds.extend(v.into_iter().filter(|&fd| fd >= 0)),
                        Err(e) => warn(py, "event_fds", &e),
                    }
                }
            });
        }
        fds
    }
    fn rx_event(
        &self,
        pair: u16,
        fd: RawFd,
        rx: &mut RingHandle<'_>,
        others: &mut Rings<'_>,
    ) -> Result<bool, VirtqueueError> {
        if fd == self.shared.wake[usize::from(pair)].as_raw_fd() {
            return self.shared.flush_pending(pair, rx);
        }
        let ctx = SendCtx {
            shared: &*self.shared,
            pair,
            rx: (rx as *mut RingHandle<'_>).cast::<RingHandle<'static>>(),
            others: (others as *mut Rings<'_>).cast::<Rings<'static>>(),
        };
        let keep = with_ctx(ctx, || {
            Python::attach(|py| self.call(py, "on_event", (pair, fd)).map(|r| r.is_truthy().unwrap_or(false)))
        });
        Ok(keep.unwrap_or(false))
    }
    fn control(&self, queue: &mut AnyDeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError> {
        if !self.has_control {
            return self.shared.core.control(queue, batch);
        }
        let hook = |class: u8, command: u8, data: &[u8]| -> Option<bool> {
            Python::attach(|py| {
                let r = self.call(py, "control", (class, command, PyBytes::new(py, data)))?;
                if r.is_none() {
                    None
                } else {
                    Some(r.is_truthy().unwrap_or(false))
                }
            })
        };
        self.shared.core.control_with(queue, batch, &hook)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyNetPort>()?;
    m.add_class::<PyNetHeader>()?;
    m.add_class::<PyFrame>()?;
    Ok(())
}
