//! The CUDA backend: one GPU's primary context, the embedded kernels, a
//! stream and a workspace. Decode calls enqueue plan -> decode -> combine
//! with no host sync and no allocation once the workspace has grown, so a
//! caller can capture them in a CUDA graph.

use super::args::{DeviceDecode, KeysDev};
use super::driver::{self, dev_err, guarded, DeviceProps};
use super::fatbin;
use super::launch::{self, Geometry, Variant, DECODE_KERNELS};
use super::linear;
use super::lowering::{self, as_bytes, base_params, bind_workspace, check_alignment, code, int};
use super::params::{describe_error_flags, AppendParams, MlaParams, ScatterParams};
use super::staging::{host_indexed, DataRef, HostDecode, HostKeys};
use crate::backend::{cpu::CpuIsa, Backend, BackendInfo, BackendKind, Buffer};
use crate::decode::desc::DecodeOutput;
use crate::decode::{Decode, Keys};
use crate::error::{Error, Result};
use crate::format::{Dtype, KvFormat};
use cudarc::driver::{result, sys};
use parking_lot::Mutex;
use std::ffi::{c_void, CString};

/// Device memory owned by the backend.
#[derive(Debug, Default)]
pub(super) struct DeviceMem {
    ptr: u64,
    bytes: usize,
}

pub(super) struct State {
    pub(super) stream: sys::CUstream,
    /// Recorded after each call's last kernel; the next call's stream waits
    /// on it, so calls on different streams never share the workspace at once.
    pub(super) done: sys::CUevent,
    workspace: DeviceMem,
    staging: DeviceMem,
}

struct DecodeFn {
    format: KvFormat,
    d_qk: usize,
    variant: Variant,
    func: sys::CUfunction,
    smem: usize,
    /// Blocks of this kernel the whole GPU holds at once.
    resident: usize,
}

/// Whether compute capability 9.0 GPUs run the Hopper `wgmma` decode
/// kernels by default. They pass the CPU emulation but have not run on a
/// GPU yet, so they are opt-in until `scripts/gpu-check.sh` verifies them
/// on an H100/H200 (then this becomes `true`).
pub const WGMMA_BY_DEFAULT: bool = false;

/// `MLART_CUDA_WGMMA=1` or `=0` overrides [`WGMMA_BY_DEFAULT`].
fn wgmma_requested() -> bool {
    match std::env::var("MLART_CUDA_WGMMA").as_deref().map(str::trim) {
        Ok("1") => true,
        Ok("0") => false,
        _ => WGMMA_BY_DEFAULT,
    }
}

pub struct CudaBackend {
    info: BackendInfo,
    props: DeviceProps,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    module: sys::CUmodule,
    plan: sys::CUfunction,
    combine: sys::CUfunction,
    append: sys::CUfunction,
    decoders: Vec<DecodeFn>,
    /// The projection kernels, by name (`linear::LINEAR_KERNELS`).
    linear: Vec<(&'static str, sys::CUfunction)>,
    pub(super) linear_reduce: sys::CUfunction,
    /// `mla_rows`: the elementwise steps of a device-resident layer.
    pub(super) rows: sys::CUfunction,
    /// The V3.2 indexer (`mla_index.cuh`): scores, top-k and key scatter.
    pub(super) index_score: sys::CUfunction,
    pub(super) index_score_mma: sys::CUfunction,
    pub(super) index_topk: sys::CUfunction,
    pub(super) index_scatter: sys::CUfunction,
    pub(super) index_rows: sys::CUfunction,
    pub(super) state: Mutex<State>,
    /// One host-memory call at a time owns the staging area.
    pub(super) host_calls: Mutex<()>,
    /// Per-kernel timing while open (`profile_start` / `profile_stop`).
    pub(super) profile: super::profile::Profile,
}

// SAFETY: driver handles (context, module, functions, stream, event) may be
// used from any thread once the context is current; every method makes it
// current first, and mutable state is behind the mutex.
unsafe impl Send for CudaBackend {}
// SAFETY: as above.
unsafe impl Sync for CudaBackend {}

fn function(module: sys::CUmodule, name: &str) -> Result<sys::CUfunction> {
    let c = CString::new(name).map_err(|_| Error::internal("kernel name"))?;
    // SAFETY: module is loaded; c is NUL-terminated.
    unsafe { result::module::get_function(module, c) }
        .map_err(|e| dev_err("cuModuleGetFunction")(e).with_context(&format!("kernel {name}")))
}

impl CudaBackend {
    /// Checks, without opening a context, that GPU `index` exists and that
    /// the embedded kernels run on it; returns its description and the
    /// fatbin image the driver will pick.
    pub fn probe(index: usize) -> Result<(DeviceProps, String)> {
        let (_, props) = driver::device(index)?;
        let image = fatbin::fatbin().ok_or_else(|| {
            Error::unsupported(
                "this build of mlart has no CUDA kernels (nvcc was not found at build time; run scripts/cuda-toolchain.sh and rebuild)",
            )
        })?;
        let entries =
            fatbin::entries(image).map_err(|e| Error::internal(format!("embedded fatbin: {e}")))?;
        let image_name = fatbin::runs_on(&entries, props.major, props.minor).ok_or_else(|| {
            Error::unsupported(format!(
                "{} is sm_{}{}, but the kernels are built for sm_80 and newer",
                props.name, props.major, props.minor
            ))
        })?;
        Ok((props, image_name))
    }

    /// Opens GPU `index`. `why` prefixes the reason `mlart_engine_info` shows.
    pub fn new(index: usize, why: &str) -> Result<Self> {
        let (props, image_name) = Self::probe(index)?;
        let (dev, _) = driver::device(index)?;
        let image = fatbin::fatbin().ok_or_else(|| Error::internal("fatbin vanished"))?;
        guarded("CUDA backend setup", || {
            Self::open(dev, props.clone(), image, &image_name, why)
        })
    }

    fn open(
        dev: sys::CUdevice,
        props: DeviceProps,
        image: &'static [u8],
        image_name: &str,
        why: &str,
    ) -> Result<Self> {
        // SAFETY: dev is a valid device after cuInit.
        let ctx = unsafe { result::primary_ctx::retain(dev) }
            .map_err(dev_err("cuDevicePrimaryCtxRetain"))?;
        // Whatever fails from here gives back the context (and module).
        let mut module_slot: Option<sys::CUmodule> = None;
        let r = Self::open_in(ctx, dev, props, image, image_name, why, &mut module_slot);
        if r.is_err() {
            // SAFETY: the module (if loaded) and the retain are ours, unused.
            unsafe {
                if let Some(m) = module_slot {
                    let _ = result::module::unload(m);
                }
                let _ = result::primary_ctx::release(dev);
            }
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn open_in(
        ctx: sys::CUcontext,
        dev: sys::CUdevice,
        props: DeviceProps,
        image: &'static [u8],
        image_name: &str,
        why: &str,
        module_slot: &mut Option<sys::CUmodule>,
    ) -> Result<Self> {
        // SAFETY: ctx was just retained.
        unsafe { result::ctx::set_current(ctx) }.map_err(dev_err("cuCtxSetCurrent"))?;
        // SAFETY: image is a complete, 8-byte aligned fatbin that lives forever.
        let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(|e| {
                let mut err = dev_err("cuModuleLoadData")(e);
                err.status = crate::Status::Unsupported;
                err.with_context(&format!("loading the kernels for {}", props.name))
            })?;
        *module_slot = Some(module);
        let plan = function(module, launch::PLAN_KERNEL)?;
        let combine = function(module, launch::COMBINE_KERNEL)?;
        let append = function(module, launch::APPEND_KERNEL)?;
        let mut linear = Vec::new();
        for name in linear::LINEAR_KERNELS.iter().flatten() {
            linear.push((*name, function(module, name)?));
        }
        let linear_reduce = function(module, linear::REDUCE_KERNEL)?;
        let rows = function(module, launch::ROWS_KERNEL)?;
        let index_score = function(module, launch::INDEX_SCORE_KERNEL)?;
        let index_score_mma = function(module, launch::INDEX_SCORE_MMA_KERNEL)?;
        let index_topk = function(module, launch::INDEX_TOPK_KERNEL)?;
        let index_scatter = function(module, launch::INDEX_SCATTER_KERNEL)?;
        let index_rows = function(module, launch::INDEX_ROWS_KERNEL)?;
        let wgmma_runs = launch::runs_wgmma(props.major, props.minor);
        let wgmma = wgmma_runs && wgmma_requested();
        let mut decoders = Vec::new();
        for (format, d_qk, base) in DECODE_KERNELS {
            for variant in launch::VARIANTS {
                if variant == Variant::Wgmma64 && !wgmma {
                    continue;
                }
                let smem = launch::decode_smem_bytes(format, d_qk, variant);
                if smem > props.max_smem_per_block {
                    if variant == Variant::Rows16 {
                        return Err(Error::unsupported(format!(
                            "{} allows {} bytes of shared memory per block; the decode kernels need {smem}",
                            props.name, props.max_smem_per_block
                        )));
                    }
                    continue; // the 64-row variants are optional
                }
                let func = function(module, &launch::decode_kernel_name(base, variant))?;
                // SAFETY: func is a kernel of the loaded module.
                unsafe {
                    result::function::set_function_attribute(
                        func,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem as i32,
                    )
                }
                .map_err(dev_err("cuFuncSetAttribute"))?;
                // SAFETY: as above; block size and smem are this kernel's.
                let per_sm = unsafe {
                    result::occupancy::max_active_block_per_multiprocessor(
                        func,
                        variant.threads() as i32,
                        smem,
                    )
                }
                .map_err(dev_err("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
                decoders.push(DecodeFn {
                    format,
                    d_qk,
                    variant,
                    func,
                    smem,
                    resident: (per_sm.max(1) as usize) * props.sm_count as usize,
                });
            }
        }
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(dev_err("cuStreamCreate"))?;
        let done = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(dev_err("cuEventCreate"))?;
        let tensor_cores = match (wgmma_runs, wgmma, WGMMA_BY_DEFAULT) {
            (false, _, _) => "",
            (true, true, _) => "; wgmma: on",
            (true, false, true) => "; wgmma: off (MLART_CUDA_WGMMA=0)",
            (true, false, false) => "; wgmma: off until verified (MLART_CUDA_WGMMA=1 opts in)",
        };
        let reason = format!(
            "{why}CUDA device {} ({}, sm_{}{}, {} SMs), kernels: {image_name}{tensor_cores}",
            props.index, props.name, props.major, props.minor, props.sm_count
        );
        Ok(CudaBackend {
            info: BackendInfo {
                kind: BackendKind::Cuda,
                device_name: props.name.clone(),
                cpu_isa: CpuIsa::Scalar,
                device_index: props.index,
                threads: 0,
                thread_placement: String::new(),
                cpu_features: String::new(),
                reason,
            },
            props,
            dev,
            ctx,
            module,
            plan,
            combine,
            append,
            decoders,
            linear,
            linear_reduce,
            rows,
            index_score,
            index_score_mma,
            index_topk,
            index_scatter,
            index_rows,
            state: Mutex::new(State {
                stream,
                done,
                workspace: DeviceMem::default(),
                staging: DeviceMem::default(),
            }),
            host_calls: Mutex::new(()),
            profile: Default::default(),
        })
    }

    pub fn props(&self) -> &DeviceProps {
        &self.props
    }

    /// Whether 64-row decode blocks run the `wgmma` kernels (compute
    /// capability 9.0 with them enabled, see [`WGMMA_BY_DEFAULT`]).
    pub fn uses_wgmma(&self) -> bool {
        self.decoders.iter().any(|d| d.variant == Variant::Wgmma64)
    }

    /// The decode kernel and launch geometry for a call.
    fn select(&self, a: &DeviceDecode) -> Result<(&DecodeFn, Geometry)> {
        launch::decode_kernel(&a.shape, a.layout.format)?;
        let sparse = matches!(a.keys, KeysDev::Sparse { .. });
        let rows_per_group = if sparse {
            a.shape.h_q
        } else {
            a.shape.s_q * a.shape.h_q
        };
        let pick = |v: Variant| {
            self.decoders
                .iter()
                .find(|k| k.format == a.layout.format && k.d_qk == a.shape.d_qk && k.variant == v)
        };
        let want = launch::choose_variant(
            rows_per_group,
            a.layout.format,
            a.shape.d_qk,
            self.props.max_smem_per_block,
            pick(Variant::Wgmma64).is_some(),
        );
        let f = pick(want)
            .or_else(|| pick(Variant::Rows16))
            .ok_or_else(|| Error::internal("no decode kernel loaded for this format and d_qk"))?;
        let geo = Geometry::new(&a.shape, sparse, f.variant.rows(), f.resident)?;
        Ok((f, geo))
    }

    /// A projection kernel by name.
    pub(super) fn linear_function(&self, name: &str) -> Result<sys::CUfunction> {
        self.linear
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, f)| f)
            .ok_or_else(|| Error::internal(format!("kernel {name} not loaded")))
    }

    pub(super) fn make_current(&self) -> Result<()> {
        // SAFETY: ctx is retained for the backend's life.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(dev_err("cuCtxSetCurrent"))
    }

    /// Grows `mem` to `bytes` (after the device is done with the old one).
    pub(super) fn ensure(&self, st: &mut State, which: Which, bytes: usize) -> Result<u64> {
        let cur = match which {
            Which::Workspace => &st.workspace,
            Which::Staging => &st.staging,
        };
        if cur.bytes >= bytes && cur.ptr != 0 {
            return Ok(cur.ptr);
        }
        // SAFETY: event and stream are the backend's own.
        unsafe { result::event::synchronize(st.done) }.map_err(dev_err("cuEventSynchronize"))?;
        // SAFETY: as above.
        unsafe { result::stream::synchronize(st.stream) }
            .map_err(dev_err("cuStreamSynchronize"))?;
        let mem = match which {
            Which::Workspace => &mut st.workspace,
            Which::Staging => &mut st.staging,
        };
        if mem.ptr != 0 {
            // SAFETY: allocated by malloc_sync below and no longer in use.
            unsafe { result::free_sync(mem.ptr) }.map_err(dev_err("cuMemFree"))?;
            *mem = DeviceMem::default();
        }
        let want = bytes.max(1 << 20).next_power_of_two();
        // SAFETY: plain device allocation.
        let ptr = unsafe { result::malloc_sync(want) }.map_err(|e| {
            if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                Error::out_of_memory("CUDA workspace", want)
            } else {
                dev_err("cuMemAlloc")(e)
            }
        })?;
        *mem = DeviceMem { ptr, bytes: want };
        Ok(ptr)
    }

    /// Checks that `[ptr, ptr + len)` lies inside one allocation the driver
    /// knows (device, managed or pinned host memory), so a kernel can
    /// neither fault on a host pointer nor read or write past a buffer.
    pub fn check_range(&self, name: &str, ptr: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut start: sys::CUdeviceptr = 0;
        let mut size: usize = 0;
        let not_device = || {
            Error::invalid(format!(
                "{name} = {ptr:#x} is not memory of a CUDA device (MLART_MEMORY_DEVICE needs device, managed or pinned host memory)"
            ))
        };
        guarded("cuPointerGetAttributes", || {
            let mut attrs = [
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
            ];
            let mut data = [
                &mut start as *mut sys::CUdeviceptr as *mut c_void,
                &mut size as *mut usize as *mut c_void,
            ];
            // SAFETY: both attributes are written into locals of their types
            // (a CUdeviceptr and a size_t); one call for both.
            unsafe { sys::cuPointerGetAttributes(2, attrs.as_mut_ptr(), data.as_mut_ptr(), ptr) }
                .result()
                .map_err(|_| not_device())
        })?;
        // Memory the driver does not know reads as an empty range at 0.
        if size == 0 {
            return Err(not_device());
        }
        let end = ptr.checked_add(len as u64);
        if end.is_none_or(|e| e > start.saturating_add(size as u64)) {
            return Err(Error::invalid(format!(
                "{name} = {ptr:#x}: the call uses {len} bytes from there, past the end of its allocation ({size} bytes at {start:#x})"
            )));
        }
        Ok(())
    }

    /// Allocates `bytes` of device memory for the host (uninitialized).
    pub fn mem_alloc(&self, bytes: usize) -> Result<u64> {
        self.make_current()?;
        guarded("cuMemAlloc", || {
            // SAFETY: plain device allocation of a nonzero size.
            unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| {
                if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                    Error::out_of_memory("device memory", bytes)
                } else {
                    dev_err("cuMemAlloc")(e)
                }
            })
        })
    }

    /// Frees memory from `mem_alloc`.
    pub fn mem_free(&self, ptr: u64) -> Result<()> {
        self.make_current()?;
        guarded("cuMemFree", || {
            // SAFETY: the driver checks the address; a bad one is an error.
            unsafe { result::free_sync(ptr) }.map_err(dev_err("cuMemFree"))
        })
    }

    /// Copies `bytes` between any mix of host and device memory (unified
    /// addressing tells the driver which is which) and waits.
    pub fn mem_copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.make_current()?;
        guarded("cuMemcpy", || {
            // SAFETY: the caller vouches for both ranges (C contract); the
            // driver rejects addresses it does not know as device memory
            // only when they are not valid host memory either.
            unsafe { sys::cuMemcpy(dst, src, bytes) }
                .result()
                .map_err(dev_err("cuMemcpy"))?;
            // A copy from pageable host memory may still be in flight on the
            // legacy stream; the engine's stream does not wait for it.
            result::ctx::synchronize().map_err(dev_err("cuCtxSynchronize"))
        })
    }

    /// Enqueues one decode over device memory; waits and checks the error
    /// word when `a.stream` is 0.
    pub fn decode_device(&self, a: &DeviceDecode) -> Result<()> {
        self.decode_on(a, a.stream == 0)
    }

    /// [`Self::decode_device`] on the engine's stream (`a.stream` 0) or
    /// the caller's; `wait`: synchronize and check the error word.
    pub(super) fn decode_on(&self, a: &DeviceDecode, wait: bool) -> Result<()> {
        check_alignment(a)?;
        let (f, geo) = self.select(a)?;
        let ws = geo.workspace();
        let mut p = base_params(a, &geo)?;
        self.make_current()?;
        for (name, ptr, len) in lowering::device_ranges(a)? {
            self.check_range(name, ptr, len)?;
        }
        let mut st = self.state.lock();
        let stream = if a.stream == 0 {
            st.stream
        } else {
            a.stream as sys::CUstream
        };
        // SAFETY: a caller stream is a live CUstream (C contract).
        let capturing = unsafe { result::stream::is_capturing(stream) }
            .map_err(dev_err("cuStreamIsCapturing"))?
            != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        if capturing && (st.workspace.ptr == 0 || st.workspace.bytes < ws.bytes) {
            // Growing needs a sync and an allocation, neither allowed while
            // the stream is captured.
            return Err(Error::invalid(format!(
                "stream is being captured into a CUDA graph, but the engine's workspace must first grow to {} bytes: run one call of this shape outside the capture first",
                ws.bytes
            )));
        }
        let base = self.ensure(&mut st, Which::Workspace, ws.bytes)?;
        bind_workspace(&mut p, base, &ws);
        self.enqueue(&st, stream, &p, &geo, f, !capturing)?;
        if wait {
            // SAFETY: our stream.
            unsafe { result::stream::synchronize(stream) }
                .map_err(dev_err("decode (cuStreamSynchronize)"))?;
            let mut flags = [0u32; 1];
            // SAFETY: error_flags is 4 bytes of our workspace; the stream is idle.
            unsafe { result::memcpy_dtoh_sync(&mut flags, p.error_flags) }
                .map_err(dev_err("cuMemcpyDtoH"))?;
            if let Some(m) = describe_error_flags(flags[0]) {
                return Err(Error::invalid(format!(
                    "decode on {}: {m}",
                    self.props.name
                )));
            }
        }
        Ok(())
    }

    /// Writes `rows` (`[slots.len(), layout.d_qk]` of `src_dtype`, host or
    /// engine device memory) into the cache at `kv` (device memory,
    /// `layout`), row i at flat position `slots[i]` (negative: skipped),
    /// converting or quantizing on the GPU exactly as the host would, and
    /// `keys` (a V3.2 pool's indexer keys, if any) into the same slots of
    /// their own buffer. Waits for it with `wait`; else later work on the
    /// engine's stream follows it.
    #[allow(clippy::too_many_arguments)]
    pub fn append_rows(
        &self,
        kv: u64,
        layout: &crate::format::KvLayout,
        src_dtype: Dtype,
        rows: DataRef<'_>,
        slots: &[i32],
        keys: Option<super::indexer::KeyScatter<'_>>,
        wait: bool,
    ) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let n = slots.len();
        let row_bytes = n * layout.d_qk * src_dtype.size();
        if matches!(rows, DataRef::Host(r) if r.len() < row_bytes) {
            return Err(Error::internal("append rows smaller than [n, d_qk]"));
        }
        let host_keys = match keys.map(|k| (k.rows, k.row_bytes)) {
            Some((_, rb)) if rb == 0 || !rb.is_multiple_of(4) => {
                return Err(Error::internal(
                    "indexer key rows of a size the scatter cannot copy",
                ))
            }
            Some((DataRef::Host(k), rb)) if k.len() < n * rb => {
                return Err(Error::internal("indexer key rows smaller than [n, row]"))
            }
            Some((DataRef::Host(k), rb)) => &k[..n * rb],
            _ => &[],
        };
        let _host_call = self.host_calls.lock();
        self.make_current()?;
        let mut st = self.state.lock();
        // Staged: the host rows (if any), then the slots.
        let mut cv = super::staging::Carve::default();
        let rows_at = match rows {
            DataRef::Host(r) => cv.take(r.len()),
            DataRef::Device(_) => 0,
        };
        let slots_at = cv.take(4 * n);
        let keys_at = cv.take(host_keys.len());
        let base = self.ensure(&mut st, Which::Staging, cv.bytes())?;
        let src = match rows {
            DataRef::Host(_) => base + rows_at as u64,
            DataRef::Device(p) => p,
        };
        let p = AppendParams {
            n_rows: int("rows", n)?,
            d_qk: int("d_qk", layout.d_qk)?,
            src_dtype: code(src_dtype.raw()),
            kv_format: code(layout.format.raw()),
            block_size: int("block_size", layout.block_size)?,
            pad0: 0,
            block_bytes: layout.block_bytes as i64,
            src,
            slots: base + slots_at as u64,
            kv,
        };
        // SAFETY: the staging area holds `cv.bytes()`; copies and the kernel are
        // ordered on our stream; `p` is copied at launch; the cache layout
        // is the caller's (a pool's own layer), device rows the caller's
        // engine memory of `row_bytes`.
        unsafe {
            if let DataRef::Host(r) = rows {
                result::memcpy_htod_async(src, r, st.stream)
                    .map_err(dev_err("cuMemcpyHtoDAsync"))?;
            }
            result::memcpy_htod_async(p.slots, as_bytes(slots), st.stream)
                .map_err(dev_err("cuMemcpyHtoDAsync"))?;
            let mut args = [&p as *const AppendParams as *mut c_void];
            self.launch(
                "mla_append",
                self.append,
                (n as u32, 1, 1),
                (launch::APPEND_THREADS, 1, 1),
                0,
                st.stream,
                &mut args,
            )?;
            if let Some(k) = keys {
                let src = match k.rows {
                    DataRef::Host(_) => {
                        let at = base + keys_at as u64;
                        result::memcpy_htod_async(at, host_keys, st.stream)
                            .map_err(dev_err("cuMemcpyHtoDAsync"))?;
                        at
                    }
                    DataRef::Device(p) => p,
                };
                let sp = ScatterParams {
                    rows: p.n_rows,
                    row_words: int("row_bytes / 4", k.row_bytes / 4)?,
                    src,
                    slots: p.slots,
                    dst: k.dst,
                };
                // SAFETY: `src` holds the n rows (staged above, or the
                // caller's engine memory); `dst` is the pool's key buffer,
                // which has a row for every slot the append writes.
                self.enqueue_scatter(&sp, st.stream)?;
            }
            if wait {
                result::stream::synchronize(st.stream).map_err(dev_err("mla_append"))?;
            }
        }
        drop(st);
        Ok(())
    }

    /// Enqueues a device-to-device copy on the engine's stream.
    pub fn copy_async(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.make_current()?;
        let stream = self.state.lock().stream;
        guarded("cuMemcpyDtoDAsync", || {
            // SAFETY: both ranges are engine memory of `bytes` (callers own
            // the layout) and do not overlap.
            unsafe { result::memcpy_dtod_async(dst, src, bytes, stream) }
                .map_err(dev_err("cuMemcpyDtoDAsync"))
        })
    }

    /// Enqueues zeroing `bytes` at `dst` on the engine's stream.
    pub fn zero_async(&self, dst: u64, bytes: usize) -> Result<()> {
        self.make_current()?;
        let stream = self.state.lock().stream;
        guarded("cuMemsetD8Async", || {
            // SAFETY: as above.
            unsafe { result::memset_d8_async(dst, 0, bytes, stream) }
                .map_err(dev_err("cuMemsetD8Async"))
        })
    }

    /// Waits for everything enqueued on the engine's stream.
    pub fn sync(&self) -> Result<()> {
        self.make_current()?;
        let stream = self.state.lock().stream;
        guarded("cuStreamSynchronize", || {
            // SAFETY: our stream.
            unsafe { result::stream::synchronize(stream) }.map_err(dev_err("cuStreamSynchronize"))
        })
    }

    /// Device-to-device copy bandwidth (bytes read + written per second) over
    /// `bytes`-sized buffers, median of `reps`: the ruler GPU figures use.
    pub fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let a = self.mem_alloc(bytes)?;
        let b = self.mem_alloc(bytes);
        let r = b.and_then(|b| {
            let r = self.time_on_stream(reps, |stream| {
                // SAFETY: a and b are `bytes` long and ours.
                unsafe { result::memcpy_dtod_async(b, a, bytes, stream) }
                    .map_err(dev_err("cuMemcpyDtoDAsync"))
            });
            self.mem_free(b)?;
            r
        });
        self.mem_free(a)?;
        Ok(2.0 * bytes as f64 / r?)
    }

    /// Median seconds of one `decode_device(a)` enqueue, timed with events
    /// over `reps` back-to-back calls on the engine's stream (after one
    /// warm-up call that also checks the error word).
    pub fn time_decode(&self, a: &DeviceDecode, reps: usize) -> Result<f64> {
        let mut warm = *a;
        warm.stream = 0;
        self.decode_device(&warm)?;
        let (f, geo) = self.select(a)?;
        let ws = geo.workspace();
        let mut p = base_params(a, &geo)?;
        {
            let mut st = self.state.lock();
            let base = self.ensure(&mut st, Which::Workspace, ws.bytes)?;
            bind_workspace(&mut p, base, &ws);
        }
        self.time_on_stream(reps, |stream| {
            let st = self.state.lock();
            self.enqueue(&st, stream, &p, &geo, f, true)
        })
    }

    /// Median seconds of `op` enqueued on the engine's stream, each timed
    /// between two events.
    pub(super) fn time_on_stream(
        &self,
        reps: usize,
        mut op: impl FnMut(sys::CUstream) -> Result<()>,
    ) -> Result<f64> {
        self.make_current()?;
        let stream = self.state.lock().stream;
        let ev = |_: usize| {
            result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
                .map_err(dev_err("cuEventCreate"))
        };
        let events: Vec<sys::CUevent> = (0..2 * reps.max(1)).map(ev).collect::<Result<_>>()?;
        let run = (|| {
            for pair in events.chunks_exact(2) {
                // SAFETY: our events and stream.
                unsafe { result::event::record(pair[0], stream) }
                    .map_err(dev_err("cuEventRecord"))?;
                op(stream)?;
                // SAFETY: as above.
                unsafe { result::event::record(pair[1], stream) }
                    .map_err(dev_err("cuEventRecord"))?;
            }
            // SAFETY: as above.
            unsafe { result::stream::synchronize(stream) }
                .map_err(dev_err("cuStreamSynchronize"))?;
            let mut t = Vec::new();
            for pair in events.chunks_exact(2) {
                // SAFETY: both events completed (stream synchronized).
                let ms = unsafe { result::event::elapsed(pair[0], pair[1]) }
                    .map_err(dev_err("cuEventElapsedTime"))?;
                t.push(ms as f64 * 1e-3);
            }
            t.sort_by(f64::total_cmp);
            Ok(t[t.len() / 2])
        })();
        for e in events {
            // SAFETY: created above, no longer used.
            let _ = unsafe { result::event::destroy(e) };
        }
        run
    }

    /// Runs `mla_wgmma_probe` (kernels/mla_probe.cuh): the two wgmma GEMMs
    /// of the `_wg` decode kernels alone, on `q [64][64]`, `k [32][256]` and
    /// `p [64][32]` (bf16 bits, row-major). Returns `s = q · k[:, 0:64]ᵀ`
    /// `[64][32]` and `o = p · k` `[64][256]`, so a test can check the
    /// kernels' wgmma layout assumptions apart from the decode logic.
    /// UNSUPPORTED unless the GPU runs wgmma (compute capability 9.0).
    pub fn wgmma_probe(&self, q: &[u16], k: &[u16], p: &[u16]) -> Result<(Vec<f32>, Vec<f32>)> {
        if !launch::runs_wgmma(self.props.major, self.props.minor) {
            return Err(Error::unsupported(format!(
                "the wgmma probe needs compute capability 9.0; {} is {}.{}",
                self.props.name, self.props.major, self.props.minor
            )));
        }
        for (name, got, want) in [
            ("q", q.len(), 64 * 64),
            ("k", k.len(), 32 * 256),
            ("p", p.len(), 64 * 32),
        ] {
            if got != want {
                return Err(Error::invalid(format!(
                    "{name} has {got} elements, not {want}"
                )));
            }
        }
        let func = function(self.module, launch::WGMMA_PROBE_KERNEL)?;
        let (s_len, o_len) = (64 * 32, 64 * 256);
        let sizes = [2 * q.len(), 2 * k.len(), 2 * p.len(), 4 * s_len, 4 * o_len];
        let mut bufs: Vec<u64> = Vec::with_capacity(sizes.len());
        let run = (|| -> Result<(Vec<f32>, Vec<f32>)> {
            for bytes in sizes {
                bufs.push(self.mem_alloc(bytes)?);
            }
            for (i, host) in [q, k, p].into_iter().enumerate() {
                self.mem_copy(bufs[i], host.as_ptr() as u64, sizes[i])?;
            }
            #[repr(C)]
            struct ProbeParams {
                q: u64,
                k: u64,
                p: u64,
                s: u64,
                o: u64,
            }
            let params = ProbeParams {
                q: bufs[0],
                k: bufs[1],
                p: bufs[2],
                s: bufs[3],
                o: bufs[4],
            };
            let smem = (q.len() + k.len() + p.len()) * 2;
            let stream = self.state.lock().stream;
            let mut args = [&params as *const ProbeParams as *mut c_void];
            // SAFETY: the function is the probe of our module; its one
            // argument matches MlaProbeParams; the buffers hold the sizes
            // the kernel reads and writes; the stream is synchronized before
            // `params` goes out of scope.
            unsafe {
                let name = "mla_wgmma_probe";
                self.launch(
                    name,
                    func,
                    (1, 1, 1),
                    (128, 1, 1),
                    smem as u32,
                    stream,
                    &mut args,
                )?;
                result::stream::synchronize(stream).map_err(dev_err("mla_wgmma_probe"))?;
            }
            let mut s = vec![0f32; s_len];
            let mut o = vec![0f32; o_len];
            self.mem_copy(s.as_mut_ptr() as u64, bufs[3], sizes[3])?;
            self.mem_copy(o.as_mut_ptr() as u64, bufs[4], sizes[4])?;
            Ok((s, o))
        })();
        for b in bufs {
            let _ = self.mem_free(b);
        }
        run
    }

    /// Runs only the plan kernel for `a` and returns what it wrote and the
    /// geometry it was built for (tests compare it with `launch::host_plan`).
    pub fn device_plan(&self, a: &DeviceDecode) -> Result<(launch::DevicePlan, Geometry)> {
        let (_, geo) = self.select(a)?;
        let ws = geo.workspace();
        let mut p = base_params(a, &geo)?;
        self.make_current()?;
        let mut st = self.state.lock();
        let base = self.ensure(&mut st, Which::Workspace, ws.bytes)?;
        bind_workspace(&mut p, base, &ws);
        let stream = st.stream;
        let mut n = [0i32; 1];
        let mut items = vec![0i32; 4 * geo.max_items];
        let mut groups = vec![0i32; 2 * geo.groups];
        let mut part_first = vec![0i32; geo.parts + 1];
        // SAFETY: handles are live, the workspace holds `geo`'s extents and
        // the copies wait for the plan kernel (stream synchronized first).
        unsafe {
            self.enqueue_plan(stream, &p)?;
            result::stream::synchronize(stream).map_err(dev_err("mla_plan"))?;
            result::memcpy_dtoh_sync(&mut n, p.num_items).map_err(dev_err("cuMemcpyDtoH"))?;
            result::memcpy_dtoh_sync(&mut items, p.items).map_err(dev_err("cuMemcpyDtoH"))?;
            result::memcpy_dtoh_sync(&mut groups, p.group_meta).map_err(dev_err("cuMemcpyDtoH"))?;
            result::memcpy_dtoh_sync(&mut part_first, p.part_first)
                .map_err(dev_err("cuMemcpyDtoH"))?;
        }
        let n = (n[0].max(0) as usize).min(geo.max_items);
        let items = items
            .chunks_exact(4)
            .take(n)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect();
        let groups = groups.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
        Ok((
            launch::DevicePlan {
                items,
                groups,
                part_first,
            },
            geo,
        ))
    }

    /// Clears the error word and enqueues the plan kernel.
    ///
    /// # Safety
    /// `stream` is live and `p`'s workspace addresses hold its geometry.
    unsafe fn enqueue_plan(&self, stream: sys::CUstream, p: &MlaParams) -> Result<()> {
        // SAFETY: forwarded contract; `p` is copied at launch.
        unsafe {
            result::memset_d8_async(p.error_flags, 0, 4, stream)
                .map_err(dev_err("cuMemsetD8Async"))?;
            let mut args = [p as *const MlaParams as *mut c_void];
            self.launch(
                "mla_plan",
                self.plan,
                (1, 1, 1),
                (launch::PLAN_THREADS, 1, 1),
                0,
                stream,
                &mut args,
            )
        }
    }

    fn enqueue(
        &self,
        st: &State,
        stream: sys::CUstream,
        p: &MlaParams,
        geo: &Geometry,
        f: &DecodeFn,
        // Order against other streams' use of the workspace through the
        // `done` event (not inside a graph capture, where the graph's own
        // order applies and outside events cannot be waited on).
        order: bool,
    ) -> Result<()> {
        // SAFETY: every handle is live; `p` outlives the launches (the
        // driver copies kernel parameters at launch); the workspace is ours
        // and large enough for `geo` (ensure above).
        unsafe {
            if order {
                result::stream::wait_event(
                    stream,
                    st.done,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(dev_err("cuStreamWaitEvent"))?;
            }
            self.enqueue_plan(stream, p)?;
            let mut args = [p as *const MlaParams as *mut c_void];
            self.launch(
                "mla_decode",
                f.func,
                geo.decode_grid(),
                (f.variant.threads(), 1, 1),
                f.smem as u32,
                stream,
                &mut args,
            )?;
            self.launch(
                "mla_combine",
                self.combine,
                geo.combine_grid(),
                (32 * launch::COMBINE_ROWS as u32, 1, 1),
                0,
                stream,
                &mut args,
            )?;
            if order {
                result::event::record(st.done, stream).map_err(dev_err("cuEventRecord"))?;
            }
        }
        Ok(())
    }
}

/// Which engine-owned buffer `ensure` grows.
#[derive(Clone, Copy)]
pub(super) enum Which {
    Workspace,
    Staging,
}

impl Backend for CudaBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// Host memory: stages the inputs, decodes, copies the results back.
    fn decode(&self, d: &Decode<'_>, out: &mut DecodeOutput<'_>) -> Result<()> {
        let keys = match &d.keys {
            Keys::Dense(k) => HostKeys::Dense {
                layout: k.kv.layout,
                kv: DataRef::Host(k.kv.data),
                num_blocks: k.kv.num_blocks,
                table: k.block_table,
                stride: k.block_table_stride,
                seqlens: k.seqlens,
            },
            Keys::Sparse(s) => HostKeys::Sparse {
                main: host_indexed(&s.main),
                extra: s.extra.as_ref().map(host_indexed),
            },
        };
        self.decode_host(
            &HostDecode {
                shape: d.shape,
                q_dtype: d.q_dtype,
                q: DataRef::Host(d.q),
                keys,
                sink: d.attn_sink,
            },
            out,
        )
    }

    fn install(&self, f: &mut (dyn FnMut() + Send)) {
        f()
    }

    fn cuda(&self) -> Option<&CudaBackend> {
        Some(self)
    }

    /// `Buffer` is host memory; GPU memory comes from `mem_alloc` (the KV
    /// pool uses that on CUDA engines), so nothing may ask for this.
    fn alloc(&self, what: &str, bytes: usize) -> Result<Buffer> {
        Err(Error::internal(format!(
            "{what}: host buffer of {bytes} bytes asked of the CUDA backend (use mem_alloc)"
        )))
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Errors cannot be reported from here; the driver frees what is left
        // when the process ends.
        let _ = guarded("CUDA backend teardown", || {
            let st = self.state.get_mut();
            // SAFETY: the handles are ours and no call is in flight (&mut self).
            unsafe {
                let _ = result::ctx::set_current(self.ctx);
                let _ = result::stream::synchronize(st.stream);
                for m in [&st.workspace, &st.staging] {
                    if m.ptr != 0 {
                        let _ = result::free_sync(m.ptr);
                    }
                }
                let _ = result::event::destroy(st.done);
                let _ = result::stream::destroy(st.stream);
                let _ = result::module::unload(self.module);
                let _ = result::primary_ctx::release(self.dev);
            }
            Ok(())
        });
    }
}
