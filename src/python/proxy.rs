//! The proxy tracer from Python: `ProxyCore` runs a `crate::proxy::Proxy` and hands its
//! records over as `vhostuser_rs.proxy.ProxyRecord` dataclasses.

use std::path::PathBuf;
use std::time::UNIX_EPOCH;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use super::blocking::{timeout, SLICE};
use super::errors::{py_request, rule_error, IntoPyResult};
use super::wire::payload_to_py;
use crate::connection::Deadline;
use crate::protocol::Channel;
use crate::proxy::{self, Event, Proxy, ProxyConfig, Record, Rule};

/// A running proxy (see `vhostuser_rs.Proxy`, which wraps it).
#[pyclass(module = "vhostuser_rs", name = "ProxyCore", frozen)]
pub(crate) struct ProxyCore {
    proxy: Proxy,
}

fn record_to_py<'py>(py: Python<'py>, record: &Record) -> PyResult<Bound<'py, PyAny>> {
    let kw = PyDict::new(py);
    kw.set_item("time", record.time.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64())?;
    kw.set_item("elapsed", record.elapsed.as_secs_f64())?;
    kw.set_item("session", record.session)?;
    kw.set_item("text", proxy::text(record))?;
    kw.set_item("json", proxy::json(record))?;
    let event = match &record.event {
        Event::Connected => "connected",
        Event::Message(t) => {
            let channel = py.import("vhostuser_rs.enums")?.getattr("Channel")?;
            kw.set_item("channel", channel.call1((u32::from(t.channel == Channel::Backend),))?)?;
            kw.set_item("direction", t.from.arrow())?;
            kw.set_item("request", py_request(py, t.request())?)?;
            kw.set_item("is_reply", t.header.is_reply())?;
            kw.set_item("flags", t.header.flags)?;
            kw.set_item("size", t.header.size)?;
            kw.set_item("num_fds", t.num_fds)?;
            kw.set_item("raw", PyBytes::new(py, &t.payload))?;
            match &t.decoded {
                Ok(message) => kw.set_item("payload", payload_to_py(py, &message.payload)?)?,
                Err(e) => kw.set_item("error", e.to_string())?,
            }
            kw.set_item("dropped", t.dropped)?;
            kw.set_item("injected", PyTuple::new(py, &t.injected)?)?;
            kw.set_item("substituted", t.substituted)?;
            "message"
        }
        Event::Note(note) => {
            kw.set_item("reason", note)?;
            "note"
        }
        Event::Closed { reason, clean } => {
            kw.set_item("reason", reason)?;
            kw.set_item("clean", *clean)?;
            "closed"
        }
    };
    kw.set_item("event", event)?;
    py.import("vhostuser_rs.proxy")?.getattr("ProxyRecord")?.call((), Some(&kw))
}

#[pymethods]
impl ProxyCore {
    /// Parses the rules, binds `listen` and starts accepting front-ends.
    #[new]
    #[pyo3(signature = (listen, connect, *, inject=Vec::new(), connect_timeout=5.0, io_timeout=5.0, once=false))]
    fn new(
        py: Python<'_>,
        listen: PathBuf,
        connect: PathBuf,
        inject: Vec<String>,
        connect_timeout: f64,
        io_timeout: f64,
        once: bool,
    ) -> PyResult<ProxyCore> {
        let rules = inject.iter().map(|r| Rule::parse(r)).collect::<Result<Vec<_>, _>>().map_err(rule_error)?;
        let config = ProxyConfig {
            listen,
            connect,
            rules,
            connect_timeout: timeout(Some(connect_timeout))?.unwrap_or_default(),
            io_timeout: timeout(Some(io_timeout))?.unwrap_or_default(),
            once,
        };
        let proxy = py.detach(|| Proxy::start(config)).py_err(py)?;
        Ok(ProxyCore { proxy })
    }

    /// Up to `max` records, waiting up to `timeout` seconds for the first; `[]` if none came.
    #[pyo3(signature = (max=256, *, timeout=None))]
    fn next_records<'py>(&self, py: Python<'py>, max: usize, timeout: Option<f64>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let deadline = Deadline::after(super::blocking::timeout(timeout)?);
        loop {
            let slice = deadline.remaining().map(|r| r.min(SLICE)).unwrap_or(SLICE);
            let records = py.detach(|| self.proxy.next_records(max, Some(slice)));
            if !records.is_empty() || deadline.expired() || self.proxy.is_finished() {
                return records.iter().map(|r| record_to_py(py, r)).collect();
            }
            py.check_signals()?;
        }
    }

    /// Whether the proxy has finished (closed, or its one session ended with `once`) and every
    /// record was read.
    #[getter]
    fn finished(&self) -> bool {
        self.proxy.is_finished()
    }

    /// Stops accepting, ends every session and waits for the proxy's threads. Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.proxy.close());
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ProxyCore>()?;
    Ok(())
}
