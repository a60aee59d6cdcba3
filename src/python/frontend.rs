//! `FrontendCore`: the Rust front-end behind `vhostuser_rs.Frontend` (frontend.py), and the
//! bridge that lets a Python `BackendRequestHandler` serve the back-end request channel.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::blocking::timeout;
use super::errors::{to_pyerr, IntoPyResult};
use super::socket::borrow_fds;
use super::wire::{message_to_py, payload_from_py};
use crate::connection::Received;
use crate::connection::{Connection, Deadline};
use crate::error::Error;
use crate::frontend::channel::{BackendChannel, BackendRequestHandler, NOT_SUPPORTED};
use crate::frontend::{Exchange, Frontend, RequestOptions, Step};
use crate::protocol::{FrontendRequest, Message};

/// The Rust core of a front-end session (use ``vhostuser_rs.Frontend``).
#[pyclass(module = "vhostuser_rs", name = "FrontendCore", frozen)]
pub(crate) struct PyFrontendCore {
    /// `None` once closed: the main channel's fd goes with the last `Arc` (a request still
    /// running on another thread holds one until the shutdown wakes it).
    inner: Mutex<Option<Arc<Frontend>>>,
    channel: Mutex<Option<BackendChannel>>,
}

impl PyFrontendCore {
    fn new(fe: Frontend) -> PyFrontendCore {
        PyFrontendCore { inner: Mutex::new(Some(Arc::new(fe))), channel: Mutex::new(None) }
    }

    fn frontend(&self, py: Python<'_>) -> PyResult<Arc<Frontend>> {
        let fe = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        fe.ok_or_else(|| {
            let exc = py
                .import("vhostuser_rs.exceptions")
                .and_then(|m| m.getattr("ConnectionClosedError"))
                .and_then(|cls| cls.call1(("the session is closed",)));
            match exc {
                Ok(value) => PyErr::from_value(value),
                Err(e) => e,
            }
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    py: Python<'_>,
    fe: &Frontend,
    request: u32,
    payload: Option<Bound<'_, PyAny>>,
    fds: Vec<RawFd>,
    need_reply: Option<bool>,
    timeout: Option<f64>,
    check_gate: bool,
) -> PyResult<Exchange> {
    let req = FrontendRequest::from_code(request)
        .ok_or_else(|| PyValueError::new_err(format!("unknown front-end request {request}")))?;
    let payload = match payload {
        Some(p) => payload_from_py(&p)?,
        None => crate::protocol::Payload::Empty,
    };
    let borrowed = borrow_fds(&fds)?;
    let opts = RequestOptions {
        need_reply,
        check_gate,
        deadline: Deadline::after(super::blocking::timeout(timeout)?),
        ..RequestOptions::default()
    };
    fe.exchange(req, payload, &borrowed, opts).py_err(py)
}

type Reply<'py> = (Option<Bound<'py, PyAny>>, Vec<RawFd>);

fn reply_to_py(py: Python<'_>, result: Result<Option<Received>, Error>) -> PyResult<Reply<'_>> {
    match result.map_err(|e| to_pyerr(py, e))? {
        None => Ok((None, Vec::new())),
        Some(r) => {
            let fds = r.fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
            Ok((Some(message_to_py(py, &r.message)?), fds))
        }
    }
}

/// One request on its way (``FrontendCore.begin``): :meth:`poll` moves it on without blocking.
/// Dropping or cancelling it after it was sent leaves its reply to be read and discarded by
/// the next request (the connection stays in step).
#[pyclass(module = "vhostuser_rs", name = "Exchange", frozen)]
pub(crate) struct PyExchange {
    fe: Arc<Frontend>,
    /// `None` once over (result handed out, or cancelled).
    ex: Mutex<Option<Exchange>>,
    /// What the last step waits for: the main channel (true) or the line (false).
    waiting: AtomicBool,
}

impl PyExchange {
    fn set_waiting(&self, readable: bool) {
        self.waiting.store(readable, Ordering::Relaxed);
    }
}

#[pymethods]
impl PyExchange {
    /// One step, never blocking (the GIL is released during it): ``(reply, fds)`` once the
    /// exchange is over (the fds are the caller's), ``None`` while it waits — for the main
    /// channel to become readable (:attr:`waits_for_reply`), or for another thread's request
    /// to finish. Raises what the request failed with (a rejection, a timeout, a hang-up).
    fn poll<'py>(&self, py: Python<'py>) -> PyResult<Option<Reply<'py>>> {
        let mut guard = self.ex.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ex) = guard.as_mut() else {
            return Err(PyValueError::new_err("the exchange is over"));
        };
        let fe = &self.fe;
        let step = py.detach(|| fe.step(ex));
        match step {
            Ok(Step::Readable) => {
                drop(guard);
                self.set_waiting(true);
                Ok(None)
            }
            Ok(Step::Turn) => {
                drop(guard);
                self.set_waiting(false);
                Ok(None)
            }
            Ok(Step::Done(reply)) => {
                *guard = None;
                reply_to_py(py, Ok(reply)).map(Some)
            }
            Err(e) => {
                *guard = None;
                Err(to_pyerr(py, e))
            }
        }
    }

    /// Whether the last :meth:`poll` waits for the main channel (``fileno``) to become
    /// readable; otherwise another request holds the channel: poll again shortly.
    #[getter]
    fn waits_for_reply(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Seconds left before the request's timeout (None: no timeout).
    #[getter]
    fn remaining(&self) -> Option<f64> {
        let guard = self.ex.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().and_then(|ex| ex.deadline().remaining()).map(|d| d.as_secs_f64())
    }

    /// Abandons the request: not sent yet, it never will be; sent, its reply is read and
    /// discarded by the next request. Idempotent.
    fn cancel(&self) {
        let ex = self.ex.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(ex);
    }

    /// Whether the exchange is over.
    #[getter]
    fn done(&self) -> bool {
        self.ex.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }
}

/// The back-end request channel's handler, held weakly when it can be: the `Frontend` that
/// owns this channel holds it (and the handler usually the `Frontend`), and a strong reference
/// from this thread, which the garbage collector cannot see, would keep a session dropped
/// without `close()` alive, socket and thread included.
struct PyHandler {
    handler: HandlerRef,
}

enum HandlerRef {
    Weak(Py<pyo3::types::PyWeakrefReference>),
    /// An object that takes no weak references.
    Strong(Py<PyAny>),
}

impl HandlerRef {
    fn new(handler: &Bound<'_, PyAny>) -> HandlerRef {
        match pyo3::types::PyWeakrefReference::new(handler) {
            Ok(weak) => HandlerRef::Weak(weak.unbind()),
            Err(_) => HandlerRef::Strong(handler.clone().unbind()),
        }
    }

    fn get<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        match self {
            HandlerRef::Weak(w) => w.bind(py).upgrade(),
            HandlerRef::Strong(h) => Some(h.bind(py).clone()),
        }
    }
}

impl BackendRequestHandler for PyHandler {
    fn handle(&mut self, message: &Message, fds: Vec<OwnedFd>) -> (u64, Option<OwnedFd>) {
        Python::attach(|py| {
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let Some(handler) = self.handler.get(py) else {
                // Its session was dropped without close(); the channel goes with it.
                return (NOT_SUPPORTED, None);
            };
            let result = message_to_py(py, message).and_then(|m| handler.call_method1("_vhostuser_dispatch", (m, raw)));
            // The fds were lent to the handler for the call; they are closed now.
            drop(fds);
            match result.and_then(|r| r.extract::<(u64, Option<RawFd>, bool)>()) {
                Ok((status, None, _)) => (status, None),
                Ok((status, Some(fd), false)) => {
                    // SAFETY: the handler returns an fd it keeps open; we send a duplicate.
                    let dup = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().ok();
                    (status, dup)
                }
                Ok((status, Some(fd), true)) => {
                    // SAFETY: the handler hands this fd over (it was opened for this reply and
                    // nobody else closes it); it is closed once sent.
                    (status, Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }))
                }
                Err(e) => {
                    e.print(py);
                    (NOT_SUPPORTED, None)
                }
            }
        })
    }

    fn malformed(&mut self, error: &Error) {
        log::warn!(target: "vhostuser_rs::frontend", "back-end request channel: {error}");
    }
}

#[pymethods]
impl PyFrontendCore {
    /// Connects to a back-end's socket, retrying while it starts.
    #[staticmethod]
    #[pyo3(signature = (path, *, timeout=5.0))]
    fn connect(py: Python<'_>, path: PathBuf, timeout: Option<f64>) -> PyResult<PyFrontendCore> {
        let t = super::blocking::timeout(timeout)?;
        let conn = py.detach(|| Connection::connect(&path, t)).py_err(py)?;
        Ok(PyFrontendCore::new(Frontend::new(conn)))
    }

    /// Adopts a duplicate of a connected Unix stream socket's fd.
    #[staticmethod]
    fn from_fd(py: Python<'_>, fd: RawFd) -> PyResult<PyFrontendCore> {
        let one = [fd];
        let owned = borrow_fds(&one)?[0].try_clone_to_owned().map_err(|e| super::errors::os_error(&e))?;
        let conn = Connection::from_fd(owned).py_err(py)?;
        Ok(PyFrontendCore::new(Frontend::new(conn)))
    }

    /// Sends one request and waits for its reply or ack; returns ``(reply, fds)`` (reply is
    /// ``None`` for requests that are not answered). Received fds belong to the caller.
    #[pyo3(signature = (request, payload=None, fds=Vec::new(), *, need_reply=None, timeout=5.0, check_gate=true))]
    #[allow(clippy::too_many_arguments)]
    fn request<'py>(
        &self,
        py: Python<'py>,
        request: u32,
        payload: Option<Bound<'py, PyAny>>,
        fds: Vec<RawFd>,
        need_reply: Option<bool>,
        timeout: Option<f64>,
        check_gate: bool,
    ) -> PyResult<(Option<Bound<'py, PyAny>>, Vec<RawFd>)> {
        let fe = self.frontend(py)?;
        let mut ex = prepare(py, &fe, request, payload, fds, need_reply, timeout, check_gate)?;
        let result = py.detach(|| {
            let mut interrupt = || Python::attach(|py| py.check_signals()).map_err(|e| Error::Io(io::Error::other(e)));
            fe.wait(&mut ex, &mut interrupt)
        });
        reply_to_py(py, result)
    }

    /// Prepares one request without sending it: an :class:`Exchange` that the caller steps with
    /// :meth:`Exchange.poll` (never blocks) when the main channel is readable — how
    /// ``vhostuser_rs.aio`` runs requests from an event loop.
    #[pyo3(signature = (request, payload=None, fds=Vec::new(), *, need_reply=None, timeout=5.0, check_gate=true))]
    #[allow(clippy::too_many_arguments)]
    fn begin<'py>(
        &self,
        py: Python<'py>,
        request: u32,
        payload: Option<Bound<'py, PyAny>>,
        fds: Vec<RawFd>,
        need_reply: Option<bool>,
        timeout: Option<f64>,
        check_gate: bool,
    ) -> PyResult<PyExchange> {
        let fe = self.frontend(py)?;
        let ex = prepare(py, &fe, request, payload, fds, need_reply, timeout, check_gate)?;
        Ok(PyExchange { fe, ex: Mutex::new(Some(ex)), waiting: AtomicBool::new(true) })
    }

    /// What was offered and acknowledged so far.
    fn negotiated<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let n = self.frontend(py)?.negotiated();
        let d = PyDict::new(py);
        d.set_item("offered_features", n.offered_features)?;
        d.set_item("acked_features", n.acked_features)?;
        d.set_item("offered_protocol_features", n.offered_protocol)?;
        d.set_item("acked_protocol_features", n.acked_protocol)?;
        Ok(d)
    }

    /// Starts serving the back-end request channel with `handler` (an object with a
    /// ``_vhostuser_dispatch(message, fds)`` method returning ``(status, fd or None,
    /// hand_over)``: with `hand_over` the fd is closed once sent, else a duplicate is sent); returns the back-end's end of the
    /// socketpair, which the caller sends with SET_BACKEND_REQ_FD and then closes. Replaces (and
    /// stops) any previous channel.
    fn start_backend_channel(&self, py: Python<'_>, handler: Py<PyAny>) -> PyResult<RawFd> {
        let old = self.channel.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut old) = old {
            py.detach(|| old.stop());
        }
        let handler = HandlerRef::new(handler.bind(py));
        let (chan, theirs) = BackendChannel::start(Box::new(PyHandler { handler })).py_err(py)?;
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = Some(chan);
        Ok(theirs.into_raw_fd())
    }

    /// Whether the back-end request channel is being served.
    #[getter]
    fn backend_channel_running(&self) -> bool {
        self.channel.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|c| c.is_running())
    }

    /// The main channel's fd.
    fn fileno(&self, py: Python<'_>) -> PyResult<RawFd> {
        Ok(self.frontend(py)?.connection().as_raw_fd())
    }

    /// Whether the back-end hung up (the main channel reads end-of-file). Never blocks and
    /// consumes nothing.
    #[getter]
    fn peer_closed(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.frontend(py)?.peer_closed())
    }

    /// Whether :meth:`close` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// Shuts the session down and releases its fds: wakes blocked requests, stops the
    /// back-end request channel, lets go of the main channel. Idempotent, from any state.
    fn close(&self, py: Python<'_>) {
        let fe = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(fe) = &fe {
            fe.shutdown();
        }
        let chan = self.channel.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut chan) = chan {
            // The channel thread may be waiting for the GIL: release it while joining.
            py.detach(|| chan.stop());
        }
        drop(fe);
    }
}

/// Runs the Rust virtio-blk I/O loop on a ring set up by ``Frontend.setup_queue`` and returns
/// what it measured. The GIL is released for the whole run; Ctrl-C ends it early.
#[pyfunction]
#[pyo3(signature = (queue, memory, kick_fd, call_fd, *, rw="randread", bs=4096, iodepth=32, duration=10.0, capacity, verify=false, seed=1, progress=false, poll=None, status=None, status_interval=1.0))]
#[allow(clippy::too_many_arguments)]
fn block_io<'py>(
    py: Python<'py>,
    queue: &super::virtqueue::PyDriverQueue,
    memory: &super::memory::PyGuestMemory,
    kick_fd: RawFd,
    call_fd: RawFd,
    rw: &str,
    bs: u32,
    iodepth: u16,
    duration: f64,
    capacity: u64,
    verify: bool,
    seed: u64,
    progress: bool,
    poll: Option<f64>,
    status: Option<Py<PyAny>>,
    status_interval: f64,
) -> PyResult<Bound<'py, PyDict>> {
    use crate::frontend::blkio::{run, Job, Pattern};
    let status_every = super::blocking::timeout(Some(status_interval))?.unwrap_or_default();
    if status.is_some() && status_every.is_zero() {
        return Err(PyValueError::new_err("status_interval must be > 0"));
    }
    let pattern = Pattern::parse(rw).ok_or_else(|| PyValueError::new_err(format!("unknown rw pattern {rw:?}")))?;
    let d = super::blocking::timeout(Some(duration))?.unwrap_or_default();
    let poll = match poll {
        Some(p) => Some(super::blocking::timeout(Some(p))?.unwrap_or_default()),
        None => None,
    };
    let job = Job { pattern, block_size: bs, iodepth, duration: d, capacity, verify, seed, poll };
    let fds = [kick_fd, call_fd];
    let borrowed = borrow_fds(&fds)?;
    let mem = memory.inner.clone();
    let mut guard = queue.inner.lock().unwrap_or_else(|e| e.into_inner());
    let q: &mut crate::virtqueue::AnyDriverQueue = &mut guard;
    let mut status_error: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut last_print = std::time::Instant::now();
        let mut shown = 0usize;
        let mut next_status = status_every;
        let mut stop = |r: &crate::frontend::blkio::Report| {
            if last_print.elapsed() >= std::time::Duration::from_millis(100) {
                last_print = std::time::Instant::now();
                if Python::attach(|py| py.check_signals()).is_err() {
                    return true;
                }
            }
            if let Some(callback) = &status {
                if r.elapsed >= next_status {
                    next_status = r.elapsed + status_every;
                    let (reads, writes) = (r.latencies_ns.len(), r.write_latencies_ns.len());
                    let called = Python::attach(|py| callback.call1(py, (reads, writes, r.elapsed.as_secs_f64())));
                    if let Err(e) = called {
                        // The callback's exception ends the run; it is raised below.
                        status_error = Some(e);
                        return true;
                    }
                }
            }
            if progress && r.per_second.len() > shown {
                shown = r.per_second.len();
                let iops = r.per_second[shown - 1];
                eprint!("\r[{shown:>3}s] {iops:>9} IOPS  {:>8.1} MiB/s", iops as f64 * f64::from(bs) / 1048576.0);
            }
            false
        };
        run(q, &mem, borrowed[0], borrowed[1], job, &mut stop)
    });
    if progress {
        eprintln!();
    }
    let mut report = result.map_err(|e| to_pyerr(py, e))?;
    if let Some(err) = status_error {
        return Err(err);
    }
    report.latencies_ns.sort_unstable();
    report.write_latencies_ns.sort_unstable();
    let directions = PyDict::new(py);
    for (name, sorted) in [("read", &report.latencies_ns), ("write", &report.write_latencies_ns)] {
        directions.set_item(name, latency_dict(py, sorted)?)?;
    }
    let mut all = [report.latencies_ns.as_slice(), report.write_latencies_ns.as_slice()].concat();
    all.sort_unstable();
    let pct = |p: f64| -> u32 {
        if all.is_empty() {
            return 0;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[i]
    };
    let out = PyDict::new(py);
    out.set_item("ios", report.ios)?;
    out.set_item("bytes", report.bytes)?;
    out.set_item("elapsed", report.elapsed.as_secs_f64())?;
    out.set_item("errors", report.errors)?;
    out.set_item("verify_failures", report.verify_failures)?;
    out.set_item("p50_ns", pct(0.5))?;
    out.set_item("p99_ns", pct(0.99))?;
    out.set_item("p999_ns", pct(0.999))?;
    out.set_item("max_ns", all.last().copied().unwrap_or(0))?;
    out.set_item("per_second", report.per_second)?;
    out.set_item("per_second_writes", report.per_second_writes)?;
    out.set_item("read", directions.get_item("read")?)?;
    out.set_item("write", directions.get_item("write")?)?;
    Ok(out)
}

/// The latency statistics of one direction (`frontend::latency`): ios, min/max/mean/stddev
/// (ns), fio's percentile list as (percent, ns) and the non-empty histogram buckets as
/// (fio's value, low, high, count).
fn latency_dict<'py>(py: Python<'py>, sorted: &[u32]) -> PyResult<Bound<'py, PyDict>> {
    use crate::frontend::latency::{bucket_range, bucket_value, histogram, percentile, summarize, FIO_PERCENTILES};
    let summary = summarize(sorted);
    let d = PyDict::new(py);
    d.set_item("ios", summary.count)?;
    d.set_item("min_ns", summary.min)?;
    d.set_item("max_ns", summary.max)?;
    d.set_item("mean_ns", summary.mean)?;
    d.set_item("stddev_ns", summary.stddev)?;
    let percentiles: Vec<(f64, u32)> = FIO_PERCENTILES.iter().map(|&p| (p, percentile(sorted, p))).collect();
    d.set_item("percentiles", percentiles)?;
    let bins: Vec<(u64, u64, u64, u64)> = histogram(sorted)
        .into_iter()
        .map(|(i, count)| {
            let (low, high) = bucket_range(i);
            (bucket_value(i), low, high, count)
        })
        .collect();
    d.set_item("bins", bins)?;
    Ok(d)
}

/// A VIRTIO Shared Memory Region held by the front-end (SHMEM): a reserved address range of
/// the size GET_SHMEM_CONFIG announced, into which SHMEM_MAP places the back-end's fds.
#[pyclass(module = "vhostuser_rs", name = "SharedRegion", frozen)]
pub(crate) struct PySharedRegion {
    inner: crate::frontend::shmem::SharedRegion,
}

#[pymethods]
impl PySharedRegion {
    /// Reserves `size` bytes (a non-zero multiple of the page size) for region `shmid`.
    #[new]
    fn new(py: Python<'_>, shmid: u8, size: u64) -> PyResult<PySharedRegion> {
        Ok(PySharedRegion { inner: crate::frontend::shmem::SharedRegion::reserve(shmid, size).py_err(py)? })
    }

    /// The region id.
    #[getter]
    fn shmid(&self) -> u8 {
        self.inner.shmid()
    }

    /// The region size in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.inner.size()
    }

    /// The live mappings as ``(offset, length, fd_offset, writable)`` tuples, by offset.
    #[getter]
    fn mappings(&self) -> Vec<(u64, u64, u64, bool)> {
        self.inner.mappings().into_iter().map(|m| (m.offset, m.len, m.fd_offset, m.writable)).collect()
    }

    /// SHMEM_MAP: maps `length` bytes of `fd` from `fd_offset` at `offset` (the fd stays yours).
    #[pyo3(signature = (fd, fd_offset, offset, length, *, writable))]
    fn map(&self, py: Python<'_>, fd: RawFd, fd_offset: u64, offset: u64, length: u64, writable: bool) -> PyResult<()> {
        let one = [fd];
        let borrowed = borrow_fds(&one)?;
        self.inner.map(borrowed[0], fd_offset, offset, length, writable).py_err(py)
    }

    /// SHMEM_UNMAP: removes the mapping with exactly this offset and length.
    fn unmap(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        self.inner.unmap(offset, length).py_err(py)
    }

    /// Removes every mapping.
    fn unmap_all(&self) {
        self.inner.unmap_all()
    }

    /// A copy of `length` mapped bytes at `offset`.
    fn read<'py>(&self, py: Python<'py>, offset: u64, length: usize) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let data = self.inner.read(offset, length).py_err(py)?;
        Ok(pyo3::types::PyBytes::new(py, &data))
    }

    /// Copies `data` to `offset` (mapped read-write).
    fn write(&self, py: Python<'_>, offset: u64, data: &[u8]) -> PyResult<()> {
        self.inner.write(offset, data).py_err(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "SharedRegion(shmid={}, size={:#x}, mappings={})",
            self.inner.shmid(),
            self.inner.size(),
            self.inner.mappings().len()
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(block_io, m)?)?;
    m.add_class::<PyFrontendCore>()?;
    m.add_class::<PyExchange>()?;
    m.add_class::<PySharedRegion>()?;
    let _ = timeout;
    Ok(())
}
