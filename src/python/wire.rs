//! Conversions between protocol messages and the Python dataclasses of
//! `vhostuser_rs/messages.py`, and the pure encode/decode functions behind `hazmat`.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use super::errors::{channel, py_request, IntoPyResult};
use crate::protocol::*;

fn messages(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    py.import("vhostuser_rs.messages")
}

fn build<'py>(py: Python<'py>, class: &str, fields: &[(&str, Bound<'py, PyAny>)]) -> PyResult<Bound<'py, PyAny>> {
    let kwargs = PyDict::new(py);
    for (k, v) in fields {
        kwargs.set_item(k, v)?;
    }
    messages(py)?.getattr(class)?.call((), Some(&kwargs))
}

macro_rules! fields {
    ($py:expr; $($name:literal => $value:expr),* $(,)?) => {
        [$(($name, pyo3::IntoPyObjectExt::into_bound_py_any($value, $py)?)),*]
    };
}

fn region_to_py<'py>(py: Python<'py>, r: &MemoryRegion) -> PyResult<Bound<'py, PyAny>> {
    let xen = match r.xen {
        Some(x) => build(py, "XenMmap", &fields!(py; "flags" => x.flags, "domid" => x.domid))?,
        None => py.None().into_bound(py),
    };
    build(
        py,
        "MemoryRegion",
        &[
            ("guest_addr", r.guest_addr.into_pyobject(py)?.into_any()),
            ("size", r.size.into_pyobject(py)?.into_any()),
            ("user_addr", r.user_addr.into_pyobject(py)?.into_any()),
            ("mmap_offset", r.mmap_offset.into_pyobject(py)?.into_any()),
            ("xen", xen),
        ],
    )
}

/// A payload as the Python value `messages.py` documents.
pub(crate) fn payload_to_py<'py>(py: Python<'py>, payload: &Payload) -> PyResult<Bound<'py, PyAny>> {
    Ok(match payload {
        Payload::Empty => py.None().into_bound(py),
        Payload::U64(v) => v.into_pyobject(py)?.into_any(),
        Payload::Raw(b) => PyBytes::new(py, b).into_any(),
        Payload::VringState(s) => build(py, "VringState", &fields!(py; "index" => s.index, "num" => s.num))?,
        Payload::VringAddr(a) => build(
            py,
            "VringAddr",
            &fields!(py;
                "index" => a.index, "flags" => a.flags, "desc_user_addr" => a.desc_user_addr,
                "used_user_addr" => a.used_user_addr, "avail_user_addr" => a.avail_user_addr,
                "log_guest_addr" => a.log_guest_addr),
        )?,
        Payload::VringFd(f) => build(py, "VringFd", &fields!(py; "index" => f.index, "nofd" => f.nofd))?,
        Payload::MemoryTable(regions) => {
            let items = regions.iter().map(|r| region_to_py(py, r)).collect::<PyResult<Vec<_>>>()?;
            build(py, "MemoryTable", &[("regions", PyTuple::new(py, items)?.into_any())])?
        }
        Payload::SingleRegion(r) => region_to_py(py, r)?,
        Payload::LogBase { mmap_size, mmap_offset } => {
            build(py, "LogBase", &fields!(py; "mmap_size" => *mmap_size, "mmap_offset" => *mmap_offset))?
        }
        Payload::Iotlb(m) => build(
            py,
            "IotlbMsg",
            &fields!(py; "iova" => m.iova, "size" => m.size, "uaddr" => m.uaddr, "perm" => m.perm, "type" => m.kind),
        )?,
        Payload::Config(c) => build(
            py,
            "DeviceConfig",
            &[
                ("offset", c.offset.into_pyobject(py)?.into_any()),
                ("data", PyBytes::new(py, &c.data).into_any()),
                ("flags", c.flags.into_pyobject(py)?.into_any()),
            ],
        )?,
        Payload::VringArea(a) => build(
            py,
            "VringArea",
            &fields!(py; "index" => a.index, "size" => a.size, "offset" => a.offset, "nofd" => a.nofd),
        )?,
        Payload::Inflight(d) => build(
            py,
            "InflightDesc",
            &fields!(py; "mmap_size" => d.mmap_size, "mmap_offset" => d.mmap_offset,
                "num_queues" => d.num_queues, "queue_size" => d.queue_size),
        )?,
        Payload::Shared(uuid) => build(py, "SharedObject", &[("uuid", PyBytes::new(py, uuid).into_any())])?,
        Payload::DeviceStateParams(p) => {
            build(py, "DeviceStateParams", &fields!(py; "direction" => p.direction, "phase" => p.phase))?
        }
        Payload::Mmap(m) => build(
            py,
            "MmapRequest",
            &fields!(py; "shmid" => m.shmid, "fd_offset" => m.fd_offset, "shm_offset" => m.shm_offset,
                "len" => m.len, "flags" => m.flags),
        )?,
        Payload::ShmemConfig(c) => {
            build(py, "ShmemConfig", &[("memory_sizes", PyTuple::new(py, &c.memory_sizes)?.into_any())])?
        }
        Payload::CryptoSession(c) => build(
            py,
            "CryptoSession",
            &[
                ("op_code", c.op_code.into_pyobject(py)?.into_any()),
                ("params", PyBytes::new(py, &c.params).into_any()),
                ("session_id", c.session_id.into_pyobject(py)?.into_any()),
            ],
        )?,
    })
}

fn get<'py, T: FromPyObjectOwned<'py>>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<T> {
    obj.getattr(name)?.extract::<T>().map_err(|e| {
        let e: PyErr = e.into();
        let class = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        PyValueError::new_err(format!("{class}.{name}: {e}"))
    })
}

fn region_from_py(obj: &Bound<'_, PyAny>) -> PyResult<MemoryRegion> {
    let xen = obj.getattr("xen")?;
    let xen =
        if xen.is_none() { None } else { Some(XenMmap { flags: get(&xen, "flags")?, domid: get(&xen, "domid")? }) };
    Ok(MemoryRegion {
        guest_addr: get(obj, "guest_addr")?,
        size: get(obj, "size")?,
        user_addr: get(obj, "user_addr")?,
        mmap_offset: get(obj, "mmap_offset")?,
        xen,
    })
}

/// The payload a Python value stands for (the inverse of [`payload_to_py`]).
pub(crate) fn payload_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Payload> {
    let py = obj.py();
    if obj.is_none() {
        return Ok(Payload::Empty);
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Payload::Raw(b.as_bytes().to_vec()));
    }
    if obj.is_instance_of::<pyo3::types::PyInt>() {
        return Ok(Payload::U64(obj.extract()?));
    }
    let m = messages(py)?;
    let is = |name: &str| -> PyResult<bool> { obj.is_instance(&m.getattr(name)?) };
    Ok(if is("VringState")? {
        Payload::VringState(VringState { index: get(obj, "index")?, num: get(obj, "num")? })
    } else if is("VringAddr")? {
        Payload::VringAddr(VringAddr {
            index: get(obj, "index")?,
            flags: get(obj, "flags")?,
            desc_user_addr: get(obj, "desc_user_addr")?,
            used_user_addr: get(obj, "used_user_addr")?,
            avail_user_addr: get(obj, "avail_user_addr")?,
            log_guest_addr: get(obj, "log_guest_addr")?,
        })
    } else if is("VringFd")? {
        Payload::VringFd(VringFd { index: get(obj, "index")?, nofd: get(obj, "nofd")? })
    } else if is("MemoryTable")? {
        let regions = obj.getattr("regions")?;
        let regions = regions.try_iter()?.map(|r| region_from_py(&r?)).collect::<PyResult<Vec<_>>>()?;
        Payload::MemoryTable(regions)
    } else if is("MemoryRegion")? {
        Payload::SingleRegion(region_from_py(obj)?)
    } else if is("LogBase")? {
        Payload::LogBase { mmap_size: get(obj, "mmap_size")?, mmap_offset: get(obj, "mmap_offset")? }
    } else if is("IotlbMsg")? {
        Payload::Iotlb(IotlbMsg {
            iova: get(obj, "iova")?,
            size: get(obj, "size")?,
            uaddr: get(obj, "uaddr")?,
            perm: get(obj, "perm")?,
            kind: get(obj, "type")?,
        })
    } else if is("DeviceConfig")? {
        Payload::Config(DeviceConfig {
            offset: get(obj, "offset")?,
            flags: get(obj, "flags")?,
            data: get(obj, "data")?,
        })
    } else if is("VringArea")? {
        Payload::VringArea(VringArea {
            index: get(obj, "index")?,
            nofd: get(obj, "nofd")?,
            size: get(obj, "size")?,
            offset: get(obj, "offset")?,
        })
    } else if is("InflightDesc")? {
        Payload::Inflight(InflightDesc {
            mmap_size: get(obj, "mmap_size")?,
            mmap_offset: get(obj, "mmap_offset")?,
            num_queues: get(obj, "num_queues")?,
            queue_size: get(obj, "queue_size")?,
        })
    } else if is("SharedObject")? {
        let uuid: Vec<u8> = get(obj, "uuid")?;
        Payload::Shared(uuid.try_into().map_err(|_| PyValueError::new_err("SharedObject.uuid must be 16 bytes"))?)
    } else if is("DeviceStateParams")? {
        Payload::DeviceStateParams(DeviceStateParams { direction: get(obj, "direction")?, phase: get(obj, "phase")? })
    } else if is("MmapRequest")? {
        Payload::Mmap(MmapRequest {
            shmid: get(obj, "shmid")?,
            fd_offset: get(obj, "fd_offset")?,
            shm_offset: get(obj, "shm_offset")?,
            len: get(obj, "len")?,
            flags: get(obj, "flags")?,
        })
    } else if is("ShmemConfig")? {
        let sizes: Vec<u64> = get(obj, "memory_sizes")?;
        if sizes.len() > MAX_SHMEM_REGIONS {
            return Err(PyValueError::new_err("ShmemConfig.memory_sizes holds at most 256 entries"));
        }
        Payload::ShmemConfig(ShmemConfig { memory_sizes: sizes })
    } else if is("CryptoSession")? {
        Payload::CryptoSession(CryptoSession {
            op_code: get(obj, "op_code")?,
            params: get(obj, "params")?,
            session_id: get(obj, "session_id")?,
        })
    } else {
        return Err(PyTypeError::new_err(format!(
            "not a vhost-user payload: {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        )));
    })
}

/// A decoded message as a `messages.Message`.
pub(crate) fn message_to_py<'py>(py: Python<'py>, message: &Message) -> PyResult<Bound<'py, PyAny>> {
    let chan = py.import("vhostuser_rs.enums")?.getattr("Channel")?.call1((match message.request.channel() {
        Channel::Main => 0,
        Channel::Backend => 1,
    },))?;
    build(
        py,
        "Message",
        &[
            ("request", py_request(py, message.request)?),
            ("payload", payload_to_py(py, &message.payload)?),
            ("flags", message.flags.into_pyobject(py)?.into_any()),
            ("channel", chan),
        ],
    )
}

fn message_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Message> {
    let chan = channel(get(obj, "channel")?)?;
    let code: u32 = get(obj, "request")?;
    Ok(Message {
        request: Request::from_code(chan, code),
        flags: get(obj, "flags")?,
        payload: payload_from_py(&obj.getattr("payload")?)?,
    })
}

/// Encodes a `messages.Message` into header + payload bytes. The header's size is the payload's
/// real size; use `encode_raw` to lie about it.
#[pyfunction]
fn encode_message<'py>(py: Python<'py>, message: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let msg = message_from_py(message)?;
    if msg.payload.encoded_len() > u32::MAX as usize {
        return Err(PyValueError::new_err("payload too large"));
    }
    Ok(PyBytes::new(py, &msg.encode()))
}

/// Encodes any header (even an invalid one) followed by raw payload bytes.
#[pyfunction]
#[pyo3(signature = (code, payload, flags, size=None))]
fn encode_raw<'py>(
    py: Python<'py>,
    code: u32,
    payload: &[u8],
    flags: u32,
    size: Option<u32>,
) -> PyResult<Bound<'py, PyBytes>> {
    let size = match size {
        Some(s) => s,
        None => u32::try_from(payload.len()).map_err(|_| PyValueError::new_err("payload too large"))?,
    };
    let mut out = Header { code, flags, size }.to_bytes().to_vec();
    out.extend_from_slice(payload);
    Ok(PyBytes::new(py, &out))
}

/// Decodes one whole message that arrived on `channel` with `num_fds` file descriptors,
/// applying every rule of the spec; raises `MalformedMessageError` naming the request.
#[pyfunction]
#[pyo3(signature = (data, channel_value, num_fds))]
fn decode_message<'py>(
    py: Python<'py>,
    data: &[u8],
    channel_value: u32,
    num_fds: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let msg = decode(channel(channel_value)?, data, num_fds).py_err(py)?;
    message_to_py(py, &msg)
}

/// Reads a header without validating it: (code, flags, size).
#[pyfunction]
fn decode_header(py: Python<'_>, data: &[u8]) -> PyResult<(u32, u32, u32)> {
    let h = Header::parse(data).py_err(py)?;
    Ok((h.code, h.flags, h.size))
}

/// Validates a header the way receivers do (version, reserved bits, REPLY+NEED_REPLY, size cap).
#[pyfunction]
fn validate_header(py: Python<'_>, code: u32, flags: u32, size: u32, channel_value: u32) -> PyResult<()> {
    Header { code, flags, size }.validate(channel(channel_value)?).py_err(py)
}

/// The rules of one request: (name, has_reply, request_fds, gate) in words, for docs and the CLI.
#[pyfunction]
fn request_rules(channel_value: u32, code: u32) -> PyResult<(String, bool, String, String)> {
    let request = Request::from_code(channel(channel_value)?, code);
    let rules = request.rules();
    let fds = match rules.fds {
        FdRule::Exactly(n) => n.to_string(),
        FdRule::AtMost(n) if n == usize::MAX => "any".into(),
        FdRule::AtMost(n) => format!("0..{n}"),
        FdRule::PerRegion => "one per region".into(),
        FdRule::UnlessNoFd => "1 unless NOFD".into(),
        FdRule::AtMostOneUnlessNoFd => "0..1 (0 with NOFD)".into(),
        FdRule::InflightReply | FdRule::DeviceStateReply => "see reply".into(),
    };
    let gate = match rules.gate {
        Gate::None => String::new(),
        Gate::ProtocolFeaturesOffered => "PROTOCOL_FEATURES offered".into(),
        Gate::ProtocolFeaturesAcked => "PROTOCOL_FEATURES".into(),
        Gate::Protocol(p) => p.names().join("+"),
        Gate::Virtio(v) => v.names().join("+"),
        Gate::Both(p, v) => format!("{}+{}", p.names().join("+"), v.names().join("+")),
    };
    Ok((request.to_string(), rules.has_reply(), fds, gate))
}

/// (name, code) of every request of a channel, as the Rust core knows them.
#[pyfunction]
fn request_codes(channel_value: u32) -> PyResult<Vec<(String, u32)>> {
    Ok(match channel(channel_value)? {
        Channel::Main => FrontendRequest::ALL.iter().map(|r| (r.name().to_string(), r.code())).collect(),
        Channel::Backend => BackendRequest::ALL.iter().map(|r| (r.name().to_string(), r.code())).collect(),
    })
}

/// (name, bit) of every named protocol feature ("protocol") or virtio feature ("virtio").
#[pyfunction]
fn feature_bits(kind: &str) -> PyResult<Vec<(String, u32)>> {
    let table = match kind {
        "protocol" => ProtocolFeatures::NAMED,
        "virtio" => VirtioFeatures::NAMED,
        _ => return Err(PyValueError::new_err("kind must be 'protocol' or 'virtio'")),
    };
    Ok(table.iter().map(|(n, b)| (n.to_string(), *b)).collect())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(encode_message, m)?)?;
    m.add_function(wrap_pyfunction!(encode_raw, m)?)?;
    m.add_function(wrap_pyfunction!(decode_message, m)?)?;
    m.add_function(wrap_pyfunction!(decode_header, m)?)?;
    m.add_function(wrap_pyfunction!(validate_header, m)?)?;
    m.add_function(wrap_pyfunction!(request_rules, m)?)?;
    m.add_function(wrap_pyfunction!(request_codes, m)?)?;
    m.add_function(wrap_pyfunction!(feature_bits, m)?)?;
    Ok(())
}
