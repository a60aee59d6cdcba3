//! Built-in devices whose data path never calls Python.

pub mod blk;

pub use blk::BlockDevice;
