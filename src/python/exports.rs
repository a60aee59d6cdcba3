//! Many built-in block devices in one process: an accept loop per export, every ring on one pool
//! of worker threads (`serve-blk --export IMAGE,SOCKET` repeated).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::errors::{os_error, IntoPyResult};
use crate::backend::{serve_session, BackendRequests, Device, WorkerPolicy, WorkerPool};
use crate::connection::{Deadline, Listener};
use crate::devices::blk::{BlockOptions, IoEngine};
use crate::devices::BlockDevice;
use crate::error::Error;

/// Serves each `(image, socket_path, readonly, num_queues)` of `exports` with the built-in virtio-blk device,
/// one front-end at a time per export, all from this process: an accept loop per export on a
/// thread of its own, and the rings of every device on `workers` shared worker threads (pinned
/// to `cpus`). Returns on Ctrl-C/SIGTERM (KeyboardInterrupt), after every session has ended.
#[pyfunction]
#[pyo3(signature = (exports, *, workers=2, cpus=None, poll=None, io_engine="auto", direct=false))]
pub(crate) fn serve_blk_exports(
    py: Python<'_>,
    exports: Vec<(PathBuf, PathBuf, bool, u16)>,
    workers: usize,
    cpus: Option<Vec<usize>>,
    poll: Option<f64>,
    io_engine: &str,
    direct: bool,
) -> PyResult<()> {
    if exports.is_empty() {
        return Err(PyValueError::new_err("give at least one export"));
    }
    let engine = IoEngine::parse(io_engine)
        .ok_or_else(|| PyValueError::new_err(format!("io_engine must be auto, uring or sync, not {io_engine:?}")))?;
    let base = super::backend::policy(Some(workers), cpus, poll)?;
    let pool = Arc::new(WorkerPool::new(workers, base.cpus.clone(), base.poll));
    let policy = WorkerPolicy { pool: Some(pool), ..base };
    // Every image opens and every socket binds before anything is served: a bad export is an
    // error at start, not a half-served set.
    let mut served = Vec::with_capacity(exports.len());
    for (image, socket_path, readonly, num_queues) in exports {
        let options = BlockOptions { readonly, num_queues, direct, engine };
        let device: Arc<dyn Device> = Arc::new(
            BlockDevice::open_with(&image, options)
                .map_err(|e| os_error(&std::io::Error::new(e.kind(), format!("{}: {e}", image.display()))))?,
        );
        let listener = Listener::bind(&socket_path, true).py_err(py)?;
        served.push((device, listener));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(served.len());
    for (k, (device, listener)) in served.into_iter().enumerate() {
        let (stop, policy) = (stop.clone(), policy.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vhost-user export {k}"))
            .spawn(move || accept_loop(&listener, device, &policy, &stop))
            .map_err(|e| os_error(&e))?;
        threads.push(thread);
    }
    // Signals reach the main thread only: it waits here for them, without the GIL in between.
    let result = loop {
        if let Err(e) = py.check_signals() {
            break Err(e);
        }
        if threads.iter().all(|t| t.is_finished()) {
            break Ok(());
        }
        py.detach(|| std::thread::sleep(Duration::from_millis(100)));
    };
    stop.store(true, Ordering::Relaxed);
    py.detach(|| {
        for t in threads {
            let _ = t.join();
        }
    });
    result
}

/// Serves front-ends on `listener` one at a time until `stop`.
fn accept_loop(listener: &Listener, device: Arc<dyn Device>, policy: &WorkerPolicy, stop: &AtomicBool) {
    let requests = Arc::new(BackendRequests::new());
    let stopped = || stop.load(Ordering::Relaxed);
    while !stopped() {
        let conn = match listener.accept(Deadline::after(Some(Duration::from_millis(200)))) {
            Ok(c) => c,
            Err(Error::Timeout(_)) => continue,
            Err(e) => {
                log::warn!(target: "vhostuser_rs::backend", "accepting a front-end failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if let Err(e) = serve_session(&conn, device.clone(), &requests, policy, &stopped) {
            // A broken or hostile front-end ends its own session only.
            log::warn!(target: "vhostuser_rs::backend", "front-end session ended: {e}");
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(serve_blk_exports, m)?)?;
    Ok(())
}
