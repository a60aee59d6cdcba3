//! Blocking waits that release the GIL, are bounded by a timeout and wake for Ctrl-C.

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::connection::Deadline;
use crate::error::Error;

/// How long a detached wait runs before re-attaching to check for signals.
pub(crate) const SLICE: Duration = Duration::from_millis(100);

/// Converts a Python `timeout` (seconds, `None` = forever) into a duration.
pub(crate) fn timeout(value: Option<f64>) -> PyResult<Option<Duration>> {
    match value {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t.min(1e9)))),
        Some(t) => Err(PyValueError::new_err(format!("timeout must be None or >= 0 seconds, not {t}"))),
    }
}

/// Waits (detached) until `ready` says yes or the deadline passes, re-attaching every slice for
/// `check_signals`. `ready` gets the longest it may block.
pub(crate) fn wait_until<F>(py: Python<'_>, deadline: Deadline, what: &'static str, ready: F) -> PyResult<()>
where
    F: Fn(Option<Duration>) -> Result<bool, Error> + Send + Sync,
{
    loop {
        let slice = deadline.remaining().map(|r| r.min(SLICE)).unwrap_or(SLICE);
        let ok = py.detach(|| ready(Some(slice))).map_err(|e| super::errors::to_pyerr(py, e))?;
        if ok {
            return Ok(());
        }
        py.check_signals()?;
        if deadline.expired() {
            return Err(super::errors::to_pyerr(py, Error::Timeout(what)));
        }
    }
}
