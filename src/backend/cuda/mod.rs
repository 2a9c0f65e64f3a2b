//! The CUDA backend: NVIDIA GPUs from Ampere (sm_80) up, through cudarc with
//! the driver loaded at run time, running the kernels of `kernels/` from one
//! fatbin embedded at build time.
//!
//! Everything but `device`, `staging`, `projection`, `resident`, `indexer` and `profile` (which need a GPU to
//! do anything) is pure and tested on every machine: the launch geometry,
//! the parameter blocks the kernels read and their lowering, the fatbin's
//! contents, the host twin of the device plan, and the projections'
//! weight layouts and plan.

pub mod args;
pub mod device;
pub mod driver;
pub mod fatbin;
pub mod indexer;
pub mod launch;
pub mod linear;
pub mod lowering;
pub mod params;
pub mod profile;
pub mod projection;
pub mod resident;
pub mod staging;

pub use device::{CudaBackend, WGMMA_BY_DEFAULT};
pub use driver::{device_count, device_props, DeviceProps};
pub use profile::KernelTime;
