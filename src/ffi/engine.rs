//! `mlart_engine`: creation, options, description.

use super::error::mlart_error;
use super::panic::{ffi_result, ffi_value};
use super::types::{
    mlart_backend, mlart_cpu_isa, mlart_thread_affinity, MLART_AFFINITY_AUTO, MLART_BACKEND_AUTO,
    MLART_BACKEND_CPU, MLART_BACKEND_CUDA,
};
use super::{read_versioned, write_c_str, write_struct_prefix};
use crate::backend::cpu::Affinity;
use crate::backend::BackendKind;
use crate::engine::{BackendRequest, Engine, EngineOptions};
use crate::error::{Error, Result};
use std::ffi::c_char;
use std::sync::Arc;

/// A compute engine: one backend (CPU thread pool or GPU), its workspace and
/// its memory space.
///
/// Thread-safety: all functions taking an engine may be called concurrently
/// from any threads; concurrent decodes share the engine's worker threads.
/// `mlart_engine_free` must not race with other calls on the same engine.
/// Pools created from an engine keep it alive until they are freed.
pub struct mlart_engine {
    pub(crate) inner: Arc<Engine>,
}

/// Options for `mlart_engine_create`. Fill with `mlart_engine_options_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mlart_engine_options {
    /// `sizeof(mlart_engine_options)`.
    pub struct_size: u32,
    /// Which backend; default `MLART_BACKEND_AUTO`.
    pub backend: mlart_backend,
    /// GPU ordinal (0 for the CPU backend); default 0.
    pub device_index: i32,
    /// CPU worker threads; 0 (default) = one per available core.
    pub num_threads: i32,
    /// Whether CPU worker threads are pinned; default MLART_AFFINITY_AUTO.
    /// Since 0.3: a struct_size of 16 (the earlier layout, which ends
    /// before this field) is still accepted, and the field is then AUTO.
    pub thread_affinity: mlart_thread_affinity,
}

/// `sizeof(mlart_engine_options)` before `thread_affinity` was appended.
const ENGINE_OPTIONS_SIZE_BEFORE_AFFINITY: usize =
    std::mem::offset_of!(mlart_engine_options, thread_affinity);
// That first layout was four 32-bit fields: 16 bytes.
const _: () = assert!(ENGINE_OPTIONS_SIZE_BEFORE_AFFINITY == 16);

/// What an engine runs on. Fill `struct_size` with `mlart_engine_props_init`
/// before passing it to `mlart_engine_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mlart_engine_props {
    /// `sizeof(mlart_engine_props)`.
    pub struct_size: u32,
    /// The backend in use (never `MLART_BACKEND_AUTO`).
    pub backend: mlart_backend,
    /// The CPU kernel variant (CPU engines).
    pub cpu_isa: mlart_cpu_isa,
    /// Worker threads (CPU engines).
    pub num_threads: i32,
    /// GPU ordinal (CUDA engines), else 0.
    pub device_index: i32,
    /// CPU model or GPU name, NUL-terminated UTF-8.
    pub device_name: [c_char; 128],
    /// CPU features detected at run time, space separated.
    pub cpu_features: [c_char; 128],
    /// Why this backend and kernel variant were chosen.
    pub reason: [c_char; 256],
    /// CPU engines: where the worker threads run, e.g. "pinned to CPUs
    /// 0,1 (auto: ...)" or "not pinned (...)"; empty for GPU engines.
    /// Since 0.3: a struct_size of 532 (the earlier layout, which ends
    /// before this field) is still accepted and only that prefix written.
    pub thread_placement: [c_char; 128],
}

/// `sizeof(mlart_engine_props)` before `thread_placement` was appended.
const ENGINE_PROPS_SIZE_BEFORE_PLACEMENT: usize =
    std::mem::offset_of!(mlart_engine_props, thread_placement);
const _: () = assert!(ENGINE_PROPS_SIZE_BEFORE_PLACEMENT == 532);

/// Fills `options` with the defaults. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_engine_options_init(options: *mut mlart_engine_options) {
    ffi_value("mlart_engine_options_init", (), || {
        // SAFETY: a non-NULL pointer points to a writable struct (caller contract).
        if let Some(o) = unsafe { options.as_mut() } {
            *o = mlart_engine_options {
                struct_size: std::mem::size_of::<mlart_engine_options>() as u32,
                backend: MLART_BACKEND_AUTO,
                device_index: 0,
                num_threads: 0,
                thread_affinity: MLART_AFFINITY_AUTO,
            };
        }
    })
}

/// Zeroes `props` and sets its `struct_size`. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_engine_props_init(props: *mut mlart_engine_props) {
    ffi_value("mlart_engine_props_init", (), || {
        // SAFETY: a non-NULL pointer points to a writable struct (caller contract).
        if let Some(p) = unsafe { props.as_mut() } {
            *p = mlart_engine_props {
                struct_size: std::mem::size_of::<mlart_engine_props>() as u32,
                backend: 0,
                cpu_isa: 0,
                num_threads: 0,
                device_index: 0,
                device_name: [0; 128],
                cpu_features: [0; 128],
                reason: [0; 256],
                thread_placement: [0; 128],
            };
        }
    })
}

fn engine_options(o: &mlart_engine_options) -> Result<EngineOptions> {
    let backend = BackendRequest::from_raw("options->backend", o.backend)?;
    if o.device_index < 0 {
        return Err(Error::invalid(format!(
            "options->device_index = {} must be >= 0",
            o.device_index
        )));
    }
    if o.num_threads < 0 {
        return Err(Error::invalid(format!(
            "options->num_threads = {} must be >= 0",
            o.num_threads
        )));
    }
    Ok(EngineOptions {
        backend,
        device_index: o.device_index as usize,
        num_threads: o.num_threads as usize,
        affinity: Affinity::from_raw("options->thread_affinity", o.thread_affinity)?,
    })
}

/// Creates an engine. `options` may be NULL for the defaults. On success
/// `*out` receives the engine, to be released with `mlart_engine_free`.
#[no_mangle]
pub extern "C" fn mlart_engine_create(
    options: *const mlart_engine_options,
    out: *mut *mut mlart_engine,
) -> *mut mlart_error {
    ffi_result("mlart_engine_create", || {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let opts = if options.is_null() {
            EngineOptions::default()
        } else {
            // SAFETY: a non-NULL options points to a caller struct of struct_size
            // bytes of plain data.
            let o = unsafe {
                read_versioned(
                    options,
                    "options",
                    "mlart_engine_options_init",
                    mlart_engine_options_init,
                    &[ENGINE_OPTIONS_SIZE_BEFORE_AFFINITY],
                )
            }?;
            engine_options(&o)?
        };
        let engine = Engine::new(&opts)?;
        let handle = Box::into_raw(Box::new(mlart_engine {
            inner: Arc::new(engine),
        }));
        // SAFETY: out is non-NULL and writable (caller contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Releases an engine. NULL is ignored. Pools made from it stay usable.
#[no_mangle]
pub extern "C" fn mlart_engine_free(engine: *mut mlart_engine) {
    ffi_value("mlart_engine_free", (), || {
        if !engine.is_null() {
            // SAFETY: produced by mlart_engine_create, freed once (caller contract).
            drop(unsafe { Box::from_raw(engine) });
        }
    })
}

/// Borrows the engine behind a handle.
///
/// # Safety
/// A non-NULL `engine` must be a live handle from `mlart_engine_create`.
pub(crate) unsafe fn engine_ref<'a>(engine: *const mlart_engine) -> Result<&'a mlart_engine> {
    // SAFETY: forwarded contract.
    unsafe { engine.as_ref() }.ok_or_else(|| Error::null("engine"))
}

/// Describes what `engine` runs on. `out->struct_size` must be set (use
/// `mlart_engine_props_init`).
#[no_mangle]
pub extern "C" fn mlart_engine_info(
    engine: *const mlart_engine,
    out: *mut mlart_engine_props,
) -> *mut mlart_error {
    ffi_result("mlart_engine_info", || {
        // SAFETY: engine handle contract.
        let e = unsafe { engine_ref(engine) }?;
        // SAFETY: a non-NULL out points to a caller struct of struct_size
        // bytes of plain data.
        let mut p = unsafe {
            read_versioned(
                out as *const mlart_engine_props,
                "out",
                "mlart_engine_props_init",
                mlart_engine_props_init,
                &[ENGINE_PROPS_SIZE_BEFORE_PLACEMENT],
            )
        }?;
        let info = e.inner.info();
        p.backend = match info.kind {
            BackendKind::Cpu => MLART_BACKEND_CPU,
            BackendKind::Cuda => MLART_BACKEND_CUDA,
        };
        p.cpu_isa = info.cpu_isa.raw();
        p.num_threads = info.threads.min(i32::MAX as usize) as i32;
        p.device_index = info.device_index.min(i32::MAX as usize) as i32;
        write_c_str(&mut p.device_name, &info.device_name);
        write_c_str(&mut p.cpu_features, &info.cpu_features);
        write_c_str(&mut p.reason, &info.reason);
        write_c_str(&mut p.thread_placement, &info.thread_placement);
        // SAFETY: out is non-NULL (checked by read_versioned) and has
        // struct_size writable bytes, which p.struct_size holds.
        unsafe { write_struct_prefix(out, &p, p.struct_size as usize) };
        Ok(())
    })
}
