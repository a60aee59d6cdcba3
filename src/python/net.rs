//! Net devices for Python: the built-in TAP and loopback devices and Python-written net devices.

use pyo3::prelude::*;

pub(crate) fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
