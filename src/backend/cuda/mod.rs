//! The CUDA backend: NVIDIA GPUs from Ampere (sm_80) up, through cudarc with
//! the driver loaded at run time, running the kernels of `kernels/` from one
//! fatbin embedded at build time.
//!
//! Everything but `device` and `staging` (which need a GPU to do anything)
//! is pure and tested on every machine: the launch geometry, the parameter
//! block the kernels read and its lowering, the fatbin's contents and the
//! host twin of the device plan.

pub mod args;
pub mod device;
pub mod driver;
pub mod fatbin;
pub mod launch;
pub mod lowering;
pub mod params;
pub mod staging;

pub use device::{CudaBackend, WGMMA_BY_DEFAULT};
pub use driver::{device_count, device_props, DeviceProps};
