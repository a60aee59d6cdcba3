//! Python bindings: the only module that uses PyO3.
//!
//! Everything here is thin: conversions between Python objects and the Rust layers, the error
//! funnel, and GIL handling around blocking calls. Logic lives in the layers below.

mod backend;
mod blkreq;
mod blocking;
mod device;
mod errors;
mod exports;
mod frontend;
mod log;
mod memory;
mod net;
mod netclient;
mod netdevice;
mod proxy;
mod socket;
mod virtio;
mod virtqueue;
mod wire;

use pyo3::prelude::*;

/// The extension module `vhostuser_rs._native`.
#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("HEADER_SIZE", crate::protocol::HEADER_SIZE)?;
    m.add("MAX_PAYLOAD_SIZE", crate::protocol::MAX_PAYLOAD_SIZE)?;
    m.add("MAX_FDS", crate::protocol::MAX_FDS)?;
    log::register(m)?;
    wire::register(m)?;
    socket::register(m)?;
    memory::register(m)?;
    virtqueue::register(m)?;
    frontend::register(m)?;
    blkreq::register(m)?;
    backend::register(m)?;
    exports::register(m)?;
    device::register(m)?;
    virtio::register(m)?;
    net::register(m)?;
    netdevice::register(m)?;
    netclient::register(m)?;
    proxy::register(m)?;
    Ok(())
}
