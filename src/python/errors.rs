//! The one funnel from Rust errors into the Python exception hierarchy of
//! `vhostuser_rs/exceptions.py` (DESIGN.md §3, STYLE.md §2.3).

use std::io;

use pyo3::exceptions::{PyOSError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::error::Error;
use crate::protocol::{Channel, ProtocolError, Request};

/// The Python value of a request: the enum member if the spec defines the code, else the int.
pub(crate) fn py_request<'py>(py: Python<'py>, request: Request) -> PyResult<Bound<'py, PyAny>> {
    let enums = py.import("vhostuser_rs.enums")?;
    match request {
        Request::Frontend(r) => enums.getattr("FrontendRequest")?.call1((r.code(),)),
        Request::Backend(r) => enums.getattr("BackendRequest")?.call1((r.code(),)),
        Request::Unknown(_, code) => Ok(code.into_pyobject(py)?.into_any()),
    }
}

fn raise(py: Python<'_>, class: &str, message: String, attrs: &[(&str, Bound<'_, PyAny>)]) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let cls = py.import("vhostuser_rs.exceptions")?.getattr(class)?;
        let kwargs = PyDict::new(py);
        for (k, v) in attrs {
            kwargs.set_item(k, v)?;
        }
        Ok(PyErr::from_value(cls.call((message,), Some(&kwargs))?))
    };
    build().unwrap_or_else(|e| e)
}

fn request_attr<'py>(py: Python<'py>, request: Option<Request>) -> Vec<(&'static str, Bound<'py, PyAny>)> {
    match request.map(|r| py_request(py, r)) {
        Some(Ok(value)) => vec![("request", value)],
        _ => vec![],
    }
}

/// An `OSError` built as `OSError(errno, strerror)`, so CPython picks the subclass
/// (`FileNotFoundError`, ...) and sets `.errno`.
pub(crate) fn os_error(err: &io::Error) -> PyErr {
    match err.raw_os_error() {
        Some(errno) => {
            let text = io::Error::from_raw_os_error(errno).to_string();
            // Rust appends " (os error N)"; Python shows the errno itself.
            let text = text.split(" (os error").next().unwrap_or(&text).to_string();
            PyOSError::new_err((errno, text))
        }
        None => PyOSError::new_err((libc::EINVAL, err.to_string())),
    }
}

pub(crate) fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
    match err {
        Error::Protocol(e) => protocol_error(py, e),
        Error::Disconnected => raise(py, "ConnectionClosedError", err.to_string(), &[]),
        Error::Timeout(_) => raise(py, "VhostUserTimeoutError", err.to_string(), &[]),
        Error::Rejected { request, status } => {
            let mut attrs = request_attr(py, Some(request));
            attrs.push(("status", status.into_pyobject(py).map(|s| s.into_any()).unwrap_or_else(|e| match e {})));
            raise(py, "RequestRejectedError", err.to_string(), &attrs)
        }
        Error::Memory(ref e) => {
            let mut attrs = vec![];
            if let Some((addr, len)) = e.range() {
                attrs.push(("address", addr.into_pyobject(py).map(|v| v.into_any()).unwrap_or_else(|e| match e {})));
                attrs.push(("length", len.into_pyobject(py).map(|v| v.into_any()).unwrap_or_else(|e| match e {})));
            }
            raise(py, "GuestMemoryError", err.to_string(), &attrs)
        }
        Error::Queue { queue, ref source } => {
            let mut attrs =
                vec![("queue_index", queue.into_pyobject(py).map(|v| v.into_any()).unwrap_or_else(|e| match e {}))];
            if let Some(head) = source.head() {
                attrs.push(("head", head.into_pyobject(py).map(|v| v.into_any()).unwrap_or_else(|e| match e {})));
            }
            raise(py, "VirtqueueError", err.to_string(), &attrs)
        }
        Error::NotNegotiated { request, ref feature } => {
            let mut attrs = request_attr(py, Some(request));
            attrs.push(("feature", PyString::new(py, feature).into_any()));
            raise(py, "FeatureNotNegotiatedError", err.to_string(), &attrs)
        }
        Error::InvalidState { request, state } => {
            let mut attrs = request_attr(py, Some(request));
            attrs.push(("state", PyString::new(py, state).into_any()));
            raise(py, "InvalidStateError", err.to_string(), &attrs)
        }
        Error::Io(e) if e.kind() == io::ErrorKind::InvalidData && e.raw_os_error().is_none() => {
            raise(py, "MalformedMessageError", e.to_string(), &[])
        }
        Error::Io(e) => match e.downcast::<PyErr>() {
            // A Python exception that travelled through io::Error plumbing comes back unchanged.
            Ok(py_err) => py_err,
            Err(e) => os_error(&e),
        },
        #[allow(unreachable_patterns)]
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

pub(crate) fn protocol_error(py: Python<'_>, err: ProtocolError) -> PyErr {
    let attrs = request_attr(py, err.request());
    let class = match err {
        ProtocolError::UnexpectedReply { .. } | ProtocolError::Direction { .. } => "UnexpectedReplyError",
        _ => "MalformedMessageError",
    };
    raise(py, class, err.to_string(), &attrs)
}

/// Extension so `?` works on crate results inside `#[pymethods]`.
pub(crate) trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_pyerr(py, e))
    }
}

impl<T> IntoPyResult<T> for Result<T, ProtocolError> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| protocol_error(py, e))
    }
}

/// An inject rule of the proxy that does not parse: a `ValueError` (bad argument), not a
/// protocol error.
pub(crate) fn rule_error(err: crate::proxy::RuleError) -> PyErr {
    pyo3::exceptions::PyValueError::new_err(err.to_string())
}

/// The channel named by a Python `Channel` value (0 main, 1 back-end).
pub(crate) fn channel(value: u32) -> PyResult<Channel> {
    match value {
        0 => Ok(Channel::Main),
        1 => Ok(Channel::Backend),
        _ => Err(pyo3::exceptions::PyValueError::new_err(format!("unknown channel {value}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `exceptions.py` and `enums.py` from the source tree under their package names, so
    /// the funnel is checked against the real classes without building the extension.
    fn load_python_modules(py: Python<'_>) {
        let code = r#"
import importlib.util, sys, types
root = sys.argv_root
if "vhostuser_rs" not in sys.modules:
    pkg = types.ModuleType("vhostuser_rs"); pkg.__path__ = [root]; sys.modules["vhostuser_rs"] = pkg
for name in ("enums", "exceptions"):
    full = "vhostuser_rs." + name
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, f"{root}/{name}.py")
        mod = importlib.util.module_from_spec(spec); sys.modules[full] = mod; spec.loader.exec_module(mod)
"#;
        let sys = py.import("sys").unwrap();
        sys.setattr("argv_root", concat!(env!("CARGO_MANIFEST_DIR"), "/python/vhostuser_rs")).unwrap();
        let code = std::ffi::CString::new(code).unwrap();
        py.run(&code, None, None).unwrap();
    }

    fn check(err: Error, class: &str) {
        Python::initialize();
        Python::attach(|py| {
            load_python_modules(py);
            let pyerr = to_pyerr(py, err);
            let cls = py.import("vhostuser_rs.exceptions").unwrap().getattr(class).unwrap();
            assert!(pyerr.value(py).is_instance(&cls).unwrap(), "{class}: {pyerr}");
        });
    }

    #[test]
    fn every_arm_maps_to_its_class() {
        check(Error::Disconnected, "ConnectionClosedError");
        check(Error::Timeout("x"), "VhostUserTimeoutError");
        check(Error::Protocol(ProtocolError::Truncated { got: 1, expected: 12 }), "MalformedMessageError");
        check(
            Error::Rejected { request: Request::Frontend(crate::protocol::FrontendRequest::SET_OWNER), status: 1 },
            "RequestRejectedError",
        );
        check(
            Error::Protocol(ProtocolError::UnexpectedReply {
                request: Request::Frontend(crate::protocol::FrontendRequest::GET_FEATURES),
                got: Request::Frontend(crate::protocol::FrontendRequest::GET_STATUS),
            }),
            "UnexpectedReplyError",
        );
        Python::attach(|py| {
            let e = to_pyerr(
                py,
                Error::Protocol(ProtocolError::FdCount {
                    request: Request::Frontend(crate::protocol::FrontendRequest::SET_LOG_FD),
                    got: 0,
                    expected: "1".into(),
                }),
            );
            let request = e.value(py).getattr("request").unwrap();
            assert_eq!(request.getattr("name").unwrap().extract::<String>().unwrap(), "SET_LOG_FD");
            let e = to_pyerr(py, Error::Io(io::Error::from_raw_os_error(libc::ENOENT)));
            assert!(e.value(py).is_instance_of::<pyo3::exceptions::PyFileNotFoundError>());
            let errno: i32 = e.value(py).getattr("errno").unwrap().extract().unwrap();
            assert_eq!(errno, libc::ENOENT);
            let e = rule_error(crate::proxy::Rule::parse("drop:NOTHING").unwrap_err());
            assert!(e.value(py).is_instance_of::<pyo3::exceptions::PyValueError>());
        });
    }
}
