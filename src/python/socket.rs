//! `Connection` and `Listener`: raw message transport for Python (the base of `hazmat`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use super::blocking::{timeout, wait_until, SLICE};
use super::errors::{channel, to_pyerr, IntoPyResult};
use super::wire::message_to_py;
use crate::connection::{self, Connection, Deadline, Listener};
use crate::error::Error;
use crate::protocol::MAX_PAYLOAD_SIZE;

fn closed_error(py: Python<'_>) -> PyErr {
    to_pyerr(py, Error::Disconnected)
}

/// One end of a vhost-user channel that sends and receives whole messages with their file
/// descriptors. Received fds are returned as plain ints that the caller owns and must close.
#[pyclass(module = "vhostuser_rs", name = "Connection", frozen)]
pub(crate) struct PyConnection {
    inner: Mutex<Option<Arc<Connection>>>,
}

impl PyConnection {
    pub(crate) fn wrap(conn: Connection) -> PyConnection {
        PyConnection { inner: Mutex::new(Some(Arc::new(conn))) }
    }

    fn get(&self, py: Python<'_>) -> PyResult<Arc<Connection>> {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        guard.clone().ok_or_else(|| closed_error(py))
    }

    /// The connection, shared (fails once closed).
    pub(crate) fn shared(&self, py: Python<'_>) -> PyResult<Arc<Connection>> {
        self.get(py)
    }

    fn wait_readable(&self, py: Python<'_>, conn: &Arc<Connection>, deadline: Deadline) -> PyResult<()> {
        let c = conn.clone();
        wait_until(py, deadline, "waiting for a message", move |slice| c.readable(slice))
    }
}

/// Borrows fds the caller keeps open for the duration of a call (rejecting negative ones).
pub(crate) fn borrow_fds(fds: &[RawFd]) -> PyResult<Vec<BorrowedFd<'_>>> {
    fds.iter()
        .map(|&fd| {
            if fd < 0 {
                return Err(PyValueError::new_err(format!("invalid file descriptor {fd}")));
            }
            // SAFETY: the caller passes fds it keeps open for the duration of the call; a closed
            // one makes sendmsg fail with EBADF, which is reported, not undefined.
            Ok(unsafe { BorrowedFd::borrow_raw(fd) })
        })
        .collect()
}

fn fds_to_py(py: Python<'_>, fds: Vec<OwnedFd>) -> PyResult<Bound<'_, PyList>> {
    PyList::new(py, fds.into_iter().map(IntoRawFd::into_raw_fd))
}

#[pymethods]
impl PyConnection {
    /// Connects to the Unix socket at `path`, retrying while it does not exist yet or refuses
    /// connections (a peer that is still starting) until `timeout` seconds have passed.
    #[staticmethod]
    #[pyo3(signature = (path, *, timeout=5.0))]
    fn connect(py: Python<'_>, path: PathBuf, timeout: Option<f64>) -> PyResult<PyConnection> {
        let t = super::blocking::timeout(timeout)?;
        let conn = py.detach(|| Connection::connect(&path, t)).py_err(py)?;
        Ok(PyConnection::wrap(conn))
    }

    /// A connected socketpair, e.g. for SET_BACKEND_REQ_FD or for testing one peer in-process.
    #[staticmethod]
    fn pair(py: Python<'_>) -> PyResult<(PyConnection, PyConnection)> {
        let (a, b) = Connection::pair().py_err(py)?;
        Ok((PyConnection::wrap(a), PyConnection::wrap(b)))
    }

    /// Adopts a duplicate of `fd` (a connected Unix stream socket); the caller keeps `fd`.
    #[staticmethod]
    fn from_fd(py: Python<'_>, fd: RawFd) -> PyResult<PyConnection> {
        let one = [fd];
        let owned = borrow_fds(&one)?[0].try_clone_to_owned().map_err(|e| super::errors::os_error(&e))?;
        Ok(PyConnection::wrap(Connection::from_fd(owned).py_err(py)?))
    }

    /// Adopts a duplicate of a Python ``socket.socket``'s descriptor.
    #[staticmethod]
    fn from_socket(py: Python<'_>, sock: &Bound<'_, PyAny>) -> PyResult<PyConnection> {
        let fd: RawFd = sock.call_method0("fileno")?.extract()?;
        PyConnection::from_fd(py, fd)
    }

    /// Sends `data` (a whole message: header + payload) with `fds` attached to its first byte.
    /// The fds are borrowed: the caller still owns and closes them.
    #[pyo3(signature = (data, fds=Vec::new(), *, timeout=None))]
    fn send(&self, py: Python<'_>, data: &[u8], fds: Vec<RawFd>, timeout: Option<f64>) -> PyResult<()> {
        let conn = self.get(py)?;
        let deadline = Deadline::after(super::blocking::timeout(timeout)?);
        let borrowed = borrow_fds(&fds)?;
        let data = data.to_vec();
        py.detach(|| conn.send_bytes(&data, &borrowed, deadline)).py_err(py)
    }

    /// Receives one message without validating it: ``(bytes, fds)``. A payload larger than
    /// `max_payload` is refused without reading it (the connection is then out of step).
    #[pyo3(signature = (*, timeout=None, max_payload=MAX_PAYLOAD_SIZE))]
    fn recv_raw<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
        max_payload: usize,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyList>)> {
        let conn = self.get(py)?;
        let deadline = Deadline::after(super::blocking::timeout(timeout)?);
        self.wait_readable(py, &conn, deadline)?;
        let raw = py.detach(|| conn.recv_raw(deadline, max_payload)).py_err(py)?;
        let bytes = PyBytes::new(py, &raw.bytes());
        Ok((bytes, fds_to_py(py, raw.fds)?))
    }

    /// Receives and decodes one message of `channel` (0 main, 1 back-end request channel):
    /// ``(Message, fds)``. A message that breaks the spec raises ``MalformedMessageError`` and
    /// its fds are closed.
    #[pyo3(signature = (channel_value=0, *, timeout=None))]
    fn recv<'py>(
        &self,
        py: Python<'py>,
        channel_value: u32,
        timeout: Option<f64>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyList>)> {
        let chan = channel(channel_value)?;
        let conn = self.get(py)?;
        let deadline = Deadline::after(super::blocking::timeout(timeout)?);
        self.wait_readable(py, &conn, deadline)?;
        let got = py.detach(|| conn.recv(chan, deadline)).py_err(py)?;
        Ok((message_to_py(py, &got.message)?, fds_to_py(py, got.fds)?))
    }

    /// Whether a message (or EOF) is waiting; waits up to `timeout` seconds.
    #[pyo3(signature = (timeout=0.0))]
    fn poll(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let conn = self.get(py)?;
        let deadline = Deadline::after(super::blocking::timeout(timeout)?);
        loop {
            let slice = deadline.remaining().map(|r| r.min(SLICE)).unwrap_or(SLICE);
            if py.detach(|| conn.readable(Some(slice))).py_err(py)? {
                return Ok(true);
            }
            py.check_signals()?;
            if deadline.expired() {
                return Ok(false);
            }
        }
    }

    /// The socket's file descriptor (for ``selectors`` / ``asyncio`` readers).
    fn fileno(&self, py: Python<'_>) -> PyResult<RawFd> {
        Ok(self.get(py)?.as_raw_fd())
    }

    /// Whether :meth:`close` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// Closes the connection. Idempotent; a call blocked in another thread wakes up with
    /// ``ConnectionClosedError``. The socket is shut down to wake such calls, which also ends
    /// other descriptors of the same socket (e.g. the one adopted with ``from_socket``).
    fn close(&self) {
        let taken = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(conn) = taken {
            conn.shutdown();
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        match self.inner.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(c) => format!("<vhostuser_rs.Connection fd={}>", c.as_fd().as_raw_fd()),
            None => "<vhostuser_rs.Connection closed>".into(),
        }
    }
}

/// A listening Unix socket. The socket file is removed when the listener is closed.
#[pyclass(module = "vhostuser_rs", name = "Listener", frozen)]
pub(crate) struct PyListener {
    inner: Mutex<Option<Arc<Listener>>>,
    path: PathBuf,
}

impl PyListener {
    pub(crate) fn get(&self, py: Python<'_>) -> PyResult<Arc<Listener>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| closed_error(py))
    }
}

#[pymethods]
impl PyListener {
    /// Binds and listens on `path`. With `replace_existing`, a stale socket file that nobody
    /// answers on is removed first.
    #[staticmethod]
    #[pyo3(signature = (path, *, replace_existing=false))]
    fn bind(py: Python<'_>, path: PathBuf, replace_existing: bool) -> PyResult<PyListener> {
        let l = Listener::bind(&path, replace_existing).py_err(py)?;
        Ok(PyListener { inner: Mutex::new(Some(Arc::new(l))), path })
    }

    /// Waits up to `timeout` seconds for one connection.
    #[pyo3(signature = (*, timeout=None))]
    fn accept(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyConnection> {
        let l = self.get(py)?;
        let deadline = Deadline::after(super::blocking::timeout(timeout)?);
        loop {
            let slice = Deadline::after(Some(
                deadline
                    .remaining()
                    .map(|r| r.min(std::time::Duration::from_millis(100)))
                    .unwrap_or(std::time::Duration::from_millis(100)),
            ));
            match py.detach(|| l.accept(slice)) {
                Ok(c) => return Ok(PyConnection::wrap(c)),
                Err(Error::Timeout(_)) if !deadline.expired() => py.check_signals()?,
                Err(e) => return Err(to_pyerr(py, e)),
            }
        }
    }

    /// The socket path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// The listening socket's file descriptor.
    fn fileno(&self, py: Python<'_>) -> PyResult<RawFd> {
        Ok(self.get(py)?.as_raw_fd())
    }

    /// Stops listening and removes the socket file. Idempotent.
    fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close();
        false
    }
}

/// Duplicates `fd` into a new close-on-exec descriptor owned by the caller.
#[pyfunction]
fn dup_cloexec(fd: RawFd) -> PyResult<RawFd> {
    let one = [fd];
    let b = borrow_fds(&one)?;
    connection::dup_cloexec(b[0]).map(IntoRawFd::into_raw_fd).map_err(|e| super::errors::os_error(&e))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyConnection>()?;
    m.add_class::<PyListener>()?;
    m.add_function(wrap_pyfunction!(dup_cloexec, m)?)?;
    let _ = timeout;
    Ok(())
}
