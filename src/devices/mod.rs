//! Built-in devices whose data path never calls Python.

pub mod blk;
pub mod net;

pub use blk::BlockDevice;
pub use net::{Loopback, NetOptions};
