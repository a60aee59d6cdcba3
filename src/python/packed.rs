//! `PackedDeviceQueue`: the device side of a packed ring (back-end role) for tests and tools,
//! with the method set of `DeviceQueue` so code written against one runs on the other. A
//! sibling class rather than a flag on `DeviceQueue`: its constructor takes different ring parts
//! (descriptor ring, driver and device event suppression areas) and a base of another shape.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use super::errors::to_pyerr;
use super::memory::{PyDirtyLog, PyGuestMemory};
use super::virtqueue::{chains_from_batch, PyDescriptorChain};
use crate::error::Error;
use crate::virtqueue::{
    ChainBatch, PackedBase, PackedDeviceQueue, PackedQueueConfig, RingAddressSpace, VirtqueueError,
};

fn queue_err(py: Python<'_>, queue: u16, e: VirtqueueError) -> PyErr {
    to_pyerr(py, Error::Queue { queue, source: e })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct State {
    queue: PackedDeviceQueue,
    batch: ChainBatch,
}

/// The device side of a packed ring (back-end role): pop chains in batches (``head`` is the
/// buffer id), complete them in any order, publish the used descriptors once per batch, and
/// notify per the driver's event suppression structure.
#[pyclass(module = "vhostuser_rs", name = "PackedDeviceQueue", frozen)]
pub(crate) struct PyPackedDeviceQueue {
    inner: Mutex<State>,
    index: u16,
}

impl PyPackedDeviceQueue {
    fn pop_chains(&self, py: Python<'_>, max: usize) -> PyResult<Vec<PyDescriptorChain>> {
        let mut st = lock(&self.inner);
        let State { queue, batch } = &mut *st;
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

    fn complete_one(&self, py: Python<'_>, st: &mut State, chain: &PyDescriptorChain, written: u32) -> PyResult<()> {
        if written > chain.writable_capacity() {
            return Err(PyValueError::new_err(format!(
                "written ({written}) exceeds the chain's writable bytes ({})",
                chain.writable_capacity()
            )));
        }
        st.queue
            .complete_with(chain.head_index(), chain.writable_gpas(), written)
            .map_err(|e| queue_err(py, self.index, e))
    }
}

#[pymethods]
impl PyPackedDeviceQueue {
    /// Sets a packed ring up over `memory`: the descriptor ring and the driver and device event
    /// suppression areas (SET_VRING_ADDR's desc, avail and used fields for a packed ring), guest
    /// physical (``address_space="guest"``) or the front-end's user addresses (``"user"``). Any
    /// size up to 32768. `base` is SET_VRING_BASE's packed encoding (default: both positions at
    /// slot 0 with wrap counter 1).
    #[new]
    #[pyo3(signature = (memory, size, *, desc_addr, driver_event_addr, device_event_addr, address_space="guest", event_idx=false, indirect=false, base=0x8000_8000, index=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        memory: &PyGuestMemory,
        size: u16,
        desc_addr: u64,
        driver_event_addr: u64,
        device_event_addr: u64,
        address_space: &str,
        event_idx: bool,
        indirect: bool,
        base: u32,
        index: u16,
    ) -> PyResult<PyPackedDeviceQueue> {
        let addr_space = match address_space {
            "guest" => RingAddressSpace::Guest,
            "user" => RingAddressSpace::User,
            _ => return Err(PyValueError::new_err("address_space must be 'guest' or 'user'")),
        };
        let base = PackedBase::decode(base);
        let cfg = PackedQueueConfig {
            size,
            desc_addr,
            driver_event_addr,
            device_event_addr,
            addr_space,
            event_idx,
            indirect,
            base,
        };
        let table = Arc::new(memory.inner.table().clone());
        let queue = PackedDeviceQueue::new(table, cfg).map_err(|e| queue_err(py, index, e))?;
        Ok(PyPackedDeviceQueue { inner: Mutex::new(State { queue, batch: ChainBatch::new() }), index })
    }

    /// Pops up to `max` available chains. Raises ``VirtqueueError`` (and stops the queue) on a
    /// malformed ring; the process is unharmed.
    #[pyo3(signature = (max=32))]
    fn pop(&self, py: Python<'_>, max: usize) -> PyResult<Vec<PyDescriptorChain>> {
        self.pop_chains(py, max)
    }

    /// Completes `chain` with `written` bytes in its writable buffers (not visible to the driver
    /// until :meth:`publish`). Chains may be completed in any order.
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

    /// Publishes the used descriptors (one release store of the first one's flags) and says
    /// whether the driver must be notified (write the call eventfd).
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
    /// log_guest_addr), also log the used descriptors written into the ring. ``None`` stops.
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

    /// GET_VRING_BASE's answer: bits 0–14 the next available slot, bit 15 the driver wrap
    /// counter, bits 16–30 the next used slot, bit 31 the device wrap counter.
    #[getter]
    fn base(&self) -> u32 {
        lock(&self.inner).queue.base().encode()
    }

    /// The next available position (slot | wrap counter << 15): the low half of :attr:`base`.
    #[getter]
    fn next_avail(&self) -> u16 {
        lock(&self.inner).queue.base().avail.encode()
    }

    /// The next used position (slot | wrap counter << 15): the high half of :attr:`base`.
    #[getter]
    fn next_used(&self) -> u16 {
        lock(&self.inner).queue.base().used.encode()
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
    m.add_class::<PyPackedDeviceQueue>()
}
