//! `DriverQueue` (front-end side, split or packed), `DeviceQueue` and `DescriptorChain` (back-end side).

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyMemoryView};

use super::errors::to_pyerr;
use super::memory::{GuestBuffer, PyDirtyLog, PyGuestMemory};
use crate::error::Error;
use crate::memory::MemoryTable;
use crate::virtqueue::{
    AnyDeviceQueue, AnyDriverQueue, Buffer, ChainBatch, DeviceQueue, DriverQueue, PackedBase, PackedDeviceQueue,
    PackedDriverQueue, PackedQueueConfig, QueueConfig, RingAddressSpace, VirtqueueError,
};

fn queue_err(py: Python<'_>, queue: u16, e: VirtqueueError) -> PyErr {
    to_pyerr(py, Error::Queue { queue, source: e })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The driver side of a ring in this process's guest memory (front-end role), split or packed
/// (``packed=True``, VIRTIO_F_RING_PACKED): add chains of buffers, publish them, decide on
/// kicks, reap what the device used. Both formats behind one class: code written against one
/// runs on the other, only the meaning of the numbers differs (a head index or a buffer id;
/// an avail index or a packed position).
#[pyclass(module = "vhostuser_rs", name = "DriverQueue", frozen)]
pub(crate) struct PyDriverQueue {
    pub(crate) inner: Mutex<AnyDriverQueue>,
    index: u16,
}

#[pymethods]
impl PyDriverQueue {
    /// Allocates a ring of `size` entries in `memory`: a split ring (size a power of two) or,
    /// with `packed`, a packed ring (any size up to 32768). With `indirect_max` > 0, room for an
    /// indirect table of that many descriptors per head (per buffer id) is allocated too.
    #[new]
    #[pyo3(signature = (memory, size, *, event_idx=false, indirect_max=0, index=0, packed=false))]
    fn new(
        py: Python<'_>,
        memory: &PyGuestMemory,
        size: u16,
        event_idx: bool,
        indirect_max: u16,
        index: u16,
        packed: bool,
    ) -> PyResult<PyDriverQueue> {
        let mem = memory.inner.clone();
        let q = if packed {
            PackedDriverQueue::allocate(mem, size, event_idx, indirect_max).map(AnyDriverQueue::Packed)
        } else {
            DriverQueue::allocate(mem, size, event_idx, indirect_max).map(AnyDriverQueue::Split)
        }
        .map_err(|e| queue_err(py, index, e))?;
        Ok(PyDriverQueue { inner: Mutex::new(q), index })
    }

    /// Adds one chain: device-readable ``(addr, len)`` buffers, then device-writable ones.
    /// Returns its head (split) or buffer id (packed). Not visible to the device until
    /// :meth:`publish`.
    #[pyo3(signature = (readable=Vec::new(), writable=Vec::new(), *, indirect=false))]
    fn add(&self, py: Python<'_>, readable: Vec<Buffer>, writable: Vec<Buffer>, indirect: bool) -> PyResult<u16> {
        let mut q = lock(&self.inner);
        let r = if indirect { q.add_indirect(&readable, &writable) } else { q.add(&readable, &writable) };
        r.map_err(|e| queue_err(py, self.index, e))
    }

    /// Adds many chains ``[(readable, writable), ...]`` in one call; returns their heads (ids).
    #[pyo3(signature = (chains, *, indirect=false))]
    fn add_batch(&self, py: Python<'_>, chains: Vec<(Vec<Buffer>, Vec<Buffer>)>, indirect: bool) -> PyResult<Vec<u16>> {
        let mut q = lock(&self.inner);
        chains
            .iter()
            .map(|(r, w)| if indirect { q.add_indirect(r, w) } else { q.add(r, w) })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| queue_err(py, self.index, e))
    }

    /// Makes the added chains visible with one release store (split: avail.idx; packed: the
    /// flags of the first descriptor added since the last publish).
    fn publish(&self) {
        lock(&self.inner).publish();
    }

    /// Whether the device wants a kick for what was published since the last call (split:
    /// NO_NOTIFY or avail_event; packed: the device event suppression area, whose malformed
    /// contents raise ``VirtqueueError``).
    fn kick_needed(&self, py: Python<'_>) -> PyResult<bool> {
        lock(&self.inner).kick_needed().map_err(|e| queue_err(py, self.index, e))
    }

    /// Used entries as ``(head or id, written_len)``, at most `max`. Raises ``VirtqueueError``
    /// if the device returned something not in flight or claimed more bytes than a chain can
    /// hold.
    #[pyo3(signature = (max=None))]
    fn reap(&self, py: Python<'_>, max: Option<usize>) -> PyResult<Vec<(u16, u32)>> {
        let mut q = lock(&self.inner);
        let mut out = Vec::new();
        q.reap(&mut out, max.unwrap_or(usize::MAX)).map_err(|e| queue_err(py, self.index, e))?;
        Ok(out)
    }

    /// Asks the device for interrupts (call notifications) or not.
    fn set_interrupts(&self, enabled: bool) {
        lock(&self.inner).set_interrupts(enabled);
    }

    /// Restarts from the base GET_VRING_BASE returned (forgets chains in flight). Packed: the
    /// avail half of the packed encoding (bits 0–14 slot, bit 15 wrap counter) is used.
    fn reset_to(&self, py: Python<'_>, base: u32) -> PyResult<()> {
        lock(&self.inner).reset_to(base).map_err(|e| queue_err(py, self.index, e))
    }

    /// Prepares the ring, with its chains in flight, for a new back-end (the old one died
    /// without answering GET_VRING_BASE) and returns the SET_VRING_BASE value to send. Split:
    /// ``used.idx`` as the device last published it. Packed: the chains still in flight are
    /// written again after the used descriptors not reaped yet (the old device may have
    /// overwritten them), and both halves of the base name that position.
    fn hand_over(&self, py: Python<'_>) -> PyResult<u32> {
        lock(&self.inner).hand_over().map_err(|e| queue_err(py, self.index, e))
    }

    /// Whether this is a packed ring.
    #[getter]
    fn packed(&self) -> bool {
        lock(&self.inner).is_packed()
    }

    /// Ring size.
    #[getter]
    fn size(&self) -> u16 {
        lock(&self.inner).size()
    }

    /// Ring index this queue is used as.
    #[getter]
    fn index(&self) -> u16 {
        self.index
    }

    /// Free descriptors (packed: free ring slots).
    #[getter]
    fn num_free(&self) -> u16 {
        lock(&self.inner).num_free()
    }

    /// Chains added and not reaped.
    #[getter]
    fn in_flight(&self) -> u16 {
        lock(&self.inner).in_flight()
    }

    /// What SET_VRING_BASE sends for where the driver stands: split, the next avail index;
    /// packed, bits 0–14 the next available slot, bit 15 its wrap counter, bits 16–30 the next
    /// used slot, bit 31 its wrap counter.
    #[getter]
    fn vring_base(&self) -> u32 {
        lock(&self.inner).vring_base()
    }

    /// The next available index (split), or the next available position encoded as in the
    /// vring base's low half (packed: slot | wrap counter << 15).
    #[getter]
    fn avail_idx(&self) -> u16 {
        lock(&self.inner).vring_base() as u16
    }

    /// Split: ``used.idx`` as the device last published it, read from the ring. Packed: the
    /// next used position the driver expects (slot | wrap counter << 15).
    #[getter]
    fn used_idx(&self) -> u16 {
        match &*lock(&self.inner) {
            AnyDriverQueue::Split(q) => q.used_idx(),
            AnyDriverQueue::Packed(q) => q.last_used().encode(),
        }
    }

    /// Guest addresses of the ring parts: split ``(desc, avail, used)``; packed ``(descriptor
    /// ring, driver event area, device event area)``.
    #[getter]
    fn guest_addrs(&self) -> (u64, u64, u64) {
        lock(&self.inner).guest_addrs()
    }

    /// This process's addresses of the same three parts: what SET_VRING_ADDR sends (as its
    /// desc, avail and used fields).
    #[getter]
    fn user_addrs(&self) -> (u64, u64, u64) {
        lock(&self.inner).user_addrs()
    }

    /// SET_VRING_ADDR's ``log_guest_addr``: the guest address of what the device writes when it
    /// returns buffers (split: the used ring; packed: the descriptor ring).
    #[getter]
    fn log_guest_addr(&self) -> u64 {
        lock(&self.inner).log_guest_addr()
    }
}

#[derive(Clone, Copy)]
struct SegmentView {
    ptr: *mut u8,
    len: u32,
    gpa: u64,
}

// SAFETY: ptr points into a mapping of the chain's `memory`, which the chain keeps alive.
unsafe impl Send for SegmentView {}
// SAFETY: as above; access goes through memoryviews and raw copies.
unsafe impl Sync for SegmentView {}

/// A chain popped by a ``DeviceQueue``: its head and its buffers as zero-copy memoryviews
/// (device-readable ones read-only). Guest memory is volatile: copy headers before checking them.
#[pyclass(module = "vhostuser_rs", name = "DescriptorChain", frozen)]
pub(crate) struct PyDescriptorChain {
    head: u16,
    /// Every segment, readable first: one allocation per chain.
    segments: Box<[SegmentView]>,
    num_readable: usize,
    readable_len: u32,
    writable_len: u32,
    /// Keeps every mapping the segments point into alive.
    memory: Arc<MemoryTable>,
}

impl PyDescriptorChain {
    fn readable_segs(&self) -> &[SegmentView] {
        &self.segments[..self.num_readable]
    }

    fn writable_segs(&self) -> &[SegmentView] {
        &self.segments[self.num_readable..]
    }

    fn views<'py>(
        &self,
        py: Python<'py>,
        segs: &[SegmentView],
        readonly: bool,
    ) -> PyResult<Vec<Bound<'py, PyMemoryView>>> {
        segs.iter()
            .map(|s| {
                let owner = self.memory.clone() as Arc<dyn std::any::Any + Send + Sync>;
                GuestBuffer::view(py, GuestBuffer::new(owner, s.ptr, s.len as usize, readonly))
            })
            .collect()
    }
}

#[pymethods]
impl PyDescriptorChain {
    /// Head descriptor index (what the used entry returns).
    #[getter]
    fn head(&self) -> u16 {
        self.head
    }

    /// Total bytes of the device-readable buffers.
    #[getter]
    fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total bytes of the device-writable buffers.
    #[getter]
    fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// The device-readable buffers, one read-only memoryview per contiguous piece.
    #[getter]
    fn readable<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyMemoryView>>> {
        self.views(py, self.readable_segs(), true)
    }

    /// The device-writable buffers, one writable memoryview per contiguous piece.
    #[getter]
    fn writable<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyMemoryView>>> {
        self.views(py, self.writable_segs(), false)
    }

    /// A copy of the readable bytes, concatenated (up to `n` bytes).
    #[pyo3(signature = (n=None))]
    fn read<'py>(&self, py: Python<'py>, n: Option<usize>) -> Bound<'py, PyBytes> {
        let want = n.unwrap_or(self.readable_len as usize).min(self.readable_len as usize);
        let mut out = Vec::with_capacity(want);
        for s in self.readable_segs() {
            if out.len() >= want {
                break;
            }
            let take = (s.len as usize).min(want - out.len());
            let at = out.len();
            out.resize(at + take, 0);
            // SAFETY: s.ptr..+take lies in the mapping s keeps alive.
            unsafe { std::ptr::copy_nonoverlapping(s.ptr, out.as_mut_ptr().add(at), take) };
        }
        PyBytes::new(py, &out)
    }

    /// Scatters `data` into the writable buffers starting at byte `offset`; returns the bytes
    /// written (fewer if the buffers are too small).
    #[pyo3(signature = (data, offset=0))]
    fn write(&self, data: &[u8], offset: usize) -> usize {
        let spans = self.writable_segs().iter().map(|s| (s.ptr, s.len as usize));
        crate::virtqueue::for_each_span(spans, offset, data.len(), |host, at, n| {
            // SAFETY: host..+n lies in the mapping the segment keeps alive, at..+n in `data`.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(at), host, n) }
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "<vhostuser_rs.DescriptorChain head={} readable={}B writable={}B>",
            self.head, self.readable_len, self.writable_len
        )
    }
}

/// The chains of `batch` as Python objects (they keep `memory`'s mappings alive).
pub(crate) fn chains_from_batch(batch: &ChainBatch, memory: &Arc<MemoryTable>) -> Vec<PyDescriptorChain> {
    batch
        .chains()
        .iter()
        .map(|c| PyDescriptorChain {
            head: c.head,
            segments: batch.segments(c).iter().map(|s| SegmentView { ptr: s.host, len: s.len, gpa: s.gpa }).collect(),
            num_readable: batch.readable(c).len(),
            readable_len: c.readable_len,
            writable_len: c.writable_len,
            memory: memory.clone(),
        })
        .collect()
}

impl PyDescriptorChain {
    pub(crate) fn head_index(&self) -> u16 {
        self.head
    }

    pub(crate) fn writable_capacity(&self) -> u32 {
        self.writable_len
    }

    pub(crate) fn writable_gpas(&self) -> Vec<(u64, u32)> {
        self.writable_segs().iter().map(|s| (s.gpa, s.len)).collect()
    }
}

struct DeviceState {
    queue: AnyDeviceQueue,
    batch: ChainBatch,
}

/// The device side of a split or packed ring (back-end role): pop chains in batches, complete
/// them, publish the used entries once per batch, and notify per EVENT_IDX / NO_INTERRUPT
/// (split) or the driver's event suppression structure (packed).
#[pyclass(module = "vhostuser_rs", name = "DeviceQueue", frozen)]
pub(crate) struct PyDeviceQueue {
    inner: Mutex<DeviceState>,
    index: u16,
}

impl PyDeviceQueue {
    fn pop_chains(&self, py: Python<'_>, max: usize) -> PyResult<Vec<PyDescriptorChain>> {
        let mut st = lock(&self.inner);
        let DeviceState { queue, batch } = &mut *st;
        batch.clear();
        let popped = queue.pop_batch(batch, max);
        let chains = chains_from_batch(batch, queue.memory());
        match popped {
            // Chains popped before a malformed one are still returned; the next call reports
            // the broken queue.
            Err(e) if chains.is_empty() => Err(queue_err(py, self.index, e)),
            _ => Ok(chains),
        }
    }

    fn complete_one(
        &self,
        py: Python<'_>,
        st: &mut DeviceState,
        chain: &PyDescriptorChain,
        written: u32,
    ) -> PyResult<()> {
        if written > chain.writable_len {
            return Err(PyValueError::new_err(format!(
                "written ({written}) exceeds the chain's writable bytes ({})",
                chain.writable_len
            )));
        }
        st.queue
            .complete_with(chain.head, chain.writable_segs().iter().map(|s| (s.gpa, s.len)), written)
            .map_err(|e| queue_err(py, self.index, e))
    }
}

#[pymethods]
impl PyDeviceQueue {
    /// Sets a ring up over `memory`. Addresses are guest physical (``address_space="guest"``)
    /// or the front-end's user addresses of SET_VRING_ADDR (``"user"``). Each ring part must lie
    /// inside one mapped region. Split (default): the size must be a power of two ≤ 32768 and
    /// `next_avail` is SET_VRING_BASE's index. ``packed=True`` (VIRTIO_F_RING_PACKED): any
    /// size ≤ 32768; as in SET_VRING_ADDR, `desc_addr` is the descriptor ring, `avail_addr`
    /// the driver event suppression area and `used_addr` the device's; `base` is
    /// SET_VRING_BASE's packed encoding (bits 0-14 next avail slot, 15 its wrap counter, 16-30
    /// next used slot, 31 its wrap counter; default: a fresh ring, ``0x80008000``).
    #[new]
    #[pyo3(signature = (memory, size, *, desc_addr, avail_addr, used_addr, address_space="guest", event_idx=false, indirect=false, next_avail=0, index=0, packed=false, base=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        memory: &PyGuestMemory,
        size: u16,
        desc_addr: u64,
        avail_addr: u64,
        used_addr: u64,
        address_space: &str,
        event_idx: bool,
        indirect: bool,
        next_avail: u16,
        index: u16,
        packed: bool,
        base: Option<u32>,
    ) -> PyResult<PyDeviceQueue> {
        let addr_space = match address_space {
            "guest" => RingAddressSpace::Guest,
            "user" => RingAddressSpace::User,
            _ => return Err(PyValueError::new_err("address_space must be 'guest' or 'user'")),
        };
        let table = Arc::new(memory.inner.table().clone());
        let queue = if packed {
            let base = base.map_or(PackedBase::START, PackedBase::decode);
            let cfg = PackedQueueConfig {
                size,
                desc_addr,
                driver_event_addr: avail_addr,
                device_event_addr: used_addr,
                addr_space,
                event_idx,
                indirect,
                base,
            };
            PackedDeviceQueue::new(table, cfg).map(AnyDeviceQueue::Packed)
        } else {
            if base.is_some() {
                return Err(PyValueError::new_err("base is for packed rings; a split ring takes next_avail"));
            }
            let cfg =
                QueueConfig { size, desc_addr, avail_addr, used_addr, addr_space, event_idx, indirect, next_avail };
            DeviceQueue::new(table, cfg).map(AnyDeviceQueue::Split)
        };
        let queue = queue.map_err(|e| queue_err(py, index, e))?;
        let state = DeviceState { queue, batch: ChainBatch::new() };
        Ok(PyDeviceQueue { inner: Mutex::new(state), index })
    }

    /// Pops up to `max` available chains. Raises ``VirtqueueError`` (and stops the queue) on a
    /// malformed ring; the process is unharmed.
    #[pyo3(signature = (max=32))]
    fn pop(&self, py: Python<'_>, max: usize) -> PyResult<Vec<PyDescriptorChain>> {
        self.pop_chains(py, max)
    }

    /// Completes `chain` with `written` bytes in its writable buffers (not visible to the driver
    /// until :meth:`publish`).
    /// With a dirty log set, every writable buffer of the chain is logged whole (the device
    /// may have written past `written`, as virtio-blk does with its status byte).
    fn complete(&self, py: Python<'_>, chain: &PyDescriptorChain, written: u32) -> PyResult<()> {
        let mut st = lock(&self.inner);
        self.complete_one(py, &mut st, chain, written)
    }

    /// Completes many ``(chain, written)`` pairs in one call.
    fn complete_batch(&self, py: Python<'_>, done: Vec<(PyRef<'_, PyDescriptorChain>, u32)>) -> PyResult<()> {
        let mut st = lock(&self.inner);
        for (chain, written) in &done {
            self.complete_one(py, &mut st, chain, *written)?;
        }
        Ok(())
    }

    /// Publishes the used entries (one release store) and says whether the driver must be
    /// notified (write the call eventfd).
    fn publish(&self, py: Python<'_>) -> PyResult<bool> {
        lock(&self.inner).queue.publish_used().map_err(|e| queue_err(py, self.index, e))
    }

    /// Re-arms kicks; ``True`` means chains arrived meanwhile (drain again before sleeping).
    fn enable_notifications(&self, py: Python<'_>) -> PyResult<bool> {
        lock(&self.inner).queue.enable_notifications().map_err(|e| queue_err(py, self.index, e))
    }

    /// Asks the driver not to kick while the device polls.
    fn disable_notifications(&self, py: Python<'_>) -> PyResult<()> {
        lock(&self.inner).queue.disable_notifications().map_err(|e| queue_err(py, self.index, e))
    }

    /// The disable → drain → enable → re-check loop: calls ``handler(chains)`` with each batch;
    /// it returns the bytes written into each chain (same order). Returns whether the driver
    /// must be notified. No Rust lock is held while the handler runs.
    #[pyo3(signature = (handler, *, max_batch=32))]
    fn process(&self, py: Python<'_>, handler: &Bound<'_, PyAny>, max_batch: usize) -> PyResult<bool> {
        let mut notify = false;
        loop {
            self.disable_notifications(py)?;
            loop {
                let chains = self.pop_chains(py, max_batch)?;
                if chains.is_empty() {
                    break;
                }
                let objs: Vec<Bound<'_, PyDescriptorChain>> =
                    chains.into_iter().map(|c| Bound::new(py, c)).collect::<PyResult<_>>()?;
                let list = PyList::new(py, &objs)?;
                let written: Vec<u32> = handler.call1((list,))?.extract()?;
                if written.len() != objs.len() {
                    return Err(PyValueError::new_err("the handler must return one written length per chain"));
                }
                let mut st = lock(&self.inner);
                for (chain, w) in objs.iter().zip(written) {
                    self.complete_one(py, &mut st, chain.get(), w)?;
                }
                notify |= st.queue.publish_used().map_err(|e| queue_err(py, self.index, e))?;
            }
            if !self.enable_notifications(py)? {
                return Ok(notify);
            }
        }
    }

    /// LOG_ALL: log writes into guest buffers in `log`; with `used_log_addr` (the ring's
    /// log_guest_addr), also log used-ring writes. ``None`` stops logging.
    #[pyo3(signature = (log=None, used_log_addr=None))]
    fn set_dirty_log(&self, log: Option<&PyDirtyLog>, used_log_addr: Option<u64>) {
        let data = log.map(|l| l.inner.clone());
        let used = match (log, used_log_addr) {
            (Some(l), Some(a)) => Some((l.inner.clone(), a)),
            _ => None,
        };
        lock(&self.inner).queue.set_dirty_log(data, used);
    }

    /// Ring index.
    #[getter]
    fn index(&self) -> u16 {
        self.index
    }

    /// Ring size.
    #[getter]
    fn size(&self) -> u16 {
        lock(&self.inner).queue.size()
    }

    /// Split: the next available index; packed: the next available slot with its wrap counter
    /// in bit 15.
    #[getter]
    fn next_avail(&self) -> u16 {
        lock(&self.inner).queue.avail_mark()
    }

    /// Split: the next used index; packed: the next used slot with its wrap counter in bit 15.
    #[getter]
    fn next_used(&self) -> u16 {
        lock(&self.inner).queue.used_mark()
    }

    /// GET_VRING_BASE's answer in the ring's format (split: the next available index; packed:
    /// ``next_avail | next_used << 16``).
    #[getter]
    fn vring_base(&self) -> u32 {
        lock(&self.inner).queue.vring_base()
    }

    /// Whether this is a packed ring.
    #[getter]
    fn packed(&self) -> bool {
        lock(&self.inner).queue.is_packed()
    }

    /// Chains popped and not completed.
    #[getter]
    fn in_flight(&self) -> u16 {
        lock(&self.inner).queue.in_flight()
    }

    /// Whether a malformed ring stopped this queue.
    #[getter]
    fn is_broken(&self) -> bool {
        lock(&self.inner).queue.is_broken()
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDriverQueue>()?;
    m.add_class::<PyDeviceQueue>()?;
    m.add_class::<PyDescriptorChain>()?;
    Ok(())
}
