//! `NetClientCore`: the native half of `vhostuser_rs.netclient.NetClient`, the virtio-net driver
//! data path ([`crate::frontend::netio`]) over rings set up by `Frontend.setup_queue`.
//!
//! One call per burst: `send` copies a list of frames into TX slots, `recv` returns a list of
//! `(NetHeader, bytes)` (copies: nothing refers to guest memory afterwards). No lock is held
//! while Python code can run: frames are copied into `bytes` objects (which cannot start a
//! garbage collection) under the ring's lock, headers and tuples are built after it.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use super::errors::to_pyerr;
use super::memory::PyGuestMemory;
use super::netdevice::PyNetHeader;
use super::socket::borrow_fds;
use super::virtqueue::PyDriverQueue;
use crate::connection::Deadline;
use crate::error::Error;
use crate::frontend::eventfd;
use crate::frontend::netio::{run_bench, BenchJob, BenchMode, PairCounters, PairIo, PairLayout, RxRing, TxRing};
use crate::virtio::net::NetHeader;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Pair {
    rx_queue: Py<PyDriverQueue>,
    tx_queue: Py<PyDriverQueue>,
    rx: Mutex<RxRing>,
    tx: Mutex<TxRing>,
    rx_kick: OwnedFd,
    rx_call: OwnedFd,
    tx_kick: OwnedFd,
    /// A `run_bench` has the rings (``send``/``recv`` on the pair are refused meanwhile).
    busy: AtomicBool,
}

/// What the constructor takes per pair: `(rx_queue, rx_kick, rx_call, tx_queue, tx_kick)`.
type PairArgs = (Py<PyDriverQueue>, RawFd, RawFd, Py<PyDriverQueue>, RawFd);

/// Headers seen on RX, shared (they are immutable): most frames carry the same one.
const HEADER_CACHE_MAX: usize = 64;

/// The driver data path of a virtio-net client (use ``vhostuser_rs.netclient.NetClient``).
#[pyclass(module = "vhostuser_rs", name = "NetClientCore", frozen)]
pub(crate) struct PyNetClientCore {
    layout: PairLayout,
    pairs: Mutex<Vec<Arc<Pair>>>,
    closed: AtomicBool,
    /// A duplicate of the main channel's socket: its hang-up ends waits for frames.
    conn: Mutex<Option<Arc<OwnedFd>>>,
    headers: Mutex<HashMap<[u8; 12], Py<PyNetHeader>>>,
}

/// One frame given to ``send``.
enum Data<'py> {
    Bytes(Bound<'py, PyBytes>),
    Copy(Vec<u8>),
}

impl Data<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Data::Bytes(b) => b.as_bytes(),
            Data::Copy(v) => v,
        }
    }
}

fn header_from_py(h: &Bound<'_, PyAny>) -> PyResult<NetHeader> {
    let h = h.cast::<PyNetHeader>()?;
    let b = h.call_method0("to_bytes")?;
    Ok(NetHeader::from_bytes(b.cast::<PyBytes>()?.as_bytes()))
}

fn outgoing<'py>(item: &Bound<'py, PyAny>) -> PyResult<(NetHeader, Data<'py>)> {
    let (header, data) = match item.cast::<PyTuple>() {
        Ok(t) if t.len() == 2 => (header_from_py(&t.get_item(0)?)?, t.get_item(1)?),
        _ => (NetHeader::default(), item.clone()),
    };
    if let Ok(b) = data.cast::<PyBytes>() {
        return Ok((header, Data::Bytes(b.clone())));
    }
    let buf = pyo3::buffer::PyBuffer::<u8>::get(&data)?;
    Ok((header, Data::Copy(buf.to_vec(data.py())?)))
}

/// What a wait for frames saw.
enum Woken {
    /// The call eventfd (or nothing, on timeout).
    Call,
    /// The back-end closed the main channel.
    HangUp,
}

/// Waits up to `timeout` for the call eventfd `fd`, or the hang-up of the main channel `conn`.
fn wait_call(fd: RawFd, conn: Option<RawFd>, timeout: std::time::Duration) -> std::io::Result<Woken> {
    let mut pfds = [
        libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: conn.unwrap_or(-1), events: libc::POLLRDHUP, revents: 0 },
    ];
    let ms = if timeout.is_zero() { 0 } else { i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX) };
    // SAFETY: two valid pollfds (a negative fd is ignored by poll).
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(Woken::Call) } else { Err(e) };
    }
    if pfds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
        return Ok(Woken::HangUp);
    }
    Ok(Woken::Call)
}

/// A duplicate of the main channel's socket `fd` (borrowed from the caller), if any.
fn dup_conn(fd: Option<RawFd>) -> PyResult<Option<Arc<OwnedFd>>> {
    let Some(fd) = fd else { return Ok(None) };
    let one = [fd];
    let b = borrow_fds(&one)?;
    Ok(Some(Arc::new(b[0].try_clone_to_owned().map_err(|e| super::errors::os_error(&e))?)))
}

fn counters_dict<'py>(py: Python<'py>, c: PairCounters) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("rx_frames", c.rx_frames)?;
    d.set_item("rx_bytes", c.rx_bytes)?;
    d.set_item("rx_dropped", c.rx_dropped)?;
    d.set_item("tx_frames", c.tx_frames)?;
    d.set_item("tx_bytes", c.tx_bytes)?;
    Ok(d)
}

impl PyNetClientCore {
    fn pair(&self, py: Python<'_>, index: usize) -> PyResult<Arc<Pair>> {
        let pairs = lock(&self.pairs);
        if self.closed.load(Ordering::Acquire) {
            return Err(to_pyerr(py, Error::Disconnected));
        }
        pairs
            .get(index)
            .cloned()
            .ok_or_else(|| PyValueError::new_err(format!("queue pair {index} out of range (0..{})", pairs.len())))
    }

    /// The pair, refused while a benchmark runs on it (its thread holds the rings with the GIL
    /// released; waiting for them with the GIL held would deadlock its Ctrl-C checks).
    fn idle_pair(&self, py: Python<'_>, index: usize) -> PyResult<Arc<Pair>> {
        let pair = self.pair(py, index)?;
        if pair.busy.load(Ordering::Acquire) {
            return Err(PyRuntimeError::new_err(format!("queue pair {index} is running a benchmark")));
        }
        Ok(pair)
    }

    /// Whether the back-end closed the main channel (a poll without waiting).
    fn hung_up(&self) -> bool {
        let conn = lock(&self.conn).clone();
        match conn {
            Some(c) => matches!(wait_call(-1, Some(c.as_raw_fd()), std::time::Duration::ZERO), Ok(Woken::HangUp)),
            None => false,
        }
    }

    /// Reaps and copies up to `max` frames (no waiting).
    fn try_recv<'py>(
        &self,
        py: Python<'py>,
        pair: &Pair,
        max: usize,
    ) -> PyResult<Vec<(NetHeader, Bound<'py, PyBytes>)>> {
        eventfd::drain(pair.rx_call.as_fd());
        let mut out = Vec::new();
        let mut failure = None;
        let kick = {
            let mut rx = lock(&pair.rx);
            let mut q = lock(&pair.rx_queue.get().inner);
            let memory = rx.memory().clone();
            let memory = &memory;
            let r = rx.recv(&mut q, max, &mut |fr| {
                let bytes = PyBytes::new_with(py, fr.len, |b| {
                    fr.copy_to(memory, b).map_err(|e| PyValueError::new_err(e.to_string()))
                });
                match bytes {
                    Ok(b) => out.push((fr.header, b)),
                    Err(e) => failure = Some(e),
                }
                Ok(())
            });
            let kick = r.map_err(|e| to_pyerr(py, e))?.1;
            if rx.has_pending() {
                // Frames are left for the next call: keep fileno() readable for event loops.
                eventfd::signal(pair.rx_call.as_fd()).map_err(|e| to_pyerr(py, Error::Io(e)))?;
            }
            kick
        };
        if kick {
            eventfd::signal(pair.rx_kick.as_fd()).map_err(|e| to_pyerr(py, Error::Io(e)))?;
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn header_object(&self, py: Python<'_>, h: NetHeader) -> PyResult<Py<PyNetHeader>> {
        let key = h.to_bytes();
        if let Some(o) = lock(&self.headers).get(&key) {
            return Ok(o.clone_ref(py));
        }
        let kwargs = PyDict::new(py);
        kwargs.set_item("flags", h.flags)?;
        kwargs.set_item("gso_type", h.gso_type)?;
        kwargs.set_item("hdr_len", h.hdr_len)?;
        kwargs.set_item("gso_size", h.gso_size)?;
        kwargs.set_item("csum_start", h.csum_start)?;
        kwargs.set_item("csum_offset", h.csum_offset)?;
        kwargs.set_item("num_buffers", h.num_buffers)?;
        let o: Py<PyNetHeader> =
            py.get_type::<PyNetHeader>().call((), Some(&kwargs))?.cast_into::<PyNetHeader>()?.unbind();
        let mut cache = lock(&self.headers);
        if cache.len() >= HEADER_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, o.clone_ref(py));
        Ok(o)
    }
}

#[pymethods]
impl PyNetClientCore {
    /// Takes over the rings of each queue pair: ``pairs`` is a list of ``(rx_queue, rx_kick_fd,
    /// rx_call_fd, tx_queue, tx_kick_fd)`` (the fds are duplicated). Allocates the RX buffers and
    /// TX slots in `memory` for the negotiated `features` and `mtu`, posts every RX buffer and
    /// kicks the RX rings. `conn_fd`, the main channel's socket (duplicated), makes waits for
    /// frames end with ``ConnectionClosedError`` when the back-end goes away.
    #[new]
    #[pyo3(signature = (memory, features, pairs, *, mtu=None, conn_fd=None))]
    fn new(
        py: Python<'_>,
        memory: &PyGuestMemory,
        features: u64,
        pairs: Vec<PairArgs>,
        mtu: Option<u16>,
        conn_fd: Option<RawFd>,
    ) -> PyResult<PyNetClientCore> {
        let conn = dup_conn(conn_fd)?;
        let layout = PairLayout::new(features, mtu);
        let mem = memory.inner.clone();
        let mut out = Vec::with_capacity(pairs.len());
        for (rx_queue, rx_kick, rx_call, tx_queue, tx_kick) in pairs {
            let raw = [rx_kick, rx_call, tx_kick];
            let fds = borrow_fds(&raw)?;
            let dup = |i: usize| fds[i].try_clone_to_owned().map_err(|e| super::errors::os_error(&e));
            let (rx_kick, rx_call, tx_kick) = (dup(0)?, dup(1)?, dup(2)?);
            let rx_index: u16 = rx_queue.bind(py).getattr("index")?.extract()?;
            let tx_index: u16 = tx_queue.bind(py).getattr("index")?.extract()?;
            let (rx, tx) = {
                let rq = rx_queue.get();
                let tq = tx_queue.get();
                let mut rxq = lock(&rq.inner);
                let mut txq = lock(&tq.inner);
                rxq.set_interrupts(true);
                txq.set_interrupts(false);
                let rx = RxRing::new(mem.clone(), &mut rxq, rx_index, layout).map_err(|e| to_pyerr(py, e))?;
                let tx = TxRing::new(mem.clone(), &txq, tx_index, layout).map_err(|e| to_pyerr(py, e))?;
                (rx, tx)
            };
            eventfd::signal(rx_kick.as_fd()).map_err(|e| to_pyerr(py, Error::Io(e)))?;
            out.push(Arc::new(Pair {
                rx_queue,
                tx_queue,
                rx: Mutex::new(rx),
                tx: Mutex::new(tx),
                rx_kick,
                rx_call,
                tx_kick,
                busy: AtomicBool::new(false),
            }));
        }
        Ok(PyNetClientCore {
            layout,
            pairs: Mutex::new(out),
            closed: AtomicBool::new(false),
            conn: Mutex::new(conn),
            headers: Mutex::new(HashMap::new()),
        })
    }

    /// The gratuitous RARP frame announcing `mac` (what a driver sends for GUEST_ANNOUNCE).
    #[staticmethod]
    fn rarp_frame<'py>(py: Python<'py>, mac: [u8; 6]) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &crate::virtio::net::rarp_frame(mac))
    }

    /// Guest memory the buffers of one queue pair take (rings excluded).
    #[staticmethod]
    #[pyo3(signature = (features, queue_size, *, mtu=None))]
    fn buffer_memory(features: u64, queue_size: u16, mtu: Option<u16>) -> u64 {
        PairLayout::new(features, mtu).buffer_memory(queue_size)
    }

    /// Queues a burst of frames on pair `queue_pair`: bytes-like objects or ``(NetHeader,
    /// frame)`` pairs. Returns how many were queued (fewer when the TX ring is full). A frame
    /// shorter than an Ethernet header or longer than the MTU allows raises ``ValueError`` and
    /// nothing is queued. ``ConnectionClosedError`` when the ring is full, nothing could be
    /// queued and the back-end has hung up.
    fn send(&self, py: Python<'_>, queue_pair: usize, frames: &Bound<'_, PyAny>) -> PyResult<usize> {
        let pair = self.idle_pair(py, queue_pair)?;
        let mut items = Vec::with_capacity(frames.len().unwrap_or(0));
        for item in frames.try_iter()? {
            items.push(outgoing(&item?)?);
        }
        let (n, kick) = {
            let mut tx = lock(&pair.tx);
            for (i, (_, d)) in items.iter().enumerate() {
                tx.check(d.as_slice().len()).map_err(|e| PyValueError::new_err(format!("frame {i}: {e}")))?;
            }
            let mut q = lock(&pair.tx_queue.get().inner);
            let mut it = items.iter().map(|(h, d)| (*h, d.as_slice()));
            tx.send(&mut q, &mut it).map_err(|e| to_pyerr(py, e))?
        };
        if kick {
            eventfd::signal(pair.tx_kick.as_fd()).map_err(|e| to_pyerr(py, Error::Io(e)))?;
        }
        if n == 0 && !items.is_empty() && self.hung_up() {
            // The ring is full: if the back-end is gone it never will be less so. Only when
            // nothing was queued: a count of frames already in the ring is never lost (they are
            // handed to the next back-end on a reconnect).
            return Err(to_pyerr(py, Error::Disconnected));
        }
        Ok(n)
    }

    /// Up to `max_frames` received frames of pair `queue_pair` as ``(NetHeader, bytes)``
    /// (copies). Waits for the first one up to `timeout` seconds (``None``: forever, 0: never)
    /// with the GIL released; an empty list when none came.
    #[pyo3(signature = (queue_pair, max_frames=64, timeout=None))]
    fn recv<'py>(
        &self,
        py: Python<'py>,
        queue_pair: usize,
        max_frames: usize,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyList>> {
        let pair = self.idle_pair(py, queue_pair)?;
        let deadline = Deadline::after(super::blocking::timeout(timeout)?);
        let frames = loop {
            let frames = self.try_recv(py, &pair, max_frames)?;
            if !frames.is_empty() || max_frames == 0 || deadline.expired() {
                break frames;
            }
            let slice = deadline.remaining().map(|r| r.min(super::blocking::SLICE)).unwrap_or(super::blocking::SLICE);
            let fd = pair.rx_call.as_raw_fd();
            let conn = lock(&self.conn).clone();
            let woken = py.detach(|| wait_call(fd, conn.as_ref().map(|c| c.as_raw_fd()), slice));
            drop(conn);
            py.check_signals()?;
            if self.closed.load(Ordering::Acquire) {
                return Err(to_pyerr(py, Error::Disconnected));
            }
            if let Woken::HangUp = woken.map_err(|e| to_pyerr(py, Error::Io(e)))? {
                // Frames the back-end used before it went are still returned.
                let frames = self.try_recv(py, &pair, max_frames)?;
                if frames.is_empty() {
                    return Err(to_pyerr(py, Error::Disconnected));
                }
                break frames;
            }
        };
        let mut items = Vec::with_capacity(frames.len());
        let mut last: Option<(NetHeader, Bound<'py, PyAny>)> = None;
        for (h, b) in frames {
            // Frames of a burst mostly carry the same header: reuse the object without a lookup.
            let header = match &last {
                Some((lh, o)) if *lh == h => o.clone(),
                _ => {
                    let o = self.header_object(py, h)?.into_bound(py).into_any();
                    last = Some((h, o.clone()));
                    o
                }
            };
            items.push(PyTuple::new(py, [header, b.into_any()])?);
        }
        PyList::new(py, items)
    }

    /// Runs a timed burst loop on pair `queue_pair` in Rust, the GIL released: `mode`
    /// ``"txonly"`` (keep sending `burst`-frame bursts of `pktlen`-byte frames, reclaiming TX
    /// slots), ``"rxonly"`` (receive and repost) or ``"loopback"`` (both, at most one RX ring of
    /// frames out). `poll` seconds of hybrid polling (yield and re-check the used ring) before
    /// sleeping on the RX call eventfd. Returns the counts, ``elapsed`` and ``cpu`` (seconds of
    /// this thread's CPU time). Ctrl-C ends the run early (and raises ``KeyboardInterrupt``).
    #[pyo3(signature = (mode, *, pktlen=64, burst=32, seconds=10.0, poll=0.0, queue_pair=0))]
    #[allow(clippy::too_many_arguments)]
    fn run_bench<'py>(
        &self,
        py: Python<'py>,
        mode: &str,
        pktlen: usize,
        burst: usize,
        seconds: f64,
        poll: f64,
        queue_pair: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mode = BenchMode::parse(mode)
            .ok_or_else(|| PyValueError::new_err(format!("mode must be txonly, rxonly or loopback, got {mode:?}")))?;
        if burst == 0 {
            return Err(PyValueError::new_err("burst must be at least 1"));
        }
        let duration = super::blocking::timeout(Some(seconds))?.unwrap_or_default();
        let poll = super::blocking::timeout(Some(poll))?.unwrap_or_default();
        let pair = self.idle_pair(py, queue_pair)?;
        if mode != BenchMode::RxOnly {
            lock(&pair.tx).check(pktlen).map_err(|e| PyValueError::new_err(format!("pktlen: {e}")))?;
        }
        if pair.busy.swap(true, Ordering::AcqRel) {
            return Err(PyRuntimeError::new_err(format!("queue pair {queue_pair} is running a benchmark")));
        }
        let job = BenchJob { mode, frame_len: pktlen, burst, duration, poll };
        let mut interrupted = false;
        let result = py.detach(|| {
            let mut rx = lock(&pair.rx);
            let mut tx = lock(&pair.tx);
            let mut rxq = lock(&pair.rx_queue.get().inner);
            let mut txq = lock(&pair.tx_queue.get().inner);
            eventfd::drain(pair.rx_call.as_fd());
            let io = PairIo {
                rx: &mut rx,
                rx_queue: &mut rxq,
                tx: &mut tx,
                tx_queue: &mut txq,
                rx_kick: pair.rx_kick.as_fd(),
                rx_call: pair.rx_call.as_fd(),
                tx_kick: pair.tx_kick.as_fd(),
            };
            let mut last = std::time::Instant::now();
            let mut stop = || {
                if last.elapsed() < std::time::Duration::from_millis(100) {
                    return false;
                }
                last = std::time::Instant::now();
                if self.closed.load(Ordering::Acquire) || Python::attach(|py| py.check_signals()).is_err() {
                    interrupted = true;
                }
                interrupted
            };
            run_bench(io, job, &mut stop)
        });
        pair.busy.store(false, Ordering::Release);
        if interrupted {
            py.check_signals()?;
            if self.closed.load(Ordering::Acquire) {
                return Err(to_pyerr(py, Error::Disconnected));
            }
        }
        let r = result.map_err(|e| to_pyerr(py, e))?;
        let d = PyDict::new(py);
        d.set_item(
            "mode",
            match mode {
                BenchMode::TxOnly => "txonly",
                BenchMode::RxOnly => "rxonly",
                BenchMode::Loopback => "loopback",
            },
        )?;
        d.set_item("tx_frames", r.tx_frames)?;
        d.set_item("tx_bytes", r.tx_bytes)?;
        d.set_item("rx_frames", r.rx_frames)?;
        d.set_item("rx_bytes", r.rx_bytes)?;
        d.set_item("rx_dropped", r.rx_dropped)?;
        d.set_item("tx_full", r.tx_full)?;
        d.set_item("in_flight", r.in_flight)?;
        d.set_item("waits", r.waits)?;
        d.set_item("elapsed", r.elapsed.as_secs_f64())?;
        d.set_item("cpu", r.cpu.as_secs_f64())?;
        Ok(d)
    }

    /// The RX call eventfd of pair `queue_pair` (readable when frames may have arrived; ``recv``
    /// clears it).
    #[pyo3(signature = (queue_pair=0))]
    fn fileno(&self, py: Python<'_>, queue_pair: usize) -> PyResult<RawFd> {
        Ok(self.pair(py, queue_pair)?.rx_call.as_raw_fd())
    }

    /// After a reconnect (the rings handed to a new back-end with the same eventfds): waits
    /// for frames now end on the hang-up of `conn_fd` (the new main channel's socket,
    /// duplicated), and every RX call eventfd is signalled once so that a waiter or an event
    /// loop watching ``fileno`` looks at the rings again (frames the old back-end used just
    /// before it went may be there).
    #[pyo3(signature = (conn_fd))]
    fn set_connection(&self, py: Python<'_>, conn_fd: Option<RawFd>) -> PyResult<()> {
        let conn = dup_conn(conn_fd)?;
        {
            // Checked under the lock `close` takes the connection with: none is left behind.
            let mut slot = lock(&self.conn);
            if self.closed.load(Ordering::Acquire) {
                return Err(to_pyerr(py, Error::Disconnected));
            }
            *slot = conn;
        }
        let pairs = lock(&self.pairs).clone();
        for p in pairs {
            eventfd::signal(p.rx_call.as_fd()).map_err(|e| to_pyerr(py, Error::Io(e)))?;
        }
        Ok(())
    }

    /// Counters of pair `queue_pair`, or summed over all pairs.
    #[pyo3(signature = (queue_pair=None))]
    fn counters<'py>(&self, py: Python<'py>, queue_pair: Option<usize>) -> PyResult<Bound<'py, PyDict>> {
        let pairs: Vec<Arc<Pair>> = match queue_pair {
            Some(i) => vec![self.pair(py, i)?],
            None => lock(&self.pairs).clone(),
        };
        let mut c = PairCounters::default();
        for p in pairs {
            let rx = lock(&p.rx).counters();
            let tx = lock(&p.tx).counters();
            c.rx_frames += rx.rx_frames;
            c.rx_bytes += rx.rx_bytes;
            c.rx_dropped += rx.rx_dropped;
            c.tx_frames += tx.tx_frames;
            c.tx_bytes += tx.tx_bytes;
        }
        counters_dict(py, c)
    }

    /// Number of queue pairs.
    #[getter]
    fn queue_pairs(&self) -> usize {
        lock(&self.pairs).len()
    }

    /// Header bytes before every frame.
    #[getter]
    fn header_len(&self) -> usize {
        self.layout.header_len
    }

    /// Largest frame ``send`` accepts.
    #[getter]
    fn max_frame_len(&self) -> usize {
        self.layout.max_tx_frame()
    }

    /// Size of each RX buffer.
    #[getter]
    fn rx_buffer_len(&self) -> u32 {
        self.layout.rx_buffer_len
    }

    /// Releases the duplicated eventfds (once no call is using them). Idempotent.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.pairs).clear();
        lock(&self.conn).take();
        lock(&self.headers).clear();
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyNetClientCore>()?;
    Ok(())
}
