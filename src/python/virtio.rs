//! Virtio device definitions exported to Python (the constants of `crate::virtio`).

use pyo3::prelude::*;

pub(crate) fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
