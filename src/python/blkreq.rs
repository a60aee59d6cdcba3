//! `BlockRequests`: the native request path of `vhostuser_rs.blk.BlockClient` (one call per
//! request, or per batch). Binds `crate::frontend::blkreq`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use super::errors::{to_pyerr, IntoPyResult};
use super::memory::PyGuestMemory;
use super::socket::borrow_fds;
use super::virtqueue::PyDriverQueue;
use crate::error::Error;
use crate::frontend::blkreq::{sector_of, BlockRequests, Completion, Op};
use crate::virtio::blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};

/// The request engine of one ring of a virtio-blk front-end (use ``BlockClient``).
#[pyclass(module = "vhostuser_rs", name = "BlockRequests", frozen)]
pub(crate) struct PyBlockRequests {
    engine: BlockRequests,
    queue: Py<PyDriverQueue>,
    /// Where `collect` copies a completion's data before making bytes of it.
    scratch: std::sync::Mutex<Vec<u8>>,
    /// The future of each request submitted with `submit_futures`, by slot, with its token.
    futures: std::sync::Mutex<Vec<Option<Held>>>,
}

/// A request submitted with `submit_futures`: its token, future, request type and, for a read
/// into a caller's buffer, that buffer (exported until the request completes: it cannot be
/// resized or freed meanwhile).
struct Held {
    token: u64,
    future: Py<PyAny>,
    kind: u32,
    into: Option<pyo3::buffer::PyBuffer<u8>>,
}

/// A completion collected with its data: a new bytes object for reads and GET_ID.
type Collected<'py> = (Completion, Option<Bound<'py, PyBytes>>);

/// A bytes object of `len` uninitialised bytes and its buffer, for the caller to fill before it
/// is shared (PyBytes::new_with would zero it first). The object must not be shown to anyone
/// before every byte is written.
fn uninit_bytes(py: Python<'_>, len: usize) -> PyResult<(Bound<'_, PyBytes>, &mut [u8])> {
    let size = isize::try_from(len).map_err(|_| PyValueError::new_err("read too long"))?;
    // SAFETY: a NULL source with a size is the documented way to allocate a bytes object to
    // fill before it is shared; the pointer is owned and checked for NULL.
    let bytes = unsafe {
        Bound::from_owned_ptr_or_err(py, pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size))?
            .cast_into_unchecked::<PyBytes>()
    };
    // SAFETY: the object is a bytes object of `len` bytes that nobody else sees yet; the
    // buffer lives as long as the object, which the caller holds.
    let buf = unsafe { std::slice::from_raw_parts_mut(pyo3::ffi::PyBytes_AsString(bytes.as_ptr()).cast::<u8>(), len) };
    Ok((bytes, buf))
}

/// A caller's writable buffer, lent to a detached wait (the export keeps it from moving).
struct OutBuf(*mut u8, usize);

impl OutBuf {
    /// # Safety
    /// The pointer must be valid for `len` bytes (or `len` 0) and not aliased meanwhile.
    unsafe fn slice<'a>(self) -> &'a mut [u8] {
        if self.1 == 0 || self.0.is_null() {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.0, self.1)
    }
}
// SAFETY: the buffer export outlives the detached section and nothing else writes it then.
unsafe impl Send for OutBuf {}

fn deadline(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    Ok(super::blocking::timeout(timeout)?.map(|t| Instant::now() + t))
}

fn interrupt() -> Result<(), Error> {
    Python::attach(|py| py.check_signals()).map_err(|e| Error::Io(io::Error::other(e)))
}

fn block_error(py: Python<'_>, rtype: u32, status: u8) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let blk = py.import("vhostuser_rs.blk")?;
        let names = blk.getattr("_STATUS_NAMES")?;
        let name: String = match names.get_item(status) {
            Ok(n) => n.extract()?,
            Err(_) => status.to_string(),
        };
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("status", status)?;
        let exc = blk
            .getattr("BlockError")?
            .call((format!("virtio-blk request type {rtype} failed: {name}"),), Some(&kwargs))?;
        Ok(PyErr::from_value(exc))
    })();
    made.unwrap_or_else(|e| e)
}

const ALIGN: &str = "offset and length must be non-negative multiples of 512";

/// The sector of a byte offset given from Python.
fn sector_arg(offset: &Bound<'_, PyAny>) -> PyResult<u64> {
    sector_of(non_negative(offset, ALIGN)?).map_err(|_| PyValueError::new_err(ALIGN))
}

/// An int argument that must not be negative (Python ints: a ValueError, not OverflowError).
fn non_negative(v: &Bound<'_, PyAny>, message: &'static str) -> PyResult<u64> {
    let n: i64 = v.extract()?;
    u64::try_from(n).map_err(|_| PyValueError::new_err(message))
}

fn op_of(kind: u32, sector: u64, arg: u64, unmap: bool) -> PyResult<Op> {
    let sectors = || u32::try_from(arg).map_err(|_| PyValueError::new_err("too many sectors in one request"));
    Ok(match kind {
        VIRTIO_BLK_T_IN => {
            Op::Read { sector, len: u32::try_from(arg).map_err(|_| PyValueError::new_err("read too long"))? }
        }
        VIRTIO_BLK_T_OUT => Op::Write { sector },
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_DISCARD => Op::Discard { sector, sectors: sectors()? },
        VIRTIO_BLK_T_WRITE_ZEROES => Op::WriteZeroes { sector, sectors: sectors()?, unmap },
        VIRTIO_BLK_T_GET_ID => Op::GetId,
        _ => return Err(PyValueError::new_err(format!("unsupported virtio-blk request type {kind}"))),
    })
}

enum Payload {
    Bytes(Py<PyBytes>),
    Copy(Vec<u8>),
    None,
}

impl Payload {
    fn from_py(data: &Bound<'_, PyAny>) -> PyResult<Payload> {
        if data.is_none() {
            return Ok(Payload::None);
        }
        if let Ok(b) = data.cast::<PyBytes>() {
            return Ok(Payload::Bytes(b.clone().unbind()));
        }
        let buf = pyo3::buffer::PyBuffer::<u8>::get(data)?;
        Ok(Payload::Copy(buf.to_vec(data.py())?))
    }

    fn slice<'a>(&'a self, py: Python<'a>) -> &'a [u8] {
        match self {
            Payload::Bytes(b) => b.bind(py).as_bytes(),
            Payload::Copy(v) => v,
            Payload::None => &[],
        }
    }
}

impl PyBlockRequests {
    /// Collects up to `max` completions with their data in new bytes objects (one copy, out of
    /// the staging slot). Nothing here runs Python code (bytes objects are not tracked by the
    /// garbage collector), so nothing can re-enter the engine while it is locked; a bytes
    /// object that cannot be allocated leaves its completion (and the later ones) for later
    /// and is the error returned beside what was collected.
    fn collect_bytes<'py>(&self, py: Python<'py>, max: usize) -> PyResult<(Vec<Collected<'py>>, Option<PyErr>)> {
        let mut out = Vec::new();
        let mut failed = None;
        self.engine
            .collect_each(max, &mut |c, read| {
                if c.in_len == 0 {
                    out.push((c, None));
                    return true;
                }
                let made = uninit_bytes(py, c.in_len as usize)
                    .and_then(|(bytes, buf)| read(buf).map(|()| bytes).map_err(|e| to_pyerr(py, e)));
                match made {
                    Ok(bytes) => {
                        out.push((c, Some(bytes)));
                        true
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            })
            .py_err(py)?;
        Ok((out, failed))
    }

    /// Parses :meth:`submit`'s requests (type, sector, arg); with `into`, a read's `arg` may be
    /// a writable buffer to read into instead of a length (its export is kept in `targets`).
    #[allow(clippy::type_complexity)]
    fn parse(
        requests: &Bound<'_, PyAny>,
        into: bool,
    ) -> PyResult<(Vec<Op>, Vec<Payload>, Vec<u32>, Vec<Option<pyo3::buffer::PyBuffer<u8>>>)> {
        let mut targets = Vec::new();
        let mut kinds = Vec::new();
        let mut ops = Vec::new();
        let mut payloads = Vec::new();
        for item in requests.try_iter()? {
            let item = item?;
            let t = item.cast::<PyTuple>()?;
            if t.len() < 3 || t.len() > 4 {
                return Err(PyValueError::new_err(
                    "a request is (type, sector, arg) or (type, sector, sectors, unmap)",
                ));
            }
            let kind: u32 = t.get_item(0)?.extract()?;
            let sector: u64 = t.get_item(1)?.extract()?;
            let unmap = if t.len() == 4 { t.get_item(3)?.extract::<bool>()? } else { false };
            let arg = t.get_item(2)?;
            let mut target = None;
            if kind == VIRTIO_BLK_T_OUT {
                ops.push(Op::Write { sector });
                payloads.push(Payload::from_py(&arg)?);
            } else if into && kind == VIRTIO_BLK_T_IN && !arg.is_instance_of::<pyo3::types::PyInt>() {
                let buf = pyo3::buffer::PyBuffer::<u8>::get(&arg)?;
                if buf.readonly() || !buf.is_c_contiguous() {
                    return Err(PyBufferError::new_err("a read into a buffer needs a writable C-contiguous one"));
                }
                let len = u32::try_from(buf.len_bytes()).map_err(|_| PyValueError::new_err("read too long"))?;
                ops.push(Op::Read { sector, len });
                payloads.push(Payload::None);
                target = Some(buf);
            } else {
                ops.push(op_of(kind, sector, arg.extract()?, unmap)?);
                payloads.push(Payload::None);
            }
            kinds.push(kind);
            targets.push(target);
        }
        Ok((ops, payloads, kinds, targets))
    }

    fn run(&self, py: Python<'_>, op: Op, data: &[u8], out: OutBuf, timeout: Option<f64>) -> PyResult<u8> {
        let deadline = deadline(timeout)?;
        let queue = &self.queue.get().inner;
        let engine = &self.engine;
        // Python's bytes are immutable and `data` is borrowed for the call: copying it into the
        // slot happens detached too, so the GIL is released once per request.
        let data_ptr = OutBuf(data.as_ptr().cast_mut(), data.len());
        py.detach(move || {
            // Whole-value captures: the raw pointers inside are not Send on their own.
            let (data_ptr, out) = (data_ptr, out);
            // SAFETY: see OutBuf; `data` is only read.
            let data: &[u8] = unsafe { data_ptr.slice() };
            // SAFETY: see OutBuf.
            let out = unsafe { out.slice() };
            engine.run(queue, op, data, out, deadline, &mut interrupt)
        })
        .map_err(|e| to_pyerr(py, e))
    }
}

#[pymethods]
impl PyBlockRequests {
    /// The garbage collector's view of the futures held for requests in flight: a future
    /// whose callback refers back to the client holding this engine makes a cycle that only
    /// the collector can break (a client dropped without `close()` with requests in flight).
    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.queue)?;
        // Never wait for the lock here: a thread holding it may be waiting for the GIL. What
        // is not visited counts as referenced from outside, which only delays collection.
        if let Ok(held) = self.futures.try_lock() {
            for h in held.iter().flatten() {
                visit.call(&h.future)?;
            }
        }
        Ok(())
    }

    /// Breaks a cycle through the held futures (the collector calls this on garbage only).
    fn __clear__(&self) {
        let taken: Vec<Held> = {
            let mut held = self.futures.lock().unwrap_or_else(|e| e.into_inner());
            held.iter_mut().filter_map(Option::take).collect()
        };
        drop(taken); // after the lock: dropping a future may run arbitrary code
    }

    /// An engine over `queue` (ring `index`) with `queue.size` staging slots of up to
    /// `slot_bytes` each in `memory`. The eventfds and the main channel's fd (`main_fd`, watched
    /// for a hang-up) are duplicated. `poll`: seconds a request polls the used ring before
    /// sleeping on the call eventfd.
    #[new]
    #[pyo3(signature = (queue, memory, kick_fd, call_fd, main_fd=None, *, index=0, indirect=false, slot_bytes=131072, poll=0.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        queue: Py<PyDriverQueue>,
        memory: &PyGuestMemory,
        kick_fd: RawFd,
        call_fd: RawFd,
        main_fd: Option<RawFd>,
        index: u16,
        indirect: bool,
        slot_bytes: u32,
        poll: f64,
    ) -> PyResult<PyBlockRequests> {
        let mut fds = vec![kick_fd, call_fd];
        fds.extend(main_fd);
        let b = borrow_fds(&fds)?;
        let poll = super::blocking::timeout(Some(poll))?.unwrap_or(Duration::ZERO);
        let engine = {
            let q = queue.get().inner.lock().unwrap_or_else(|e| e.into_inner());
            BlockRequests::new(
                memory.inner.clone(),
                &q,
                index,
                indirect,
                slot_bytes,
                b[0],
                b[1],
                b.get(2).copied(),
                poll,
            )
            .py_err(py)?
        };
        Ok(PyBlockRequests { engine, queue, scratch: Default::default(), futures: Default::default() })
    }

    /// The largest data length of one ring request (longer reads and writes are split).
    #[getter]
    fn slot_bytes(&self) -> u32 {
        self.engine.slot_bytes()
    }

    /// The engine's duplicate of the call eventfd (for an event loop's reader).
    fn call_fd(&self) -> RawFd {
        self.engine.call_fd().as_raw_fd()
    }

    /// The engine's duplicate of the main channel's fd, if one was given.
    fn main_fd(&self) -> Option<RawFd> {
        self.engine.main_fd().map(|f| f.as_raw_fd())
    }

    /// Reads `length` bytes at byte `offset` (both multiples of 512; empty bytes for 0) and
    /// waits: one request (or several of a slot each). Raises BlockError on a non-OK status.
    #[pyo3(signature = (offset, length, timeout=5.0))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: &Bound<'py, PyAny>,
        length: &Bound<'py, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let sector = sector_arg(offset)?;
        let length = non_negative(length, ALIGN)?;
        if length % 512 != 0 {
            return Err(PyValueError::new_err(ALIGN));
        }
        if length == 0 {
            return Ok(PyBytes::new(py, b""));
        }
        let length = usize::try_from(length).map_err(|_| PyValueError::new_err("read too long"))?;
        let len = u32::try_from(length).map_err(|_| PyValueError::new_err("read too long"))?;
        // On success the read fills every byte (a completed request copies its whole length
        // out of the staging slot); on failure the object is dropped unseen.
        let (bytes, buf) = uninit_bytes(py, length)?;
        let buf = buf.as_mut_ptr();
        let status = self.run(py, Op::Read { sector, len }, &[], OutBuf(buf, length), timeout)?;
        if status != VIRTIO_BLK_S_OK {
            return Err(block_error(py, VIRTIO_BLK_T_IN, status));
        }
        Ok(bytes)
    }

    /// Reads ``len(buffer)`` bytes at byte `offset` (a multiple of 512) into a writable
    /// contiguous `buffer`; returns the byte count. Raises BlockError on a non-OK status.
    #[pyo3(signature = (offset, buffer, timeout=5.0))]
    fn readinto(
        &self,
        py: Python<'_>,
        offset: &Bound<'_, PyAny>,
        buffer: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<usize> {
        let sector = sector_arg(offset)?;
        let buf = pyo3::buffer::PyBuffer::<u8>::get(buffer)?;
        if buf.readonly() || !buf.is_c_contiguous() {
            return Err(PyBufferError::new_err("readinto needs a writable C-contiguous buffer"));
        }
        let n = buf.len_bytes();
        if n == 0 {
            return Ok(0);
        }
        if n % 512 != 0 {
            return Err(PyValueError::new_err(ALIGN));
        }
        let len = u32::try_from(n).map_err(|_| PyValueError::new_err("read too long"))?;
        let status = self.run(py, Op::Read { sector, len }, &[], OutBuf(buf.buf_ptr().cast(), n), timeout)?;
        drop(buf);
        if status != VIRTIO_BLK_S_OK {
            return Err(block_error(py, VIRTIO_BLK_T_IN, status));
        }
        Ok(n)
    }

    /// Writes `data` (any bytes-like object, a multiple of 512 bytes; nothing for none) at
    /// byte `offset` (a multiple of 512) and waits. Raises BlockError on a non-OK status.
    #[pyo3(signature = (offset, data, timeout=5.0))]
    fn write(
        &self,
        py: Python<'_>,
        offset: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let sector = sector_arg(offset)?;
        let payload = Payload::from_py(data)?;
        let slice = payload.slice(py);
        if slice.len() % 512 != 0 {
            return Err(PyValueError::new_err(ALIGN));
        }
        if slice.is_empty() {
            return Ok(());
        }
        let status = self.run(py, Op::Write { sector }, slice, OutBuf(std::ptr::null_mut(), 0), timeout)?;
        if status != VIRTIO_BLK_S_OK {
            return Err(block_error(py, VIRTIO_BLK_T_OUT, status));
        }
        Ok(())
    }

    /// Any other request (FLUSH, DISCARD, WRITE_ZEROES with `sectors` and `unmap`, GET_ID),
    /// waited for; returns the data the device wrote (GET_ID), else empty bytes.
    #[pyo3(signature = (kind, sector=0, sectors=0, *, unmap=false, timeout=5.0))]
    fn request<'py>(
        &self,
        py: Python<'py>,
        kind: u32,
        sector: u64,
        sectors: u64,
        unmap: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let op = op_of(kind, sector, sectors, unmap)?;
        if matches!(op, Op::Read { .. } | Op::Write { .. }) {
            return Err(PyValueError::new_err("use read() / write()"));
        }
        let mut out = vec![0u8; op.in_len() as usize];
        let status = self.run(py, op, &[], OutBuf(out.as_mut_ptr(), out.len()), timeout)?;
        if status != VIRTIO_BLK_S_OK {
            return Err(block_error(py, kind, status));
        }
        Ok(PyBytes::new(py, &out))
    }

    /// Submits a batch without waiting for completions: each item is ``(type, sector, arg)``
    /// with `arg` the length of a read, the data of a write, the sector count of a DISCARD or
    /// WRITE_ZEROES (``(type, sector, sectors, unmap)`` for WRITE_ZEROES with UNMAP), 0 for
    /// FLUSH and GET_ID. Returns the tokens of the requests submitted: a prefix of the batch,
    /// shorter when the ring or the staging slots are full (reap, then submit the rest).
    fn submit(&self, py: Python<'_>, requests: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
        let (ops, payloads, _, _) = Self::parse(requests, false)?;
        let batch: Vec<(Op, &[u8])> = ops.iter().zip(&payloads).map(|(o, p)| (*o, p.slice(py))).collect();
        self.engine.submit(&self.queue.get().inner, &batch).py_err(py)
    }

    /// :meth:`submit` for an event loop: `futures[i]` (an :class:`asyncio.Future`) is
    /// resolved by :meth:`complete_futures` when request ``i`` completes. A read may name a
    /// writable buffer instead of a length, ``(type, sector, buffer)``: it is read into (its
    /// length the request's) and the future resolved with the byte count; the buffer stays
    /// exported (not resizable) until the request completes. Returns how many were submitted
    /// (a prefix, as for :meth:`submit`).
    fn submit_futures(
        &self,
        py: Python<'_>,
        requests: &Bound<'_, PyAny>,
        futures: &Bound<'_, PyList>,
    ) -> PyResult<usize> {
        let (ops, payloads, kinds, mut targets) = Self::parse(requests, true)?;
        if futures.len() != ops.len() {
            return Err(PyValueError::new_err("one future per request"));
        }
        let batch: Vec<(Op, &[u8])> = ops.iter().zip(&payloads).map(|(o, p)| (*o, p.slice(py))).collect();
        let tokens = self.engine.submit(&self.queue.get().inner, &batch).py_err(py)?;
        let mut held = self.futures.lock().unwrap_or_else(|e| e.into_inner());
        for (i, &token) in tokens.iter().enumerate() {
            let s = BlockRequests::slot_index(token);
            if held.len() <= s {
                held.resize_with(s + 1, || None);
            }
            let future = futures.get_item(i)?.unbind();
            held[s] = Some(Held { token, future, kind: kinds[i], into: targets[i].take() });
        }
        Ok(tokens.len())
    }

    /// The event loop's reader callback on the call eventfd, in one call: clears the eventfd,
    /// reaps the used ring and collects every completion; the future of each successful
    /// request submitted with :meth:`submit_futures` gets its data (``set_result``: the bytes
    /// of a read or GET_ID, else None; a cancelled future is skipped). Returns what is left
    /// for the caller: ``(token, future, type, status, data)`` for each non-OK status (future
    /// and type None for a request not submitted with a future, whatever its status).
    #[allow(clippy::type_complexity)]
    fn complete_futures<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Vec<(u64, Option<Py<PyAny>>, Option<u32>, u8, Option<Bound<'py, PyBytes>>)>> {
        static INVALID_STATE: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> = pyo3::sync::PyOnceLock::new();
        let invalid_state = INVALID_STATE.import(py, "asyncio", "InvalidStateError")?;
        self.engine.clear_call();
        self.engine.reap(&self.queue.get().inner).py_err(py)?;
        let (done, mut failed) = self.collect_bytes(py, usize::MAX)?;
        let mut rest = Vec::new();
        // Taken out first, resolved after: set_result runs Python code (the loop's call_soon),
        // which must not find this lock held.
        let mut resolve = Vec::with_capacity(done.len());
        {
            let mut held = self.futures.lock().unwrap_or_else(|e| e.into_inner());
            for (c, data) in done {
                let s = BlockRequests::slot_index(c.token);
                let fut = match held.get_mut(s) {
                    Some(e) if e.as_ref().is_some_and(|h| h.token == c.token) => e.take(),
                    _ => None,
                };
                match fut {
                    Some(h) if c.status == VIRTIO_BLK_S_OK => resolve.push((h, data)),
                    Some(h) => rest.push((c.token, Some(h.future), Some(h.kind), c.status, data)),
                    None => rest.push((c.token, None, None, c.status, data)),
                }
            }
        }
        let set_result = pyo3::intern!(py, "set_result");
        for (h, data) in resolve {
            let f = h.future.bind(py);
            let result = match (h.into, data) {
                // A read into the caller's buffer: filled unless the request was cancelled
                // (then the buffer is left alone), resolved with the byte count.
                (Some(buf), Some(data)) => {
                    let done = f.call_method0(pyo3::intern!(py, "done")).and_then(|d| d.is_truthy());
                    match done {
                        Ok(true) => continue,
                        Ok(false) => buf
                            .copy_from_slice(py, data.as_bytes())
                            .and_then(|()| f.call_method1(set_result, (buf.len_bytes(),))),
                        Err(e) => Err(e),
                    }
                }
                (_, data) => f.call_method1(set_result, (data,)),
            };
            if let Err(e) = result {
                if !e.is_instance(py, invalid_state) {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(rest),
        }
    }

    /// Every future :meth:`submit_futures` holds for requests not completed yet (forgotten
    /// here): for failing them when the session ends.
    fn take_futures(&self) -> Vec<Py<PyAny>> {
        let mut held = self.futures.lock().unwrap_or_else(|e| e.into_inner());
        held.iter_mut().filter_map(|e| e.take().map(|h| h.future)).collect()
    }

    /// :meth:`submit` with byte offsets and lengths, as ``BlockClient.submit`` takes them:
    /// ``(type, offset, length)``, ``(type, offset, data)`` for a write, ``(type, offset,
    /// length, unmap)`` for WRITE_ZEROES; offsets and lengths multiples of 512 (ValueError
    /// otherwise, before anything is submitted).
    fn submit_bytes(&self, py: Python<'_>, requests: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
        let mut ops = Vec::new();
        let mut payloads = Vec::new();
        for item in requests.try_iter()? {
            let item = item?;
            let t = match item.cast::<PyTuple>() {
                Ok(t) => t.clone(),
                Err(_) => PyTuple::new(py, item.try_iter()?.collect::<PyResult<Vec<_>>>()?)?,
            };
            if t.len() < 2 || t.len() > 4 {
                return Err(PyValueError::new_err("a request is (type, offset[, length or data[, unmap]])"));
            }
            let kind: u32 = t.get_item(0)?.extract()?;
            let offset = non_negative(&t.get_item(1)?, "offsets must be non-negative multiples of 512")?;
            let unmap = if t.len() == 4 { t.get_item(3)?.is_truthy()? } else { false };
            if kind == VIRTIO_BLK_T_OUT {
                let data = if t.len() > 2 { t.get_item(2)? } else { py.None().into_bound(py) };
                ops.push(Op::from_bytes(kind, offset, 0, false).map_err(PyValueError::new_err)?);
                payloads.push(Payload::from_py(&data)?);
            } else {
                let length = if t.len() > 2 {
                    non_negative(&t.get_item(2)?, "lengths must be non-negative multiples of 512")?
                } else {
                    0
                };
                ops.push(Op::from_bytes(kind, offset, length, unmap).map_err(PyValueError::new_err)?);
                payloads.push(Payload::None);
            }
        }
        let batch: Vec<(Op, &[u8])> = ops.iter().zip(&payloads).map(|(o, p)| (*o, p.slice(py))).collect();
        self.engine.submit(&self.queue.get().inner, &batch).py_err(py)
    }

    /// Collects up to `max` completions, oldest first, waiting up to `timeout` for the first
    /// (0: look without waiting): a list of ``(token, status, data)`` with `data` the bytes a
    /// read or GET_ID returned (None for other requests). A non-OK status is reported, not
    /// raised.
    #[pyo3(signature = (max=64, *, timeout=0.0))]
    fn reap<'py>(&self, py: Python<'py>, max: usize, timeout: Option<f64>) -> PyResult<Bound<'py, PyList>> {
        let queue = &self.queue.get().inner;
        let engine = &self.engine;
        let deadline = deadline(timeout)?;
        if timeout == Some(0.0) {
            engine.reap(queue).py_err(py)?;
        } else {
            py.detach(|| engine.wait_completions(queue, deadline, &mut interrupt)).map_err(|e| to_pyerr(py, e))?;
        }
        let list = PyList::empty(py);
        let (done, failed) = self.collect_bytes(py, max)?;
        if let (Some(e), true) = (failed, done.is_empty()) {
            return Err(e); // else the next reap reports it
        }
        for (c, data) in done {
            let data = data.map_or_else(|| py.None().into_bound(py), Bound::into_any);
            list.append((c.token, c.status, data))?;
        }
        Ok(list)
    }

    /// Collects `token`'s completion without waiting: ``(status, data)`` or None while in
    /// flight. `data` as for :meth:`reap`.
    fn collect<'py>(&self, py: Python<'py>, token: u64) -> PyResult<Option<(u8, Bound<'py, PyAny>)>> {
        // One slot-sized buffer per engine, not a fresh zeroed one per call.
        let mut out = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        out.resize(self.engine.slot_bytes() as usize, 0);
        match self.engine.collect(token, &mut out).map_err(|e| match e {
            Error::Io(e) if e.kind() == io::ErrorKind::InvalidInput => PyValueError::new_err(e.to_string()),
            e => to_pyerr(py, e),
        })? {
            None => Ok(None),
            Some(c) => {
                let data = if c.in_len > 0 {
                    PyBytes::new(py, &out[..c.in_len as usize]).into_any()
                } else {
                    py.None().into_bound(py)
                };
                Ok(Some((c.status, data)))
            }
        }
    }

    /// Reaps the used ring without waiting (an event loop's reader callback: clears the call
    /// eventfd first); returns how many requests completed.
    fn poll(&self, py: Python<'_>) -> PyResult<usize> {
        self.engine.clear_call();
        self.engine.reap(&self.queue.get().inner).py_err(py)
    }

    /// Gives up on `token`; a request still in flight keeps its staging slot until the device
    /// completes it (never reused early).
    fn cancel(&self, token: u64) {
        self.engine.cancel(token)
    }

    /// Requests in flight on the ring.
    #[getter]
    fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    /// Completions reaped and not collected yet.
    #[getter]
    fn pending(&self) -> usize {
        self.engine.pending_completions()
    }

    /// Whether the back-end hung up the main channel.
    #[getter]
    fn hung_up(&self) -> bool {
        self.engine.hung_up()
    }

    /// Fails every waiter with ConnectionClosedError and refuses new requests. Idempotent.
    fn close(&self) {
        self.engine.close()
    }

    /// Whether :meth:`close` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.engine.closed()
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBlockRequests>()
}
