//! Rust diagnostics (the `log` crate) into Python's `logging`: a record with target
//! `vhostuser_rs::backend::session` goes to the logger `vhostuser_rs.backend.session`, and
//! `vhostuser_rs::trace` (every request, when enabled) to `vhostuser_rs.trace`.

use std::sync::OnceLock;

use pyo3::prelude::*;

static RESET: OnceLock<pyo3_log::ResetHandle> = OnceLock::new();

/// Installs the bridge (once per process; a second extension instance keeps the first).
pub(crate) fn init() {
    // Logger objects and their levels are cached on the Rust side, so a record below a logger's
    // level costs no GIL acquisition on a worker thread; `refresh_logging` drops the cache.
    if let Ok(handle) = pyo3_log::try_init() {
        let _ = RESET.set(handle);
    }
}

/// Logs `err`, raised by a Python callback (`what`), with its traceback as a warning on
/// `logger`: a device or handler that raises must not end the session silently.
///
/// A KeyboardInterrupt is not the callback's failure: Ctrl-C (or a SIGTERM handler that raises
/// it, as the serving commands install) arrived while the callback ran on the main thread, e.g.
/// a ring stopping at the end of a session. It is handed back to the interpreter as a pending
/// interrupt, so that the serving loop's next signal check ends serving as it would have.
pub(crate) fn callback_failed(py: Python<'_>, logger: &str, what: &str, err: &PyErr) {
    if err.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) {
        // SAFETY: plain C API call; it only sets the interpreter's pending-SIGINT flag.
        unsafe { pyo3::ffi::PyErr_SetInterrupt() };
        return;
    }
    let tb = err.traceback(py).and_then(|t| t.format().ok()).unwrap_or_default();
    log::warn!(target: logger, "{what} failed: {err}\n{tb}");
}

/// Makes changes to Python's logging configuration (levels, handlers) visible to the Rust side,
/// which caches loggers and their levels after first use.
#[pyfunction]
fn refresh_logging() {
    if let Some(handle) = RESET.get() {
        handle.reset();
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init();
    m.add_function(wrap_pyfunction!(refresh_logging, m)?)?;
    Ok(())
}
