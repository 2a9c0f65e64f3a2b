//! GPU enumeration and engine memory: `mlart_device_count`,
//! `mlart_device_info`, `mlart_engine_mem_alloc/free/copy`.

use super::engine::{engine_ref, mlart_engine};
use super::error::mlart_error;
use super::panic::{ffi_result, ffi_value};
use super::types::{mlart_memory, MLART_MEMORY_DEVICE, MLART_MEMORY_HOST};
use super::{read_struct, write_c_str};
use crate::backend::cuda::{self, CudaBackend};
use crate::error::{Error, Result, Status};
use crate::format::Memory;
use std::ffi::{c_char, c_void};

/// One CUDA device. Fill `struct_size` with `mlart_device_props_init`
/// before passing it to `mlart_device_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mlart_device_props {
    /// `sizeof(mlart_device_props)`.
    pub struct_size: u32,
    /// The ordinal passed in (`device_index` of the engine options).
    pub device_index: i32,
    /// GPU name, NUL-terminated UTF-8.
    pub name: [c_char; 128],
    /// Compute capability, e.g. 9 and 0 for an H100/H200.
    pub compute_major: i32,
    pub compute_minor: i32,
    /// Streaming multiprocessors.
    pub sm_count: i32,
    /// Device memory in bytes.
    pub total_memory: u64,
    /// Whether this build of mlart carries kernels that run on it.
    pub has_kernels: bool,
    /// Which kernel image the driver will use, or why there is none.
    pub kernels: [c_char; 128],
}

/// Zeroes `props` and sets its `struct_size`. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_device_props_init(props: *mut mlart_device_props) {
    ffi_value("mlart_device_props_init", (), || {
        // SAFETY: a non-NULL pointer points to a writable struct (caller contract).
        if let Some(p) = unsafe { props.as_mut() } {
            *p = mlart_device_props {
                struct_size: std::mem::size_of::<mlart_device_props>() as u32,
                device_index: 0,
                name: [0; 128],
                compute_major: 0,
                compute_minor: 0,
                sm_count: 0,
                total_memory: 0,
                has_kernels: false,
                kernels: [0; 128],
            };
        }
    })
}

/// Writes the number of CUDA devices to `*out`: 0 when there is no NVIDIA
/// driver (that is not an error). A driver that fails is a DEVICE error.
#[no_mangle]
pub extern "C" fn mlart_device_count(out: *mut i32) -> *mut mlart_error {
    ffi_result("mlart_device_count", || {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let n = match cuda::device_count() {
            Ok(n) => n,
            Err(e) if e.status == Status::Unsupported => 0,
            Err(e) => return Err(e),
        };
        // SAFETY: out is non-NULL and writable (caller contract).
        unsafe { out.write(n.min(i32::MAX as usize) as i32) };
        Ok(())
    })
}

/// Describes CUDA device `device_index`. NOT_FOUND when there is no such
/// device, UNSUPPORTED when there is no driver.
#[no_mangle]
pub extern "C" fn mlart_device_info(
    device_index: i32,
    out: *mut mlart_device_props,
) -> *mut mlart_error {
    ffi_result("mlart_device_info", || {
        // SAFETY: a non-NULL out points to a caller struct.
        let mut p = unsafe {
            read_struct(
                out as *const mlart_device_props,
                "out",
                "mlart_device_props_init",
            )
        }?;
        if device_index < 0 {
            return Err(Error::invalid(format!(
                "device_index = {device_index} must be >= 0"
            )));
        }
        let props = cuda::device_props(device_index as usize)?;
        p.device_index = device_index;
        write_c_str(&mut p.name, &props.name);
        p.compute_major = props.major as i32;
        p.compute_minor = props.minor as i32;
        p.sm_count = props.sm_count as i32;
        p.total_memory = props.total_memory as u64;
        match CudaBackend::probe(device_index as usize) {
            Ok((_, image)) => {
                p.has_kernels = true;
                write_c_str(&mut p.kernels, &image);
            }
            Err(e) => {
                p.has_kernels = false;
                write_c_str(&mut p.kernels, &e.message);
            }
        }
        // SAFETY: out is non-NULL (read_struct checked) and writable.
        unsafe { out.write_unaligned(p) };
        Ok(())
    })
}

fn memory(arg: &str, raw: mlart_memory) -> Result<Memory> {
    Memory::from_raw(arg, raw)
}

/// Allocates `bytes` (> 0) in the engine's memory: device memory on a CUDA
/// engine, 256-byte aligned host memory on a CPU engine. Contents are
/// undefined. Release with `mlart_engine_mem_free` on the same engine.
#[no_mangle]
pub extern "C" fn mlart_engine_mem_alloc(
    engine: *mut mlart_engine,
    bytes: usize,
    out: *mut *mut c_void,
) -> *mut mlart_error {
    ffi_result("mlart_engine_mem_alloc", || {
        // SAFETY: engine handle contract.
        let e = unsafe { engine_ref(engine) }?;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        if bytes == 0 {
            return Err(Error::invalid("bytes = 0 must be >= 1"));
        }
        let ptr = match e.inner.backend().cuda() {
            Some(c) => c.mem_alloc(bytes)? as usize as *mut c_void,
            None => {
                let mut p: *mut c_void = std::ptr::null_mut();
                // SAFETY: posix_memalign writes p on success; 256 is a power
                // of two multiple of sizeof(void*).
                if unsafe { libc::posix_memalign(&mut p, 256, bytes) } != 0 {
                    return Err(Error::out_of_memory("host memory", bytes));
                }
                p
            }
        };
        // SAFETY: out is non-NULL and writable (caller contract).
        unsafe { out.write(ptr) };
        Ok(())
    })
}

/// Frees memory from `mlart_engine_mem_alloc` of the same engine. NULL is
/// ignored.
#[no_mangle]
pub extern "C" fn mlart_engine_mem_free(
    engine: *mut mlart_engine,
    ptr: *mut c_void,
) -> *mut mlart_error {
    ffi_result("mlart_engine_mem_free", || {
        // SAFETY: engine handle contract.
        let e = unsafe { engine_ref(engine) }?;
        if ptr.is_null() {
            return Ok(());
        }
        match e.inner.backend().cuda() {
            Some(c) => c.mem_free(ptr as usize as u64),
            None => {
                // SAFETY: allocated by posix_memalign in mlart_engine_mem_alloc
                // (caller contract), freed once.
                unsafe { libc::free(ptr) };
                Ok(())
            }
        }
    })
}

/// Copies `bytes` from `src` to `dst`, each in host or the engine's device
/// memory as `*_memory` says, and returns when the copy is done. The ranges
/// must not overlap. A CPU engine accepts host memory only.
#[no_mangle]
pub extern "C" fn mlart_engine_mem_copy(
    engine: *mut mlart_engine,
    dst: *mut c_void,
    dst_memory: mlart_memory,
    src: *const c_void,
    src_memory: mlart_memory,
    bytes: usize,
) -> *mut mlart_error {
    ffi_result("mlart_engine_mem_copy", || {
        // SAFETY: engine handle contract.
        let e = unsafe { engine_ref(engine) }?;
        let dm = memory("dst_memory", dst_memory)?;
        let sm = memory("src_memory", src_memory)?;
        if bytes == 0 {
            return Ok(());
        }
        if dst.is_null() {
            return Err(Error::null("dst"));
        }
        if src.is_null() {
            return Err(Error::null("src"));
        }
        let (d, s) = (dst as usize, src as usize);
        if d < s.saturating_add(bytes) && s < d.saturating_add(bytes) {
            return Err(Error::invalid(format!(
                "dst = {dst:p} and src = {src:p} overlap over {bytes} bytes"
            )));
        }
        match e.inner.backend().cuda() {
            Some(c) => {
                // Device sides are checked against their allocations.
                if dm == Memory::Device {
                    c.check_range("dst", d as u64, bytes)?;
                }
                if sm == Memory::Device {
                    c.check_range("src", s as u64, bytes)?;
                }
                c.mem_copy(d as u64, s as u64, bytes)
            }
            None => {
                for (name, m, raw) in [
                    ("dst_memory", dm, dst_memory),
                    ("src_memory", sm, src_memory),
                ] {
                    if m == Memory::Device {
                        return Err(Error::unsupported(format!(
                            "{name} = {raw} (MLART_MEMORY_DEVICE) but this engine runs on the CPU"
                        )));
                    }
                }
                // SAFETY: both ranges are valid for `bytes` and disjoint
                // (checked above; sizes by caller contract).
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
                Ok(())
            }
        }
    })
}

const _: () = assert!(MLART_MEMORY_HOST == 0 && MLART_MEMORY_DEVICE == 1);
