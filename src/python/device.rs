//! Python-written devices for the back-end role: the `Device` trait implemented by calling a
//! Python object, once per batch (the GIL is taken once per worker wake-up, never per chain).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use super::errors::to_pyerr;
use super::virtqueue::{chains_from_batch, PyDescriptorChain};
use crate::backend::Device;
use crate::error::Error;
use std::os::fd::RawFd;

use crate::backend::{RingHandle, Rings};
use crate::virtqueue::{AnyDeviceQueue, ChainBatch, KeptChains, VirtqueueError};

/// A device hook's exception as a refusal: NotImplementedError quietly (the device does not
/// implement that request), anything else logged as a warning.
fn refused(py: Python<'_>, what: &str, e: &PyErr) -> String {
    if !e.is_instance_of::<pyo3::exceptions::PyNotImplementedError>(py) {
        warn(py, what, e);
    }
    e.to_string()
}

fn warn(py: Python<'_>, what: &str, err: &PyErr) {
    super::log::callback_failed(py, "vhostuser_rs::backend", &format!("device {what}"), err);
}

/// The queue handed to ``Device.process``: completes chains of the batch being processed. Valid
/// only during that call.
#[pyclass(module = "vhostuser_rs", name = "BatchQueue", frozen)]
pub(crate) struct BatchQueue {
    queue: usize,
    valid: AtomicBool,
    index: u16,
    completed: Mutex<HashSet<u16>>,
    /// Chains ``defer`` kept for later (completed from ``on_event`` through a ``RingQueue``).
    deferred: Mutex<HashSet<u16>>,
    /// Whether this device can complete chains later (it watches fds of its own).
    can_defer: bool,
}

// SAFETY: `queue` points at the AnyDeviceQueue the worker lends for the duration of one
// `process` call; `valid` is cleared before the worker uses the queue again.
unsafe impl Send for BatchQueue {}
// SAFETY: as above; access is serialised by the GIL and the `completed` mutex.
unsafe impl Sync for BatchQueue {}

#[pymethods]
impl BatchQueue {
    /// Completes `chain` with `written` bytes in its writable buffers. While QEMU logs dirty
    /// pages (LOG_ALL) every writable buffer of the chain is logged whole: the device may have
    /// written anywhere in its views (the virtio-blk status byte is the last one).
    fn complete(&self, py: Python<'_>, chain: &PyDescriptorChain, written: u32) -> PyResult<()> {
        if !self.valid.load(Ordering::Acquire) {
            return Err(PyRuntimeError::new_err("the batch is over: complete chains inside process()"));
        }
        if written > chain.writable_capacity() {
            return Err(PyValueError::new_err("written exceeds the chain's writable bytes"));
        }
        if self.deferred.lock().unwrap_or_else(|e| e.into_inner()).contains(&chain.head_index()) {
            return Err(PyValueError::new_err("chain was deferred: complete it from on_event()"));
        }
        let mut done = self.completed.lock().unwrap_or_else(|e| e.into_inner());
        if !done.insert(chain.head_index()) {
            return Err(PyValueError::new_err("chain already completed"));
        }
        // SAFETY: valid is set: the worker is blocked in process() and lent us the queue.
        let queue = unsafe { &mut *(self.queue as *mut AnyDeviceQueue) };
        queue
            .complete_with(chain.head_index(), chain.writable_gpas(), written)
            .map_err(|e| to_pyerr(py, Error::Queue { queue: self.index, source: e }))
    }

    /// Keeps `chain` in flight past this batch (deferred completion): complete it later with
    /// ``RingQueue.complete`` from ``on_event``, when the I/O it waits for is done. Needs a
    /// device that watches an fd of its own (``event_fds``).
    fn defer(&self, chain: &PyDescriptorChain) -> PyResult<()> {
        if !self.valid.load(Ordering::Acquire) {
            return Err(PyRuntimeError::new_err("the batch is over: defer chains inside process()"));
        }
        if !self.can_defer {
            return Err(PyRuntimeError::new_err(
                "deferring needs event_fds(): the device completes deferred chains from on_event()",
            ));
        }
        if self.completed.lock().unwrap_or_else(|e| e.into_inner()).contains(&chain.head_index()) {
            return Err(PyValueError::new_err("chain already completed"));
        }
        self.deferred.lock().unwrap_or_else(|e| e.into_inner()).insert(chain.head_index());
        Ok(())
    }

    /// The ring index.
    #[getter]
    fn index(&self) -> u16 {
        self.index
    }
}

/// The ring handed to ``Device.on_event``: completes chains deferred by earlier batches. Valid
/// only during that call (the worker lends the ring).
#[pyclass(module = "vhostuser_rs", name = "RingQueue", frozen)]
pub(crate) struct RingQueue {
    ring: usize,
    valid: AtomicBool,
    index: u16,
}

// SAFETY: `ring` points at the RingHandle the worker lends for one `on_event` call; `valid` is
// cleared before that call returns.
unsafe impl Send for RingQueue {}
// SAFETY: as above; access is serialised by the GIL.
unsafe impl Sync for RingQueue {}

#[pymethods]
impl RingQueue {
    /// Completes a deferred `chain` with `written` bytes; the used ring is published (and the
    /// driver notified) once when the worker's wake-up ends.
    fn complete(&self, py: Python<'_>, chain: &PyDescriptorChain, written: u32) -> PyResult<()> {
        if !self.valid.load(Ordering::Acquire) {
            return Err(PyRuntimeError::new_err("on_event() is over: complete deferred chains inside it"));
        }
        if written > chain.writable_capacity() {
            return Err(PyValueError::new_err("written exceeds the chain's writable bytes"));
        }
        // SAFETY: valid is set: the worker is blocked in on_event() and lent us the ring.
        let ring = unsafe { &mut *(self.ring as *mut RingHandle<'static>) };
        let Some(kept) = ring.kept().take_head(chain.head_index()) else {
            return Err(PyValueError::new_err(
                "chain is not deferred on this ring (completed already, or the ring restarted since)",
            ));
        };
        ring.complete(kept, written).map_err(|e| to_pyerr(py, Error::Queue { queue: self.index, source: e }))
    }

    /// Chains deferred on this ring and not completed yet.
    #[getter]
    fn deferred(&self) -> usize {
        if !self.valid.load(Ordering::Acquire) {
            return 0;
        }
        // SAFETY: as in complete.
        let ring = unsafe { &mut *(self.ring as *mut RingHandle<'static>) };
        ring.kept().len()
    }

    /// The ring index.
    #[getter]
    fn index(&self) -> u16 {
        self.index
    }
}

/// Adapts a Python ``vhostuser_rs.Device`` to the back-end.
pub(crate) struct PyDevice {
    obj: Py<PyAny>,
    num_queues: u16,
    max_queue_size: u16,
    features: u64,
    /// Protocol features the class declares (offered on top of the session's).
    protocol_features: u64,
    /// The device implements ``process_request`` instead of ``process``: one call per chain.
    per_request: bool,
    /// The class overrides ``event_fds``: it watches fds of its own and may defer chains.
    has_events: bool,
    /// The class overrides ``save_state`` and ``load_state``: DEVICE_STATE is offered.
    has_state: bool,
    /// The class overrides ``get_shared_object``: SHARED_OBJECT is offered.
    has_shared: bool,
    /// ``shmem_regions``, read once (fixed for the connection): SHMEM is offered if non-empty.
    shmem_regions: Vec<u64>,
    /// ``drain_batch``: chains per batch of a drain (see `Device::drain_batch`).
    drain_batch: usize,
}

impl PyDevice {
    pub(crate) fn new(py: Python<'_>, obj: Py<PyAny>) -> PyResult<PyDevice> {
        let b = obj.bind(py);
        // Per-request mode when the class overrides process_request and not process.
        let overrides = |name: &str| -> PyResult<bool> {
            let base = py.import("vhostuser_rs.backend")?.getattr("Device")?.getattr(name)?;
            Ok(!b.get_type().getattr(name)?.is(&base))
        };
        let per_request = overrides("process_request")? && !overrides("process")?;
        let shmem_regions: Vec<u64> = b.getattr("shmem_regions")?.extract()?;
        let drain_batch: usize = b.getattr("drain_batch")?.extract()?;
        if !(1..=1024).contains(&drain_batch) {
            return Err(PyValueError::new_err(format!("drain_batch must be 1..1024, not {drain_batch}")));
        }
        crate::backend::check_regions(&shmem_regions).map_err(PyValueError::new_err)?;
        Ok(PyDevice {
            num_queues: b.getattr("num_queues")?.extract()?,
            max_queue_size: b.getattr("max_queue_size")?.extract()?,
            features: b.getattr("features")?.extract()?,
            protocol_features: b.getattr("protocol_features")?.extract()?,
            per_request,
            has_events: overrides("event_fds")?,
            has_state: overrides("save_state")? && overrides("load_state")?,
            has_shared: overrides("get_shared_object")?,
            shmem_regions,
            drain_batch,
            obj,
        })
    }
}

/// A chain handled in per-request mode: head, writable buffers (guest address, length), bytes
/// written.
type Completion = (u16, Vec<(u64, u32)>, u32);

impl PyDevice {
    fn hook(&self, name: &str, queue_index: u16) {
        Python::attach(|py| {
            if let Err(e) = self.obj.bind(py).call_method1(name, (queue_index,)) {
                warn(py, name, &e);
            }
        });
    }

    /// Per-request mode: ``process_request(queue_index, chain)`` returns the bytes written and
    /// Rust completes the chain; an exception completes it with 0 bytes and is logged.
    fn process_each(
        &self,
        queue_index: u16,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
    ) -> Result<(), VirtqueueError> {
        let memory = queue.memory().clone();
        let results: Option<Vec<Completion>> =
            Python::attach(|py| {
                let method = match self.obj.bind(py).getattr("process_request") {
                    Ok(m) => m,
                    Err(e) => {
                        warn(py, "process_request", &e);
                        return None;
                    }
                };
                let mut out = Vec::with_capacity(batch.len());
                for chain in chains_from_batch(batch, &memory) {
                    let head = chain.head_index();
                    let gpas = chain.writable_gpas();
                    let cap = chain.writable_capacity();
                    let written = match Bound::new(py, chain)
                        .and_then(|c| method.call1((queue_index, c)))
                        .and_then(|r| if r.is_none() { Ok(0) } else { r.extract::<u32>() })
                    {
                        Ok(n) if n <= cap => n,
                        Ok(_) => {
                            let e =
                                PyValueError::new_err("process_request returned more bytes than the chain can hold");
                            warn(py, "process_request()", &e);
                            0
                        }
                        Err(e) => {
                            warn(py, "process_request()", &e);
                            0
                        }
                    };
                    out.push((head, gpas, written));
                }
                Some(out)
            });
        match results {
            Some(results) => {
                for (head, gpas, written) in results {
                    queue.complete_with(head, gpas, written)?;
                }
            }
            // process_request could not even be looked up: return the chains empty.
            None => {
                for chain in batch.chains() {
                    queue.complete(batch, chain, 0)?;
                }
            }
        }
        Ok(())
    }
}

impl Device for PyDevice {
    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn drain_batch(&self) -> usize {
        self.drain_batch
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> crate::protocol::ProtocolFeatures {
        use crate::protocol::ProtocolFeatures as P;
        let mut p = P(self.protocol_features);
        if self.has_state {
            p |= P::DEVICE_STATE;
        }
        if self.has_shared {
            p |= P::SHARED_OBJECT;
        }
        if self.shmem_regions.iter().any(|&s| s != 0) {
            // SHMEM_MAP carries the fd to map: it needs BACKEND_SEND_FD too.
            p |= P::SHMEM | P::BACKEND_SEND_FD;
        }
        p
    }

    fn device_request(&self, request: crate::backend::DeviceRequest) -> Result<(), String> {
        use crate::backend::DeviceRequest;
        use crate::protocol::FrontendRequest;
        let (code, value) = match request {
            DeviceRequest::SendRarp(mac) => {
                let mut b = [0u8; 8];
                b[..6].copy_from_slice(&mac);
                (FrontendRequest::SEND_RARP, u64::from_le_bytes(b))
            }
            DeviceRequest::NetSetMtu(mtu) => (FrontendRequest::NET_SET_MTU, mtu),
        };
        Python::attach(|py| {
            let enums = py.import("vhostuser_rs.enums").map_err(|e| e.to_string())?;
            let req =
                enums.getattr("FrontendRequest").and_then(|c| c.call1((code as u32,))).map_err(|e| e.to_string())?;
            match self.obj.bind(py).call_method1("device_request", (req, value)).and_then(|r| r.is_truthy()) {
                Ok(true) => Ok(()),
                Ok(false) => Err("the device refused it".into()),
                Err(e) => {
                    warn(py, "device_request()", &e);
                    Err(e.to_string())
                }
            }
        })
    }

    fn config(&self) -> Vec<u8> {
        Python::attach(|py| match self.obj.bind(py).call_method0("config").and_then(|c| c.extract::<Vec<u8>>()) {
            Ok(c) => c,
            Err(e) => {
                // The spec's failure answer to GET_CONFIG is an empty reply.
                warn(py, "config()", &e);
                Vec::new()
            }
        })
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> bool {
        Python::attach(|py| {
            let r = self.obj.bind(py).call_method1("set_config", (offset, PyBytes::new(py, data)));
            match r.and_then(|v| v.is_truthy()) {
                Ok(ok) => ok,
                Err(e) => {
                    warn(py, "set_config()", &e);
                    false
                }
            }
        })
    }

    fn create_crypto_session(&self, session: &crate::protocol::CryptoSession) -> Result<i64, String> {
        Python::attach(|py| {
            let args = (session.op_code, PyBytes::new(py, &session.params));
            match self.obj.bind(py).call_method1("create_crypto_session", args).and_then(|r| r.extract::<i64>()) {
                Ok(id) => Ok(id),
                Err(e) => Err(refused(py, "create_crypto_session()", &e)),
            }
        })
    }

    fn close_crypto_session(&self, session_id: u64) -> Result<(), String> {
        Python::attach(|py| {
            match self.obj.bind(py).call_method1("close_crypto_session", (session_id,)).and_then(|r| r.is_truthy()) {
                Ok(true) => Ok(()),
                Ok(false) => Err("the device refused it".into()),
                Err(e) => Err(refused(py, "close_crypto_session()", &e)),
            }
        })
    }

    fn gpu_set_socket(&self, socket: std::os::fd::OwnedFd) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        // The socket is closed when the method returns (the device dups it to keep it), as
        // for the fds of back-end request handlers.
        Python::attach(|py| {
            match self.obj.bind(py).call_method1("gpu_set_socket", (socket.as_raw_fd(),)).and_then(|r| r.is_truthy()) {
                Ok(true) => Ok(()),
                Ok(false) => Err("the device refused it".into()),
                Err(e) => Err(refused(py, "gpu_set_socket()", &e)),
            }
        })
    }

    fn wake_scope(&self, run: &mut dyn FnMut()) {
        // Every `process` call of this wake-up re-enters an already attached thread: one GIL
        // acquisition per wake-up, however many batches the ring holds.
        Python::attach(|_| run());
    }

    fn queue_started(&self, queue_index: u16) {
        self.hook("queue_started", queue_index);
    }

    fn queue_stopped(&self, queue_index: u16) {
        self.hook("queue_stopped", queue_index);
    }

    fn process(&self, queue_index: u16, queue: &mut AnyDeviceQueue, batch: &ChainBatch) -> Result<(), VirtqueueError> {
        self.process_batch(queue_index, queue, batch, &mut KeptChains::new(), &mut Rings::none())
    }

    fn event_fds(&self, queue_index: u16) -> Vec<RawFd> {
        if !self.has_events {
            return Vec::new();
        }
        Python::attach(|py| match self.obj.bind(py).call_method1("event_fds", (queue_index,)) {
            Ok(r) => match r.extract::<Vec<RawFd>>() {
                Ok(v) => v.into_iter().filter(|&fd| fd >= 0).collect(),
                Err(e) => {
                    warn(py, "event_fds()", &e);
                    Vec::new()
                }
            },
            Err(e) => {
                warn(py, "event_fds()", &e);
                Vec::new()
            }
        })
    }

    fn event(&self, fd: RawFd, mut ring: RingHandle<'_>, _others: &mut Rings<'_>) -> Result<bool, VirtqueueError> {
        let index = ring.index();
        let ptr = (&mut ring as *mut RingHandle<'_>).cast::<RingHandle<'static>>() as usize;
        Ok(Python::attach(|py| {
            let rq = RingQueue { ring: ptr, valid: AtomicBool::new(true), index };
            let result = Bound::new(py, rq).and_then(|rq| {
                let r = self.obj.bind(py).call_method1("on_event", (rq.clone(), fd));
                rq.get().valid.store(false, Ordering::Release);
                r.and_then(|v| v.is_truthy())
            });
            match result {
                Ok(keep) => keep,
                Err(e) => {
                    warn(py, "on_event()", &e);
                    false
                }
            }
        }))
    }

    fn process_batch(
        &self,
        queue_index: u16,
        queue: &mut AnyDeviceQueue,
        batch: &ChainBatch,
        kept: &mut KeptChains,
        _others: &mut Rings<'_>,
    ) -> Result<(), VirtqueueError> {
        if self.per_request {
            return self.process_each(queue_index, queue, batch);
        }
        let memory = queue.memory().clone();
        let ptr = queue as *mut AnyDeviceQueue as usize;
        let leftover: Vec<u16> = Python::attach(|py| {
            let chains = chains_from_batch(batch, &memory);
            let heads: Vec<u16> = chains.iter().map(|c| c.head_index()).collect();
            let bq = BatchQueue {
                queue: ptr,
                valid: AtomicBool::new(true),
                index: queue_index,
                completed: Mutex::new(HashSet::new()),
                deferred: Mutex::new(HashSet::new()),
                can_defer: self.has_events,
            };
            let result = Bound::new(py, bq).and_then(|bq| {
                let objs = chains.into_iter().map(|c| Bound::new(py, c)).collect::<PyResult<Vec<_>>>()?;
                let list = PyList::new(py, objs)?;
                let r = self.obj.bind(py).call_method1("process", (bq.clone(), list));
                bq.get().valid.store(false, Ordering::Release);
                r.map(|_| bq)
            });
            match result {
                Ok(bq) => {
                    let done = bq.get().completed.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let deferred = bq.get().deferred.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    for chain in batch.chains().iter().filter(|c| deferred.contains(&c.head)) {
                        kept.keep(batch, chain);
                    }
                    heads.into_iter().filter(|h| !done.contains(h) && !deferred.contains(h)).collect()
                }
                Err(e) => {
                    warn(py, "process()", &e);
                    // Which chains were completed before the exception is not known here:
                    // complete nothing more; they stay in flight until the ring is stopped.
                    Vec::new()
                }
            }
        });
        // Chains the device did not complete are returned empty so the driver is not left hanging;
        // their buffers are still logged: the device may have written into them before it raised.
        for chain in batch.chains().iter().filter(|c| leftover.contains(&c.head)) {
            queue.complete(batch, chain, 0)?;
        }
        Ok(())
    }

    fn reset(&self) {
        Python::attach(|py| {
            if let Err(e) = self.obj.bind(py).call_method0("reset") {
                warn(py, "reset()", &e);
            }
        });
    }

    fn save_state(&self) -> Result<Vec<u8>, String> {
        if !self.has_state {
            return Err("the device does not implement save_state and load_state".into());
        }
        call_with_stream(&self.obj, "save_state", &[])
    }

    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        if !self.has_state {
            return Err("the device does not implement save_state and load_state".into());
        }
        call_with_stream(&self.obj, "load_state", state).map(|_| ())
    }

    fn shared_object(&self, uuid: &[u8; 16]) -> Option<std::os::fd::OwnedFd> {
        Python::attach(|py| {
            let fd = match self.obj.bind(py).call_method1("get_shared_object", (PyBytes::new(py, uuid),)) {
                Ok(r) if r.is_none() => return None,
                Ok(r) => match r.extract::<RawFd>() {
                    Ok(fd) if fd >= 0 => fd,
                    _ => {
                        let e = PyValueError::new_err("get_shared_object must return an open fd or None");
                        warn(py, "get_shared_object()", &e);
                        return None;
                    }
                },
                Err(e) => {
                    warn(py, "get_shared_object()", &e);
                    return None;
                }
            };
            // SAFETY: the device returned an fd it keeps open during this call; we send a copy.
            match unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned() {
                Ok(owned) => Some(owned),
                Err(e) => {
                    warn(py, "get_shared_object()", &super::errors::os_error(&e));
                    None
                }
            }
        })
    }

    fn shmem_regions(&self) -> Vec<u64> {
        self.shmem_regions.clone()
    }
}

/// Calls ``obj.method(stream)`` with an ``io.BytesIO`` holding `data` and returns what the
/// stream holds afterwards (DEVICE_STATE's ``save_state`` / ``load_state``); an exception is
/// logged and becomes the refusal's reason.
pub(crate) fn call_with_stream(obj: &Py<PyAny>, method: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    Python::attach(|py| {
        let run = || -> PyResult<Vec<u8>> {
            let stream = py.import("io")?.getattr("BytesIO")?.call1((PyBytes::new(py, data),))?;
            obj.bind(py).call_method1(method, (stream.clone(),))?;
            stream.call_method0("getvalue")?.extract()
        };
        run().map_err(|e| {
            warn(py, &format!("{method}()"), &e);
            e.to_string()
        })
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<BatchQueue>()?;
    m.add_class::<RingQueue>()?;
    Ok(())
}
