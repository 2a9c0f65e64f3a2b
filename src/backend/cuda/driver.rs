//! The NVIDIA driver, found at run time: mlart never links libcuda, so it
//! builds and runs on machines without CUDA. The library is probed with
//! `dlopen` before the first cudarc call (cudarc panics when it cannot load
//! the driver), and every driver call is made behind `catch_unwind`.

use crate::error::{Error, Result};
use cudarc::driver::{result, sys};
use once_cell::sync::OnceCell;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a host wants to know about a GPU before choosing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceProps {
    pub index: usize,
    pub name: String,
    pub major: u32,
    pub minor: u32,
    pub sm_count: u32,
    pub total_memory: usize,
    /// Largest dynamic shared memory a block may opt in to.
    pub max_smem_per_block: usize,
}

/// Runs a driver call, turning a cudarc panic (missing symbol on an old
/// driver) into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(Error::device(format!(
            "{what}: the CUDA driver call panicked (driver too old for CUDA 12.8 entry points?)"
        )))
    })
}

/// Maps a driver error to a DEVICE error naming the call.
pub(crate) fn dev_err(what: &str) -> impl FnOnce(result::DriverError) -> Error + '_ {
    move |e| {
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", e.0));
        Error::device(format!("{what} failed: {name}"))
    }
}

fn probe_library() -> Result<()> {
    // Miri (which checks the C ABI's unsafe code) cannot call dlopen.
    if cfg!(miri) {
        return Err(Error::unsupported("no NVIDIA driver under Miri"));
    }
    let mut tried = Vec::new();
    for name in ["libcuda.so.1", "libcuda.so"] {
        let c = CString::new(name).map_err(|_| Error::internal("library name"))?;
        // SAFETY: dlopen with a valid NUL-terminated name; the handle is kept
        // open for the life of the process (cudarc opens it again by name).
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !h.is_null() {
            let sym = CString::new("cuInit").map_err(|_| Error::internal("symbol name"))?;
            // SAFETY: h is a live handle from dlopen; sym is NUL-terminated.
            if unsafe { libc::dlsym(h, sym.as_ptr()) }.is_null() {
                return Err(Error::unsupported(format!(
                    "{name} was found but has no cuInit: not an NVIDIA driver"
                )));
            }
            return Ok(());
        }
        tried.push(name);
    }
    Err(Error::unsupported(format!(
        "no NVIDIA driver: the dynamic loader found none of {}",
        tried.join(", ")
    )))
}

/// Loads and initializes the driver once per process.
pub fn driver() -> Result<()> {
    static DRIVER: OnceCell<std::result::Result<(), Error>> = OnceCell::new();
    DRIVER
        .get_or_init(|| {
            if std::env::var("MLART_CUDA_DISABLE").is_ok_and(|v| v == "1") {
                return Err(Error::unsupported(
                    "the CUDA backend is disabled by MLART_CUDA_DISABLE=1",
                ));
            }
            probe_library()?;
            guarded("cuInit", || result::init().map_err(dev_err("cuInit")))
        })
        .clone()
}

/// GPUs the driver reports (0 without a driver).
pub fn device_count() -> Result<usize> {
    driver()?;
    guarded("cuDeviceGetCount", || {
        result::device::get_count()
            .map(|n| n.max(0) as usize)
            .map_err(dev_err("cuDeviceGetCount"))
    })
}

fn attr(dev: sys::CUdevice, a: sys::CUdevice_attribute, what: &str) -> Result<i32> {
    // SAFETY: dev comes from cuDeviceGet after cuInit.
    unsafe { result::device::get_attribute(dev, a) }.map_err(dev_err(what))
}

/// The handle and description of GPU `index`.
pub(crate) fn device(index: usize) -> Result<(sys::CUdevice, DeviceProps)> {
    let count = device_count()?;
    if index >= count {
        return Err(Error::not_found(format!(
            "device_index = {index} but the driver reports {count} CUDA device(s)"
        )));
    }
    guarded("device query", || {
        let dev = result::device::get(index as i32).map_err(dev_err("cuDeviceGet"))?;
        use sys::CUdevice_attribute as A;
        let props = DeviceProps {
            index,
            name: result::device::get_name(dev).map_err(dev_err("cuDeviceGetName"))?,
            major: attr(
                dev,
                A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                "cc major",
            )? as u32,
            minor: attr(
                dev,
                A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                "cc minor",
            )? as u32,
            sm_count: attr(dev, A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "SM count")? as u32,
            // SAFETY: dev is valid (above).
            total_memory: unsafe { result::device::total_mem(dev) }
                .map_err(dev_err("cuDeviceTotalMem"))?,
            max_smem_per_block: attr(
                dev,
                A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                "shared memory per block",
            )? as usize,
        };
        Ok((dev, props))
    })
}

/// Describes GPU `index`.
pub fn device_props(index: usize) -> Result<DeviceProps> {
    device(index).map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        // On machines with a driver this lists the devices; without one it
        // must fail cleanly with a message that says why.
        match device_count() {
            Ok(n) => {
                for i in 0..n {
                    let p = device_props(i).unwrap();
                    assert!(!p.name.is_empty() && p.sm_count > 0);
                }
                let e = device_props(n).unwrap_err();
                assert_eq!(e.status, crate::Status::NotFound);
            }
            Err(e) => {
                assert_eq!(e.status, crate::Status::Unsupported, "{e}");
                assert!(e.message.contains("driver"), "{e}");
                assert!(device_props(0).is_err());
            }
        }
    }
}
