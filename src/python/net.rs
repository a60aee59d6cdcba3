//! The built-in net devices for Python: TAP and loopback (data path in Rust, never the
//! GIL) and their counters.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::backend::{policy, serve, Where};
use super::errors::os_error;
use crate::backend::{BackendRequests, Device};
use crate::devices::net::{Loopback, NetCounters, NetOptions, NetPort, TapNet};

/// Parses "52:54:00:12:34:56".
pub(crate) fn parse_mac(text: &str) -> PyResult<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    let bad = || PyValueError::new_err(format!("{text:?} is not a MAC address (six hex bytes separated by ':')"));
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

pub(crate) fn net_options(queue_pairs: u16, mac: Option<&str>, mtu: Option<u16>) -> PyResult<NetOptions> {
    if queue_pairs == 0 || queue_pairs > 0x8000 {
        return Err(PyValueError::new_err("queue_pairs must be within 1..=32768"));
    }
    if let Some(m) = mtu {
        if m < crate::virtio::net::MIN_MTU {
            return Err(PyValueError::new_err(format!("mtu must be at least {}", crate::virtio::net::MIN_MTU)));
        }
    }
    let mut options = NetOptions { queue_pairs, mtu, ..NetOptions::default() };
    if let Some(m) = mac {
        options.mac = parse_mac(m)?;
    }
    Ok(options)
}

pub(crate) fn counters_dict<'py>(py: Python<'py>, c: &NetCounters) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("tx_frames", c.tx_frames)?;
    d.set_item("tx_bytes", c.tx_bytes)?;
    d.set_item("tx_errors", c.tx_errors)?;
    d.set_item("rx_frames", c.rx_frames)?;
    d.set_item("rx_bytes", c.rx_bytes)?;
    d.set_item("rx_dropped", c.rx_dropped)?;
    Ok(d)
}

/// A built-in net device (``loopback`` or ``tap``), served with ``serve``.
#[pyclass(module = "vhostuser_rs", name = "BuiltinNet", frozen)]
pub(crate) struct PyBuiltinNet {
    device: Arc<dyn Device>,
    /// The same object, for its counters and state.
    port: Arc<dyn NetPort>,
}

impl PyBuiltinNet {
    fn new<P: NetPort>(device: P) -> PyBuiltinNet {
        let device = Arc::new(device);
        PyBuiltinNet { port: device.clone(), device }
    }
}

#[pymethods]
impl PyBuiltinNet {
    /// The loopback device: transmitted frames come back on RX with the MACs swapped.
    #[staticmethod]
    #[pyo3(signature = (*, queue_pairs=1, mac=None, mtu=None))]
    fn loopback(queue_pairs: u16, mac: Option<&str>, mtu: Option<u16>) -> PyResult<PyBuiltinNet> {
        Ok(PyBuiltinNet::new(Loopback::new(net_options(queue_pairs, mac, mtu)?)))
    }

    /// A TAP bridge: attaches to TAP `name` or creates it.
    #[staticmethod]
    #[pyo3(signature = (name, *, queue_pairs=1, mac=None, mtu=None, offloads=true))]
    fn tap(
        name: &str,
        queue_pairs: u16,
        mac: Option<&str>,
        mtu: Option<u16>,
        offloads: bool,
    ) -> PyResult<PyBuiltinNet> {
        let mut options = net_options(queue_pairs, mac, mtu)?;
        options.offloads = offloads;
        let tap = TapNet::open(name, options).map_err(|e| os_error(&e))?;
        Ok(PyBuiltinNet::new(tap))
    }

    /// Serves front-ends one at a time (see ``serve_blk``) until Ctrl-C/SIGTERM or
    /// `max_connections` sessions.
    #[pyo3(signature = (*, socket_path=None, fd=None, max_connections=None, workers=None, cpus=None, poll=0.0))]
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        py: Python<'_>,
        socket_path: Option<PathBuf>,
        fd: Option<i32>,
        max_connections: Option<u32>,
        workers: Option<usize>,
        cpus: Option<Vec<usize>>,
        poll: Option<f64>,
    ) -> PyResult<()> {
        let policy = policy(workers, cpus, poll)?;
        let device = self.device.clone();
        let at = Where { socket_path, fd, listener: None };
        serve(py, device, at, max_connections, None, Arc::new(BackendRequests::new()), policy)
    }

    /// Counters summed over the queue pairs, or of pair `queue_pair`.
    #[pyo3(signature = (queue_pair=None))]
    fn counters<'py>(&self, py: Python<'py>, queue_pair: Option<u16>) -> PyResult<Bound<'py, PyDict>> {
        let core = self.port.core();
        let c = match queue_pair {
            None => core.totals(),
            Some(p) => core.pair_totals(p).ok_or_else(|| PyValueError::new_err("no such queue pair"))?,
        };
        counters_dict(py, &c)
    }

    /// Queue pairs.
    #[getter]
    fn queue_pairs(&self) -> u16 {
        self.port.core().queue_pairs()
    }

    /// The virtio features the driver acknowledged (0 before a session).
    #[getter]
    fn acked_features(&self) -> u64 {
        self.port.core().acked()
    }

    /// The MTU in force (offered, or set with NET_SET_MTU).
    #[getter]
    fn mtu(&self) -> u16 {
        self.port.core().mtu()
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBuiltinNet>()?;
    Ok(())
}
