//! `GuestMemory`, `GuestBuffer` (zero-copy views that keep their mapping alive) and `DirtyLog`.

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyMemoryView};

use super::errors::IntoPyResult;
use crate::error::Error;
use crate::memory::{DirtyLog, GuestMemory, MemoryTable, Region, RegionDesc};

/// A window of guest memory exported through the buffer protocol. `memoryview(buffer)` is
/// zero-copy; the mapping stays alive as long as any view of it does, even after the memory
/// table that contained it was replaced.
///
/// Guest memory is shared with another process, which may change it at any time: copy what you
/// validate before you use it.
#[pyclass(module = "vhostuser_rs", frozen)]
pub(crate) struct GuestBuffer {
    /// Whatever owns the mapping: a region's `Mapping`, or a whole `MemoryTable`.
    _owner: Arc<dyn std::any::Any + Send + Sync>,
    ptr: usize,
    len: usize,
    readonly: bool,
}

impl GuestBuffer {
    pub(crate) fn new(
        owner: Arc<dyn std::any::Any + Send + Sync>,
        ptr: *mut u8,
        len: usize,
        readonly: bool,
    ) -> GuestBuffer {
        GuestBuffer { _owner: owner, ptr: ptr as usize, len, readonly }
    }

    /// A memoryview over a new buffer.
    pub(crate) fn view(py: Python<'_>, buffer: GuestBuffer) -> PyResult<Bound<'_, PyMemoryView>> {
        let obj = Bound::new(py, buffer)?;
        PyMemoryView::from(obj.as_any())
    }
}

#[pymethods]
impl GuestBuffer {
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut pyo3::ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let this = slf.get();
        if flags & pyo3::ffi::PyBUF_WRITABLE != 0 && this.readonly {
            return Err(PyBufferError::new_err("device-readable guest buffer is read-only"));
        }
        // SAFETY: ptr..ptr+len lies in the mapping this object keeps alive; FillInfo takes a new
        // reference to the exporter, so the mapping outlives every view.
        let ret = unsafe {
            pyo3::ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                this.ptr as *mut c_void,
                this.len as pyo3::ffi::Py_ssize_t,
                c_int::from(this.readonly),
                flags,
            )
        };
        if ret != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.len
    }
}

/// Guest memory: memfd-backed regions this process shares (front-end role, `allocate`), or a
/// peer's regions mapped from their fds (back-end role, `map`).
#[pyclass(module = "vhostuser_rs", name = "GuestMemory", frozen)]
pub(crate) struct PyGuestMemory {
    pub(crate) inner: Arc<GuestMemory>,
}

fn region_dataclass<'py>(py: Python<'py>, d: &RegionDesc) -> PyResult<Bound<'py, PyAny>> {
    let cls = py.import("vhostuser_rs.messages")?.getattr("MemoryRegion")?;
    cls.call1((d.guest_addr, d.size, d.user_addr, d.mmap_offset))
}

#[pymethods]
impl PyGuestMemory {
    /// Creates shareable guest memory: `regions` is a list of ``(guest_addr, size)``; by default
    /// one region of `size` bytes at guest address 0.
    #[staticmethod]
    #[pyo3(signature = (size=None, *, regions=None))]
    fn allocate(py: Python<'_>, size: Option<u64>, regions: Option<Vec<(u64, u64)>>) -> PyResult<PyGuestMemory> {
        let layout = match (size, regions) {
            (Some(s), None) => vec![(0, s)],
            (None, Some(r)) => r,
            _ => return Err(PyValueError::new_err("give either size or regions")),
        };
        let mem = py.detach(|| GuestMemory::allocate(&layout)).map_err(Error::from).py_err(py)?;
        Ok(PyGuestMemory { inner: Arc::new(mem) })
    }

    /// Maps a peer's regions (``messages.MemoryRegion`` with their fds, as SET_MEM_TABLE
    /// delivers them). The fds are duplicated: the caller keeps and closes its own.
    #[staticmethod]
    fn map(py: Python<'_>, regions: Vec<Bound<'_, PyAny>>, fds: Vec<RawFd>) -> PyResult<PyGuestMemory> {
        if regions.len() != fds.len() {
            return Err(PyValueError::new_err("one fd per region"));
        }
        let mut mapped = Vec::with_capacity(regions.len());
        for (r, fd) in regions.iter().zip(fds) {
            let desc = RegionDesc {
                guest_addr: r.getattr("guest_addr")?.extract()?,
                size: r.getattr("size")?.extract()?,
                user_addr: r.getattr("user_addr")?.extract()?,
                mmap_offset: r.getattr("mmap_offset")?.extract()?,
            };
            if fd < 0 {
                return Err(PyValueError::new_err(format!("invalid file descriptor {fd}")));
            }
            // SAFETY: the caller passes an open fd; try_clone duplicates it (CLOEXEC).
            let owned =
                unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().map_err(|e| super::errors::os_error(&e))?;
            mapped.push(Region::map(desc, owned).map_err(Error::from).py_err(py)?);
        }
        let table = MemoryTable::from_regions(mapped).map_err(Error::from).py_err(py)?;
        Ok(PyGuestMemory { inner: Arc::new(GuestMemory::from_table(table)) })
    }

    /// Copies `n` bytes at guest address `addr`.
    fn read<'py>(&self, py: Python<'py>, addr: u64, n: usize) -> PyResult<Bound<'py, PyBytes>> {
        let mut buf = vec![0u8; n];
        self.inner.table().read(addr, &mut buf).map_err(Error::from).py_err(py)?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Copies `data` to guest address `addr`.
    fn write(&self, py: Python<'_>, addr: u64, data: &[u8]) -> PyResult<()> {
        self.inner.table().write(addr, data).map_err(Error::from).py_err(py)
    }

    /// A writable zero-copy ``memoryview`` of `n` bytes at `addr` (inside one region). It keeps
    /// its mapping alive on its own.
    fn view<'py>(&self, py: Python<'py>, addr: u64, n: u64) -> PyResult<Bound<'py, PyMemoryView>> {
        let (ptr, mapping) = self.inner.table().translate_with(addr, n).map_err(Error::from).py_err(py)?;
        GuestBuffer::view(
            py,
            GuestBuffer::new(mapping.clone() as Arc<dyn std::any::Any + Send + Sync>, ptr, n as usize, false),
        )
    }

    /// Reserves `size` bytes aligned to `align` (a power of two); returns their guest address.
    #[pyo3(signature = (size, align=8))]
    fn alloc(&self, py: Python<'_>, size: u64, align: u64) -> PyResult<u64> {
        self.inner.alloc(size, align).map_err(Error::from).py_err(py)
    }

    /// Forgets every allocation made with :meth:`alloc` (the bytes are unchanged).
    fn reset_allocator(&self) {
        self.inner.reset();
    }

    /// The regions as ``messages.MemoryRegion`` (what SET_MEM_TABLE sends).
    #[getter]
    fn regions<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.inner.table().regions().iter().map(|r| region_dataclass(py, &r.desc)).collect()
    }

    /// The fd of each region, in the order of :attr:`regions`. Borrowed: valid while this
    /// object lives; do not close them.
    fn fds(&self) -> Vec<RawFd> {
        self.inner.table().regions().iter().filter_map(|r| r.mapping().fd().map(|f| f.as_raw_fd())).collect()
    }

    /// Total bytes over all regions.
    #[getter]
    fn size(&self) -> u64 {
        self.inner.table().regions().iter().map(|r| r.desc.size).sum()
    }

    /// One past the highest guest address (what a dirty log must cover).
    #[getter]
    fn guest_end(&self) -> u64 {
        self.inner.table().guest_end()
    }

    /// This process's address of guest address `addr` (the front-end's "user address").
    fn user_addr(&self, py: Python<'_>, addr: u64) -> PyResult<u64> {
        let p = self.inner.table().translate(addr, 0).map_err(Error::from).py_err(py)?;
        Ok(p as u64)
    }

    fn __repr__(&self) -> String {
        let regions: Vec<String> = self
            .inner
            .table()
            .regions()
            .iter()
            .map(|r| format!("{:#x}+{:#x}", r.desc.guest_addr, r.desc.size))
            .collect();
        format!("<vhostuser_rs.GuestMemory [{}]>", regions.join(", "))
    }
}

/// The dirty-page log of live migration: one bit per 4 KiB guest page.
#[pyclass(module = "vhostuser_rs", name = "DirtyLog", frozen)]
pub(crate) struct PyDirtyLog {
    pub(crate) inner: DirtyLog,
}

#[pymethods]
impl PyDirtyLog {
    /// A zeroed shareable log covering guest addresses ``[0, guest_end)`` (front-end role).
    #[staticmethod]
    fn allocate(py: Python<'_>, guest_end: u64) -> PyResult<PyDirtyLog> {
        Ok(PyDirtyLog { inner: DirtyLog::allocate(guest_end).map_err(Error::from).py_err(py)? })
    }

    /// Maps a log received with SET_LOG_BASE (back-end role); `fd` is duplicated.
    #[staticmethod]
    #[pyo3(signature = (fd, mmap_size, mmap_offset=0))]
    fn map(py: Python<'_>, fd: RawFd, mmap_size: u64, mmap_offset: u64) -> PyResult<PyDirtyLog> {
        if fd < 0 {
            return Err(PyValueError::new_err("invalid file descriptor"));
        }
        // SAFETY: the caller passes an open fd; it is duplicated.
        let owned =
            unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().map_err(|e| super::errors::os_error(&e))?;
        Ok(PyDirtyLog { inner: DirtyLog::from_fd(owned, mmap_size, mmap_offset).map_err(Error::from).py_err(py)? })
    }

    /// Marks the pages written by `len` bytes at guest address `addr`.
    fn mark(&self, py: Python<'_>, addr: u64, len: u64) -> PyResult<()> {
        self.inner.mark(addr, len).map_err(Error::from).py_err(py)
    }

    /// Reads and clears the bitmap: the dirty page numbers, in order.
    fn take_dirty(&self) -> Vec<u64> {
        self.inner.take_dirty()
    }

    /// Bitmap size in bytes (SET_LOG_BASE's mmap_size).
    #[getter]
    fn size(&self) -> u64 {
        self.inner.size()
    }

    /// The fd to send with SET_LOG_BASE (borrowed).
    fn fileno(&self) -> Option<RawFd> {
        self.inner.fd().map(|f| f.as_raw_fd())
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<GuestBuffer>()?;
    m.add_class::<PyGuestMemory>()?;
    m.add_class::<PyDirtyLog>()?;
    Ok(())
}
