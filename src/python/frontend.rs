//! `FrontendCore`: the Rust front-end behind `vhostuser_rs.Frontend` (frontend.py), and the
//! bridge that lets a Python `BackendRequestHandler` serve the back-end request channel.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::blocking::timeout;
use super::errors::{to_pyerr, IntoPyResult};
use super::wire::{message_to_py, payload_from_py};
use crate::connection::{Connection, Deadline};
use crate::error::Error;
use crate::frontend::channel::{BackendChannel, BackendRequestHandler, NOT_SUPPORTED};
use crate::frontend::{Frontend, RequestOptions};
use crate::protocol::{FrontendRequest, Message};

/// The Rust core of a front-end session (use ``vhostuser_rs.Frontend``).
#[pyclass(module = "vhostuser_rs", name = "FrontendCore", frozen)]
pub(crate) struct PyFrontendCore {
    inner: Arc<Frontend>,
    channel: Mutex<Option<BackendChannel>>,
}

fn borrow(fds: &[RawFd]) -> PyResult<Vec<BorrowedFd<'_>>> {
    fds.iter()
        .map(|&fd| {
            if fd < 0 {
                return Err(PyValueError::new_err(format!("invalid file descriptor {fd}")));
            }
            // SAFETY: the caller keeps these fds open for the duration of the call.
            Ok(unsafe { BorrowedFd::borrow_raw(fd) })
        })
        .collect()
}

struct PyHandler {
    handler: Py<PyAny>,
}

impl BackendRequestHandler for PyHandler {
    fn handle(&mut self, message: &Message, fds: Vec<OwnedFd>) -> (u64, Option<OwnedFd>) {
        Python::attach(|py| {
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let result = message_to_py(py, message)
                .and_then(|m| self.handler.bind(py).call_method1("_vhostuser_dispatch", (m, raw)));
            // The fds were lent to the handler for the call; they are closed now.
            drop(fds);
            match result.and_then(|r| r.extract::<(u64, Option<RawFd>)>()) {
                Ok((status, None)) => (status, None),
                Ok((status, Some(fd))) => {
                    // SAFETY: the handler returns an fd it keeps open; we send a duplicate.
                    let dup = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().ok();
                    (status, dup)
                }
                Err(e) => {
                    e.print(py);
                    (NOT_SUPPORTED, None)
                }
            }
        })
    }

    fn malformed(&mut self, error: &Error) {
        let text = error.to_string();
        Python::attach(|py| {
            let log = py.import("logging").and_then(|l| l.call_method1("getLogger", ("vhostuser_rs.frontend",)));
            if let Ok(log) = log {
                let _ = log.call_method1("warning", ("back-end request channel: %s", text));
            }
        });
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
        Ok(PyFrontendCore { inner: Arc::new(Frontend::new(conn)), channel: Mutex::new(None) })
    }

    /// Adopts a duplicate of a connected Unix stream socket's fd.
    #[staticmethod]
    fn from_fd(py: Python<'_>, fd: RawFd) -> PyResult<PyFrontendCore> {
        let one = [fd];
        let owned = borrow(&one)?[0].try_clone_to_owned().map_err(|e| super::errors::os_error(&e))?;
        let conn = Connection::from_fd(owned).py_err(py)?;
        Ok(PyFrontendCore { inner: Arc::new(Frontend::new(conn)), channel: Mutex::new(None) })
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
        let req = FrontendRequest::from_code(request)
            .ok_or_else(|| PyValueError::new_err(format!("unknown front-end request {request}")))?;
        let payload = match payload {
            Some(p) => payload_from_py(&p)?,
            None => crate::protocol::Payload::Empty,
        };
        let borrowed = borrow(&fds)?;
        let opts = RequestOptions {
            need_reply,
            check_gate,
            deadline: Deadline::after(super::blocking::timeout(timeout)?),
            ..RequestOptions::default()
        };
        let fe = self.inner.clone();
        let result = py.detach(|| {
            let mut interrupt = || Python::attach(|py| py.check_signals()).map_err(|e| Error::Io(io::Error::other(e)));
            fe.request(req, payload, &borrowed, opts, &mut interrupt)
        });
        let reply = result.map_err(|e| to_pyerr(py, e))?;
        match reply {
            None => Ok((None, Vec::new())),
            Some(r) => {
                let fds = r.fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
                Ok((Some(message_to_py(py, &r.message)?), fds))
            }
        }
    }

    /// What was offered and acknowledged so far.
    fn negotiated<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let n = self.inner.negotiated();
        let d = PyDict::new(py);
        d.set_item("offered_features", n.offered_features)?;
        d.set_item("acked_features", n.acked_features)?;
        d.set_item("offered_protocol_features", n.offered_protocol)?;
        d.set_item("acked_protocol_features", n.acked_protocol)?;
        Ok(d)
    }

    /// Starts serving the back-end request channel with `handler` (an object with a
    /// ``_vhostuser_dispatch(message, fds)`` method); returns the back-end's end of the
    /// socketpair, which the caller sends with SET_BACKEND_REQ_FD and then closes. Replaces (and
    /// stops) any previous channel.
    fn start_backend_channel(&self, py: Python<'_>, handler: Py<PyAny>) -> PyResult<RawFd> {
        let old = self.channel.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut old) = old {
            py.detach(|| old.stop());
        }
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
    fn fileno(&self) -> RawFd {
        self.inner.connection().as_raw_fd()
    }

    /// Shuts the session down: wakes blocked requests, stops the back-end request channel.
    /// Idempotent.
    fn close(&self, py: Python<'_>) {
        self.inner.shutdown();
        let chan = self.channel.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut chan) = chan {
            // The channel thread may be waiting for the GIL: release it while joining.
            py.detach(|| chan.stop());
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyFrontendCore>()?;
    let _ = timeout;
    Ok(())
}
