//! Virtio device definitions exported to Python (the constants of `crate::virtio`).
//!
//! Each device type is one dict of name → int under the Rust constant's name, plus its config
//! layout as field → (offset, size); `python/vhostuser_rs/<device>.py` builds its enums from
//! them, so the values are defined once, in `src/virtio/`.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::virtio::blk;

/// `_native.VIRTIO_BLK`: every virtio-blk constant by name, and `_native.VIRTIO_BLK_CONFIG`:
/// field of `struct virtio_blk_config` → (offset, size).
fn register_blk(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let consts = PyDict::new(py);
    for &(name, bit) in blk::FEATURES {
        consts.set_item(name, bit)?;
    }
    for &(name, code) in blk::REQUEST_TYPES {
        consts.set_item(name, code)?;
    }
    for &(name, code) in blk::STATUSES {
        consts.set_item(name, code)?;
    }
    consts.set_item("VIRTIO_BLK_ID_BYTES", blk::VIRTIO_BLK_ID_BYTES)?;
    consts.set_item("VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP", blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)?;
    consts.set_item("SECTOR_SIZE", blk::SECTOR_SIZE)?;
    consts.set_item("CONFIG_SIZE", blk::CONFIG_SIZE)?;
    consts.set_item("REQUEST_HEADER_SIZE", blk::RequestHeader::SIZE)?;
    consts.set_item("DISCARD_WRITE_ZEROES_SIZE", blk::DiscardWriteZeroes::SIZE)?;
    m.add("VIRTIO_BLK", consts)?;

    let layout = PyDict::new(py);
    for (&(name, offset), width) in blk::config::FIELDS.iter().zip(blk::config::WIDTHS) {
        layout.set_item(name.to_ascii_lowercase(), (offset, width))?;
    }
    m.add("VIRTIO_BLK_CONFIG", layout)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    register_blk(m)
}
