//! Virtio device definitions: for each device type, the one place that holds its feature bits,
//! header and config layouts, request types and status codes. The built-in devices (back-end
//! role) and the clients (front-end role) both use these; nothing here does I/O.

pub mod blk;
pub mod net;
