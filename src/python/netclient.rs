//! `NetClient`'s native half: the virtio-net driver data path (to be written).

use pyo3::prelude::*;

pub(crate) fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
