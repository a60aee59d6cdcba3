//! Virtio device definitions exported to Python (the constants of `crate::virtio`).
//!
//! Each device type is one dict of name → int under the Rust constant's name, plus its config
//! layout as field → (offset, size); `python/vhostuser_rs/<device>.py` builds its enums from
//! them, so the values are defined once, in `src/virtio/`.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::virtio::{blk, net};

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

/// `_native.VIRTIO_NET`: virtio-net feature bit numbers (`VIRTIO_NET_F_*`), header flags and
/// GSO types, status bits, control-queue classes and commands, sizes.
fn register_net(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let d = PyDict::new(m.py());
    for &(mask, name) in net::feature::NAMES {
        d.set_item(format!("VIRTIO_NET_F_{name}"), mask.trailing_zeros())?;
    }
    let items: &[(&str, u64)] = &[
        ("VIRTIO_NET_HDR_F_NEEDS_CSUM", net::HDR_F_NEEDS_CSUM.into()),
        ("VIRTIO_NET_HDR_F_DATA_VALID", net::HDR_F_DATA_VALID.into()),
        ("VIRTIO_NET_HDR_GSO_NONE", net::HDR_GSO_NONE.into()),
        ("VIRTIO_NET_HDR_GSO_TCPV4", net::HDR_GSO_TCPV4.into()),
        ("VIRTIO_NET_HDR_GSO_UDP", net::HDR_GSO_UDP.into()),
        ("VIRTIO_NET_HDR_GSO_TCPV6", net::HDR_GSO_TCPV6.into()),
        ("VIRTIO_NET_HDR_GSO_ECN", net::HDR_GSO_ECN.into()),
        ("VIRTIO_NET_S_LINK_UP", net::S_LINK_UP.into()),
        ("VIRTIO_NET_S_ANNOUNCE", net::S_ANNOUNCE.into()),
        ("VIRTIO_NET_OK", net::ctrl::OK.into()),
        ("VIRTIO_NET_ERR", net::ctrl::ERR.into()),
        ("VIRTIO_NET_CTRL_RX", net::ctrl::CLASS_RX.into()),
        ("VIRTIO_NET_CTRL_RX_PROMISC", net::ctrl::RX_PROMISC.into()),
        ("VIRTIO_NET_CTRL_RX_ALLMULTI", net::ctrl::RX_ALLMULTI.into()),
        ("VIRTIO_NET_CTRL_RX_ALLUNI", net::ctrl::RX_ALLUNI.into()),
        ("VIRTIO_NET_CTRL_RX_NOMULTI", net::ctrl::RX_NOMULTI.into()),
        ("VIRTIO_NET_CTRL_RX_NOUNI", net::ctrl::RX_NOUNI.into()),
        ("VIRTIO_NET_CTRL_RX_NOBCAST", net::ctrl::RX_NOBCAST.into()),
        ("VIRTIO_NET_CTRL_MAC", net::ctrl::CLASS_MAC.into()),
        ("VIRTIO_NET_CTRL_MAC_TABLE_SET", net::ctrl::MAC_TABLE_SET.into()),
        ("VIRTIO_NET_CTRL_MAC_ADDR_SET", net::ctrl::MAC_ADDR_SET.into()),
        ("VIRTIO_NET_CTRL_VLAN", net::ctrl::CLASS_VLAN.into()),
        ("VIRTIO_NET_CTRL_ANNOUNCE", net::ctrl::CLASS_ANNOUNCE.into()),
        ("VIRTIO_NET_CTRL_ANNOUNCE_ACK", net::ctrl::ANNOUNCE_ACK.into()),
        ("VIRTIO_NET_CTRL_MQ", net::ctrl::CLASS_MQ.into()),
        ("VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET", net::ctrl::MQ_VQ_PAIRS_SET.into()),
        ("VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN", net::ctrl::MQ_VQ_PAIRS_MIN.into()),
        ("VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX", net::ctrl::MQ_VQ_PAIRS_MAX.into()),
        ("VIRTIO_NET_CTRL_GUEST_OFFLOADS", net::ctrl::CLASS_GUEST_OFFLOADS.into()),
        ("VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET", net::ctrl::GUEST_OFFLOADS_SET.into()),
        ("HDR_LEN", net::HDR_LEN as u64),
        ("HDR_LEN_LEGACY", net::HDR_LEN_LEGACY as u64),
        ("MAX_FRAME_LEN", net::MAX_FRAME_LEN as u64),
        ("MIN_FRAME_LEN", net::MIN_FRAME_LEN as u64),
        ("MIN_MTU", net::MIN_MTU.into()),
        ("CONFIG_SIZE", net::config::SIZE as u64),
    ];
    for &(name, v) in items {
        d.set_item(name, v)?;
    }
    m.add("VIRTIO_NET", d)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    register_blk(m)?;
    register_net(m)
}
