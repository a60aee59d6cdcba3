//! The back-end role from Python: serving the built-in block device.

use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::errors::{os_error, to_pyerr, IntoPyResult};
use crate::backend::{serve_session, BackendRequests, Device, Polling, ServedSession, WorkerPolicy};
use crate::connection::{Connection, Deadline, Listener};
use crate::devices::blk::{BlockOptions, IoEngine};
use crate::devices::BlockDevice;
use crate::error::Error;
use crate::protocol::BackendRequest;

fn warn(_py: Python<'_>, text: String) {
    log::warn!(target: "vhostuser_rs::backend", "{text}");
}

/// Serves `image` with the built-in virtio-blk device on `socket_path` (or on the socket `fd`,
/// the spec's `--fd` convention: a connected socket serves that one front-end, a listening one
/// is served like `socket_path`), one front-end at a time, until Ctrl-C/SIGTERM or
/// `max_connections` sessions. The data path runs on Rust threads and never takes the GIL.
#[pyfunction]
#[pyo3(signature = (image, *, socket_path=None, fd=None, num_queues=1, readonly=false, max_connections=None, workers=None, cpus=None, poll=None, io_engine="auto", direct=false))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn serve_blk(
    py: Python<'_>,
    image: PathBuf,
    socket_path: Option<PathBuf>,
    fd: Option<RawFd>,
    num_queues: u16,
    readonly: bool,
    max_connections: Option<u32>,
    workers: Option<usize>,
    cpus: Option<Vec<usize>>,
    poll: Option<f64>,
    io_engine: &str,
    direct: bool,
) -> PyResult<()> {
    let engine = IoEngine::parse(io_engine)
        .ok_or_else(|| PyValueError::new_err(format!("io_engine must be auto, uring or sync, not {io_engine:?}")))?;
    let options = BlockOptions { readonly, num_queues, direct, engine };
    let device: Arc<dyn Device> = Arc::new(BlockDevice::open_with(&image, options).map_err(|e| os_error(&e))?);
    let policy = policy(workers, cpus, poll)?;
    let at = Where { socket_path, fd, listener: None };
    serve(py, device, at, max_connections, None, Arc::new(BackendRequests::new()), policy)
}

/// `poll`: None adaptive (up to 50 µs), 0 eventfd mode, else a fixed window in seconds.
pub(crate) fn policy(workers: Option<usize>, cpus: Option<Vec<usize>>, poll: Option<f64>) -> PyResult<WorkerPolicy> {
    if workers == Some(0) {
        return Err(PyValueError::new_err("workers must be at least 1 (or None: one thread per ring)"));
    }
    let max_cpu = 8 * std::mem::size_of::<libc::cpu_set_t>();
    if let Some(&bad) = cpus.iter().flatten().find(|&&c| c >= max_cpu) {
        return Err(PyValueError::new_err(format!("CPU {bad} is beyond the {max_cpu} CPUs Linux can pin to")));
    }
    let poll = match poll {
        None => Polling::DEFAULT_ADAPTIVE,
        Some(p) => match super::blocking::timeout(Some(p))?.unwrap_or_default() {
            d if d.is_zero() => Polling::Off,
            d => Polling::Fixed(d),
        },
    };
    Ok(WorkerPolicy { pool: None, threads: workers, cpus: cpus.unwrap_or_default(), poll })
}

/// Serves a Python ``vhostuser_rs.Device`` (see ``serve_blk`` for the loop). With `connect`,
/// the back-end connects out to a listening front-end (client mode) and serves that session.
/// Setting `stop` ends the loop within 200 ms.
#[pyfunction]
#[pyo3(signature = (device, *, socket_path=None, fd=None, connect=None, max_connections=None, stop=None, requests=None, workers=None, cpus=None, poll=0.0, listener=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn serve_device(
    py: Python<'_>,
    device: Py<PyAny>,
    socket_path: Option<PathBuf>,
    fd: Option<RawFd>,
    connect: Option<PathBuf>,
    max_connections: Option<u32>,
    stop: Option<Py<StopFlag>>,
    requests: Option<Py<PyBackendRequests>>,
    workers: Option<usize>,
    cpus: Option<Vec<usize>>,
    poll: Option<f64>,
    listener: Option<Py<super::socket::PyListener>>,
) -> PyResult<()> {
    let policy = policy(workers, cpus, poll)?;
    let device = adapt(py, device)?;
    let bound = listener.map(|l| l.get().get(py)).transpose()?;
    let flag = stop.map(|s| s.get().flag.clone());
    let requests = requests.map(|r| r.get().inner.clone()).unwrap_or_else(|| Arc::new(BackendRequests::new()));
    if let Some(path) = connect {
        let conn = py.detach(|| Connection::connect(&path, Some(Duration::from_secs(5)))).py_err(py)?;
        let stop = || {
            flag.as_ref().is_some_and(|f| f.load(Ordering::Relaxed)) || Python::attach(|py| py.check_signals().is_err())
        };
        let r = py.detach(|| serve_session(&conn, device.clone(), &requests, &policy, &stop));
        return r.map_err(|e| to_pyerr(py, e));
    }
    serve(py, device, Where { socket_path, fd, listener: bound }, max_connections, flag, requests, policy)
}

/// A Python device as the back-end sees it.
fn adapt(py: Python<'_>, device: Py<PyAny>) -> PyResult<Arc<dyn Device>> {
    Ok(match device.bind(py).call_method0("_net_port") {
        // A ``vhostuser_rs.NetDevice``: rings, control queue and RX buffers handled in Rust.
        Ok(port) => {
            let port = port.cast::<super::netdevice::PyNetPort>()?.clone();
            Arc::new(super::netdevice::PyNetDevice::new(py, device, &port)?)
        }
        Err(_) => Arc::new(super::device::PyDevice::new(py, device)?),
    })
}

/// Serves a Python device one session at a time, each stepped by an event loop
/// (``Backend.serve_async``): the loop accepts, watches the session's socket and calls
/// :meth:`BackendSession.handle_ready` when it is readable.
#[pyclass(module = "vhostuser_rs", name = "DeviceServer", frozen)]
pub(crate) struct PyDeviceServer {
    device: Arc<dyn Device>,
    requests: Arc<BackendRequests>,
    policy: WorkerPolicy,
}

#[pymethods]
impl PyDeviceServer {
    #[new]
    #[pyo3(signature = (device, *, requests=None, workers=None, cpus=None, poll=0.0))]
    fn new(
        py: Python<'_>,
        device: Py<PyAny>,
        requests: Option<Py<PyBackendRequests>>,
        workers: Option<usize>,
        cpus: Option<Vec<usize>>,
        poll: Option<f64>,
    ) -> PyResult<PyDeviceServer> {
        let policy = policy(workers, cpus, poll)?;
        let requests = requests.map(|r| r.get().inner.clone()).unwrap_or_else(|| Arc::new(BackendRequests::new()));
        Ok(PyDeviceServer { device: adapt(py, device)?, requests, policy })
    }

    /// Starts a session with the front-end on `connection` (the session shares it).
    fn session(&self, py: Python<'_>, connection: &super::socket::PyConnection) -> PyResult<PyBackendSession> {
        let conn = connection.shared(py)?;
        let served = ServedSession::new(self.device.clone(), self.requests.clone(), self.policy.clone());
        Ok(PyBackendSession {
            fd: std::os::fd::AsRawFd::as_raw_fd(&*conn),
            conn: Mutex::new(Some(conn)),
            served: Mutex::new(served),
        })
    }
}

/// One front-end session of a :class:`DeviceServer`.
#[pyclass(module = "vhostuser_rs", name = "BackendSession", frozen)]
pub(crate) struct PyBackendSession {
    /// `None` once closed: the socket is released at once, not when the object is collected.
    conn: Mutex<Option<Arc<Connection>>>,
    fd: RawFd,
    served: Mutex<ServedSession>,
}

#[pymethods]
impl PyBackendSession {
    /// The session's socket (watch it for readability).
    fn fileno(&self) -> RawFd {
        self.fd
    }

    /// Handles the messages that have arrived, without waiting for more, with the GIL released
    /// (the device's Python hooks take it on their own). True while the session goes on, False
    /// once the front-end hung up; a message that breaks the spec raises (the session is then
    /// over). Handling one message is bounded but may take a while: GET_VRING_BASE waits for
    /// the ring's worker to finish its batch, CHECK_DEVICE_STATE at most 5 s.
    fn handle_ready(&self, py: Python<'_>) -> PyResult<bool> {
        // The lock is taken with the GIL released: the device hooks run under it take the GIL.
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(conn) = conn else { return Ok(false) };
        let served = &self.served;
        py.detach(|| served.lock().unwrap_or_else(|e| e.into_inner()).handle_ready(&conn)).map_err(|e| to_pyerr(py, e))
    }

    /// Whether the session is over.
    #[getter]
    fn finished(&self, py: Python<'_>) -> bool {
        let served = &self.served;
        py.detach(|| served.lock().unwrap_or_else(|e| e.into_inner()).is_finished())
    }

    /// Ends the session (rings stopped, device reset) and shuts the socket down. Idempotent.
    fn close(&self, py: Python<'_>) {
        let served = &self.served;
        py.detach(|| served.lock().unwrap_or_else(|e| e.into_inner()).finish());
        if let Some(conn) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take() {
            conn.shutdown();
        }
    }
}

/// Where to serve: a listener bound earlier, a path to bind, or one connected socket.
pub(crate) struct Where {
    pub(crate) socket_path: Option<PathBuf>,
    pub(crate) fd: Option<RawFd>,
    pub(crate) listener: Option<Arc<Listener>>,
}

/// Sends back-end requests (CONFIG_CHANGE_MSG, ...) to the front-end of the current session.
#[pyclass(module = "vhostuser_rs", name = "BackendRequests", frozen)]
pub(crate) struct PyBackendRequests {
    inner: Arc<BackendRequests>,
}

#[pymethods]
impl PyBackendRequests {
    #[new]
    fn new() -> PyBackendRequests {
        PyBackendRequests { inner: Arc::new(BackendRequests::new()) }
    }

    /// Whether the current session has a back-end request channel.
    #[getter]
    fn is_open(&self) -> bool {
        self.inner.is_open()
    }

    /// Sends request `code` with `payload` (a message dataclass, int or None) and `fds`; with
    /// `need_reply` waits up to `timeout` seconds for the front-end's status and returns it.
    #[pyo3(signature = (code, payload=None, fds=Vec::new(), *, need_reply=false, timeout=5.0))]
    fn send(
        &self,
        py: Python<'_>,
        code: u32,
        payload: Option<Bound<'_, PyAny>>,
        fds: Vec<RawFd>,
        need_reply: bool,
        timeout: Option<f64>,
    ) -> PyResult<Option<u64>> {
        let request = BackendRequest::from_code(code)
            .ok_or_else(|| PyValueError::new_err(format!("unknown back-end request code {code}")))?;
        let payload = match payload {
            Some(p) => super::wire::payload_from_py(&p)?,
            None => crate::protocol::Payload::Empty,
        };
        let timeout = super::blocking::timeout(timeout)?;
        let borrowed = super::socket::borrow_fds(&fds)?;
        let inner = self.inner.clone();
        py.detach(|| inner.send(request, payload, &borrowed, need_reply, timeout)).map_err(|e| to_pyerr(py, e))
    }

    /// SHARED_OBJECT_LOOKUP for `uuid`: waits up to `timeout` seconds for the front-end's
    /// mandatory reply; returns ``(status, fd or None)`` (the fd is the caller's to close).
    #[pyo3(signature = (uuid, *, timeout=5.0))]
    fn shared_object_lookup(
        &self,
        py: Python<'_>,
        uuid: Vec<u8>,
        timeout: Option<f64>,
    ) -> PyResult<(u64, Option<RawFd>)> {
        let uuid: [u8; 16] = uuid.try_into().map_err(|_| PyValueError::new_err("a UUID is 16 bytes"))?;
        let timeout = super::blocking::timeout(timeout)?;
        let inner = self.inner.clone();
        let (status, fd) =
            py.detach(|| crate::backend::shared_object_lookup(&inner, uuid, timeout)).map_err(|e| to_pyerr(py, e))?;
        Ok((status, fd.map(std::os::fd::IntoRawFd::into_raw_fd)))
    }

    /// SHMEM_MAP of `fd` into region `shmid`, checked against `regions` (the device's declared
    /// sizes) before it is sent.
    #[pyo3(signature = (regions, shmid, fd, *, fd_offset, shm_offset, length, writable, need_reply=false, timeout=5.0))]
    #[allow(clippy::too_many_arguments)]
    fn shmem_map(
        &self,
        py: Python<'_>,
        regions: Vec<u64>,
        shmid: u8,
        fd: RawFd,
        fd_offset: u64,
        shm_offset: u64,
        length: u64,
        writable: bool,
        need_reply: bool,
        timeout: Option<f64>,
    ) -> PyResult<Option<u64>> {
        let timeout = super::blocking::timeout(timeout)?;
        let borrowed = super::socket::borrow_fds(std::slice::from_ref(&fd))?;
        let inner = self.inner.clone();
        py.detach(|| {
            crate::backend::shmem_map(
                &inner,
                &regions,
                shmid,
                borrowed[0],
                fd_offset,
                shm_offset,
                length,
                writable,
                need_reply,
                timeout,
            )
        })
        .map_err(|e| to_pyerr(py, e))
    }

    /// SHMEM_UNMAP of `length` bytes at `shm_offset` of region `shmid`, checked against
    /// `regions` first.
    #[pyo3(signature = (regions, shmid, *, shm_offset, length, need_reply=false, timeout=5.0))]
    #[allow(clippy::too_many_arguments)]
    fn shmem_unmap(
        &self,
        py: Python<'_>,
        regions: Vec<u64>,
        shmid: u8,
        shm_offset: u64,
        length: u64,
        need_reply: bool,
        timeout: Option<f64>,
    ) -> PyResult<Option<u64>> {
        let timeout = super::blocking::timeout(timeout)?;
        let inner = self.inner.clone();
        py.detach(|| crate::backend::shmem_unmap(&inner, &regions, shmid, shm_offset, length, need_reply, timeout))
            .map_err(|e| to_pyerr(py, e))
    }
}

/// A flag that ends a background ``serve_device`` loop.
#[pyclass(module = "vhostuser_rs", name = "StopFlag", frozen)]
pub(crate) struct StopFlag {
    flag: Arc<AtomicBool>,
}

#[pymethods]
impl StopFlag {
    #[new]
    fn new() -> StopFlag {
        StopFlag { flag: Arc::new(AtomicBool::new(false)) }
    }

    /// Asks the serving loop to end.
    fn set(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    /// Whether :meth:`set` was called.
    #[getter]
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn serve(
    py: Python<'_>,
    device: Arc<dyn Device>,
    at: Where,
    max_connections: Option<u32>,
    flag: Option<Arc<AtomicBool>>,
    requests: Arc<BackendRequests>,
    policy: WorkerPolicy,
) -> PyResult<()> {
    let interrupted = AtomicBool::new(false);
    let stopped = || flag.as_ref().is_some_and(|f| f.load(Ordering::Relaxed));
    let stop = || {
        if interrupted.load(Ordering::Relaxed) || stopped() {
            return true;
        }
        let hit = Python::attach(|py| py.check_signals().is_err());
        if hit {
            interrupted.store(true, Ordering::Relaxed);
        }
        hit
    };
    let serve =
        |conn: Connection| -> Result<(), Error> { serve_session(&conn, device.clone(), &requests, &policy, &stop) };
    let mut adopted = None;
    if let Some(fd) = at.fd {
        if fd < 0 {
            return Err(PyValueError::new_err("invalid file descriptor"));
        }
        // SAFETY: the caller hands over an open socket; it is duplicated.
        let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().map_err(|e| os_error(&e))?;
        // The spec's --fd: a connected socket serves that one front-end; a listening one
        // (bound by the management layer) is served like --socket-path.
        if !crate::connection::is_listening(owned.as_fd()).map_err(|e| os_error(&e))? {
            let conn = Connection::from_fd(owned).py_err(py)?;
            let r = py.detach(|| serve(conn));
            return finish(py, r, &interrupted);
        }
        adopted = Some(Arc::new(Listener::from_fd(owned).py_err(py)?));
    }
    let listener = match (adopted.or(at.listener), at.socket_path) {
        (Some(l), _) => l,
        (None, Some(path)) => Arc::new(Listener::bind(&path, true).py_err(py)?),
        (None, None) => return Err(PyValueError::new_err("give socket_path, fd or listener")),
    };
    let mut served = 0u32;
    loop {
        if max_connections.is_some_and(|m| served >= m) || stopped() {
            return Ok(());
        }
        let conn = loop {
            match py.detach(|| listener.accept(Deadline::after(Some(Duration::from_millis(200))))) {
                Ok(c) => break c,
                Err(Error::Timeout(_)) if stopped() => return Ok(()),
                Err(Error::Timeout(_)) => py.check_signals()?,
                Err(e) => return Err(to_pyerr(py, e)),
            }
        };
        served += 1;
        if let Err(e) = py.detach(|| serve(conn)) {
            // A signal that ended the session is handled first (the logging call below would
            // run its handler and swallow the KeyboardInterrupt).
            py.check_signals()?;
            // A broken or hostile front-end ends its own session only; accept the next one.
            warn(py, format!("front-end session ended: {e}"));
        }
        if interrupted.load(Ordering::Relaxed) {
            return py.check_signals().map(|_| ()).and(Err(pyo3::exceptions::PyKeyboardInterrupt::new_err(())));
        }
    }
}

fn finish(py: Python<'_>, r: Result<(), Error>, interrupted: &AtomicBool) -> PyResult<()> {
    if interrupted.load(Ordering::Relaxed) {
        return Err(pyo3::exceptions::PyKeyboardInterrupt::new_err(()));
    }
    r.map_err(|e| to_pyerr(py, e))
}

/// The back-end's coverage of every front-end request, from `backend::coverage`:
/// (code, handling, offer, refusal, note) per request, in code order.
#[pyfunction]
pub(crate) fn backend_coverage() -> Vec<(u32, &'static str, &'static str, &'static str, &'static str)> {
    crate::backend::coverage()
        .into_iter()
        .map(|c| (c.request.code(), c.handling.name(), c.offer.name(), c.refusal.describe(), c.note))
        .collect()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(backend_coverage, m)?)?;
    m.add_function(wrap_pyfunction!(serve_blk, m)?)?;
    m.add_function(wrap_pyfunction!(serve_device, m)?)?;
    m.add_class::<StopFlag>()?;
    m.add_class::<PyDeviceServer>()?;
    m.add_class::<PyBackendSession>()?;
    m.add_class::<PyBackendRequests>()?;
    Ok(())
}
