//! The CUDA backend: one GPU's primary context, the embedded kernels, a
//! stream and a workspace. Decode calls enqueue plan -> decode -> combine
//! with no host sync and no allocation once the workspace has grown, so a
//! caller can capture them in a CUDA graph.

use super::args::{DeviceDecode, KeysDev};
use super::driver::{self, dev_err, guarded, DeviceProps};
use super::fatbin;
use super::launch::{self, Geometry, DECODE_KERNELS};
use super::params::{describe_error_flags, AppendParams, MlaParams};
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
struct DeviceMem {
    ptr: u64,
    bytes: usize,
}

struct State {
    stream: sys::CUstream,
    /// Recorded after each call's last kernel; the next call's stream waits
    /// on it, so calls on different streams never share the workspace at once.
    done: sys::CUevent,
    workspace: DeviceMem,
    staging: DeviceMem,
}

struct DecodeFn {
    format: KvFormat,
    d_qk: usize,
    /// Query rows per block (16 or 64).
    rows: usize,
    func: sys::CUfunction,
    smem: usize,
    /// Blocks of this kernel the whole GPU holds at once.
    resident: usize,
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
    state: Mutex<State>,
    host_calls: Mutex<()>,
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
        let mut decoders = Vec::new();
        for (format, d_qk, base) in DECODE_KERNELS {
            for rows in launch::BLOCK_ROWS {
                let smem = launch::decode_smem_bytes(format, d_qk, rows);
                if smem > props.max_smem_per_block {
                    if rows == 16 {
                        return Err(Error::unsupported(format!(
                            "{} allows {} bytes of shared memory per block; the decode kernels need {smem}",
                            props.name, props.max_smem_per_block
                        )));
                    }
                    continue; // the 64-row variant is optional
                }
                let func = function(module, &launch::decode_kernel_name(base, rows))?;
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
                        launch::decode_threads(rows) as i32,
                        smem,
                    )
                }
                .map_err(dev_err("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
                decoders.push(DecodeFn {
                    format,
                    d_qk,
                    rows,
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
        let reason = format!(
            "{why}CUDA device {} ({}, sm_{}{}, {} SMs), kernels: {image_name}",
            props.index, props.name, props.major, props.minor, props.sm_count
        );
        Ok(CudaBackend {
            info: BackendInfo {
                kind: BackendKind::Cuda,
                device_name: props.name.clone(),
                cpu_isa: CpuIsa::Scalar,
                device_index: props.index,
                threads: 0,
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
            state: Mutex::new(State {
                stream,
                done,
                workspace: DeviceMem::default(),
                staging: DeviceMem::default(),
            }),
            host_calls: Mutex::new(()),
        })
    }

    pub fn props(&self) -> &DeviceProps {
        &self.props
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
        let want = launch::block_rows(
            rows_per_group,
            a.layout.format,
            a.shape.d_qk,
            self.props.max_smem_per_block,
        );
        let pick = |rows: usize| {
            self.decoders
                .iter()
                .find(|k| k.format == a.layout.format && k.d_qk == a.shape.d_qk && k.rows == rows)
        };
        let f = pick(want)
            .or_else(|| pick(16))
            .ok_or_else(|| Error::internal("no decode kernel loaded for this format and d_qk"))?;
        let geo = Geometry::new(&a.shape, sparse, f.rows, f.resident)?;
        Ok((f, geo))
    }

    fn make_current(&self) -> Result<()> {
        // SAFETY: ctx is retained for the backend's life.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(dev_err("cuCtxSetCurrent"))
    }

    /// Grows `mem` to `bytes` (after the device is done with the old one).
    fn ensure(&self, st: &mut State, which: Which, bytes: usize) -> Result<u64> {
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
        check_alignment(a)?;
        let (f, geo) = self.select(a)?;
        let ws = geo.workspace();
        let mut p = base_params(a, &geo)?;
        self.make_current()?;
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
        if a.stream == 0 {
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

    /// Enqueues a copy of host `data` to device address `dst` on the
    /// engine's stream (`data` may be reused at once: pageable memory is
    /// staged before the call returns). Pair with [`Self::sync`].
    pub fn write_async(&self, dst: u64, data: &[u8]) -> Result<()> {
        self.make_current()?;
        let stream = self.state.lock().stream;
        guarded("cuMemcpyHtoDAsync", || {
            // SAFETY: dst is engine memory of at least data.len() bytes
            // (callers own the layout).
            unsafe { result::memcpy_htod_async(dst, data, stream) }
                .map_err(dev_err("cuMemcpyHtoDAsync"))
        })
    }

    /// Writes host `rows` (`[slots.len(), layout.d_qk]` of `src_dtype`) into
    /// the cache at `kv` (device memory, `layout`), row i at flat position
    /// `slots[i]` (negative: skipped), converting or quantizing on the GPU
    /// exactly as the host would; waits for it.
    pub fn append_rows(
        &self,
        kv: u64,
        layout: &crate::format::KvLayout,
        src_dtype: Dtype,
        rows: &[u8],
        slots: &[i32],
    ) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let n = slots.len();
        if rows.len() < n * layout.d_qk * src_dtype.size() {
            return Err(Error::internal("append rows smaller than [n, d_qk]"));
        }
        let _host_call = self.host_calls.lock();
        self.make_current()?;
        let mut st = self.state.lock();
        let slots_at = rows.len().div_ceil(256) * 256;
        let bytes = slots_at + 4 * n;
        let base = self.ensure(&mut st, Which::Staging, bytes)?;
        let p = AppendParams {
            n_rows: int("rows", n)?,
            d_qk: int("d_qk", layout.d_qk)?,
            src_dtype: dtype_code(src_dtype),
            kv_format: format_code(layout.format),
            block_size: int("block_size", layout.block_size)?,
            pad0: 0,
            block_bytes: layout.block_bytes as i64,
            src: base,
            slots: base + slots_at as u64,
            kv,
        };
        // SAFETY: the staging area holds `bytes`; copies and the kernel are
        // ordered on our stream; `p` is copied at launch; the cache layout
        // is the caller's (a pool's own layer).
        unsafe {
            result::memcpy_htod_async(base, rows, st.stream)
                .map_err(dev_err("cuMemcpyHtoDAsync"))?;
            result::memcpy_htod_async(p.slots, as_bytes(slots), st.stream)
                .map_err(dev_err("cuMemcpyHtoDAsync"))?;
            let mut args = [&p as *const AppendParams as *mut c_void];
            result::launch_kernel(
                self.append,
                (n as u32, 1, 1),
                (launch::APPEND_THREADS, 1, 1),
                0,
                st.stream,
                &mut args,
            )
            .map_err(dev_err("launch mla_append"))?;
            result::stream::synchronize(st.stream).map_err(dev_err("mla_append"))?;
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
    fn time_on_stream(
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

    /// Runs only the plan kernel for `a` and returns its items, group table
    /// and the geometry it was built for (tests compare it with
    /// `launch::host_plan`).
    #[allow(clippy::type_complexity)]
    pub fn device_plan(
        &self,
        a: &DeviceDecode,
    ) -> Result<(Vec<[i32; 4]>, Vec<[i32; 2]>, Geometry)> {
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
        // SAFETY: handles are live, the workspace holds `geo`'s extents and
        // the copies wait for the plan kernel (stream synchronized first).
        unsafe {
            self.enqueue_plan(stream, &p)?;
            result::stream::synchronize(stream).map_err(dev_err("mla_plan"))?;
            result::memcpy_dtoh_sync(&mut n, p.num_items).map_err(dev_err("cuMemcpyDtoH"))?;
            result::memcpy_dtoh_sync(&mut items, p.items).map_err(dev_err("cuMemcpyDtoH"))?;
            result::memcpy_dtoh_sync(&mut groups, p.group_meta).map_err(dev_err("cuMemcpyDtoH"))?;
        }
        let n = (n[0].max(0) as usize).min(geo.max_items);
        let items = items
            .chunks_exact(4)
            .take(n)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect();
        let groups = groups.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
        Ok((items, groups, geo))
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
            result::launch_kernel(
                self.plan,
                (1, 1, 1),
                (launch::PLAN_THREADS, 1, 1),
                0,
                stream,
                &mut args,
            )
            .map_err(dev_err("launch mla_plan"))
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
            result::launch_kernel(
                f.func,
                geo.decode_grid(),
                (launch::decode_threads(f.rows), 1, 1),
                f.smem as u32,
                stream,
                &mut args,
            )
            .map_err(dev_err("launch mla_decode"))?;
            result::launch_kernel(
                self.combine,
                geo.combine_grid(),
                (32 * launch::COMBINE_ROWS as u32, 1, 1),
                0,
                stream,
                &mut args,
            )
            .map_err(dev_err("launch mla_combine"))?;
            if order {
                result::event::record(st.done, stream).map_err(dev_err("cuEventRecord"))?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Which {
    Workspace,
    Staging,
}

fn dtype_code(d: Dtype) -> i32 {
    match d {
        Dtype::F32 => 0,
        Dtype::Bf16 => 1,
        Dtype::F16 => 2,
        Dtype::Fp8E4m3 => 3,
    }
}

fn format_code(f: KvFormat) -> i32 {
    match f {
        KvFormat::Bf16 => 0,
        KvFormat::F16 => 1,
        KvFormat::F32 => 2,
        KvFormat::Fp8V32 => 3,
        KvFormat::Fp8Model1 => 4,
    }
}

fn int(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{name} = {v} does not fit in int32")))
}

/// The kernels read caches with 16-byte loads and activations by element.
fn check_alignment(a: &DeviceDecode) -> Result<()> {
    let check = |name: &str, ptr: u64, align: u64| -> Result<()> {
        if !ptr.is_multiple_of(align) {
            return Err(Error::invalid(format!(
                "{name} = {ptr:#x} must be {align}-byte aligned for the CUDA kernels"
            )));
        }
        Ok(())
    };
    check("kv", a.kv, 16)?;
    check("q", a.q, a.q_dtype.size() as u64)?;
    check("out", a.out, 4)?;
    check("lse", a.lse, 4)?;
    check("attn_sink", a.sink, 4)?;
    if let KeysDev::Sparse { extra: Some(x), .. } = a.keys {
        check("extra_kv", x.kv, 16)?;
    }
    Ok(())
}

/// Points the parameters at the pieces of a workspace at `base`.
fn bind_workspace(p: &mut MlaParams, base: u64, ws: &launch::WorkspaceLayout) {
    p.items = base + ws.items as u64;
    p.group_meta = base + ws.group_meta as u64;
    p.num_items = base + ws.num_items as u64;
    p.error_flags = base + ws.error_flags as u64;
    p.part_lse = base + ws.part_lse as u64;
    p.part_o = base + ws.part_o as u64;
}

/// The call's parameters, without the workspace addresses.
pub(crate) fn base_params(a: &DeviceDecode, geo: &Geometry) -> Result<MlaParams> {
    let s = &a.shape;
    let mut p = MlaParams {
        batch: int("batch", s.batch)?,
        s_q: int("s_q", s.s_q)?,
        h_q: int("h_q", s.h_q)?,
        d_qk: int("d_qk", s.d_qk)?,
        d_v: int("d_v", s.d_v)?,
        causal: i32::from(s.causal),
        rows_per_group: int("rows", geo.rows_per_group)?,
        num_groups: int("groups", geo.groups)?,
        scale_log2: s.softmax_scale * std::f32::consts::LOG2_E,
        q_dtype: dtype_code(a.q_dtype),
        out_dtype: dtype_code(a.out_dtype),
        kv_format: format_code(a.layout.format),
        num_blocks: int("num_blocks", a.num_blocks)?,
        block_size: int("block_size", a.layout.block_size)?,
        block_bytes: a.layout.block_bytes as i64,
        parts: int("parts", geo.parts)?,
        max_items: int("items", geo.max_items)?,
        q: a.q,
        kv: a.kv,
        sink: a.sink,
        out: a.out,
        lse: a.lse,
        ..MlaParams::default()
    };
    match a.keys {
        KeysDev::Dense(d) => {
            p.block_table = d.block_table;
            p.bt_stride = int("block_table_stride", d.stride)?;
            p.seqlens = d.seqlens;
        }
        KeysDev::Sparse { main, extra } => {
            p.sparse = 1;
            p.kv = main.kv;
            p.num_blocks = int("num_blocks", main.num_blocks)?;
            p.block_size = int("block_size", main.layout.block_size)?;
            p.block_bytes = main.layout.block_bytes as i64;
            p.indices = main.indices;
            p.topk = int("topk", main.topk)?;
            p.topk_length = main.topk_length;
            if let Some(x) = extra {
                p.extra_kv = x.kv;
                p.extra_num_blocks = int("extra_num_blocks", x.num_blocks)?;
                p.extra_block_size = int("extra_block_size", x.layout.block_size)?;
                p.extra_block_bytes = x.layout.block_bytes as i64;
                p.extra_indices = x.indices;
                p.extra_topk = int("extra_topk", x.topk)?;
                p.extra_topk_length = x.topk_length;
            }
        }
    }
    Ok(p)
}

/// A cache a host-memory call reads: caller bytes (staged per call) or
/// engine device memory (a device-resident pool layer).
#[derive(Clone, Copy, Debug)]
pub enum CacheRef<'a> {
    Host(&'a [u8]),
    Device(u64),
}

/// One indexed cache of a host-memory sparse call.
#[derive(Clone, Copy, Debug)]
pub struct HostIndexed<'a> {
    pub layout: crate::format::KvLayout,
    pub kv: CacheRef<'a>,
    pub num_blocks: usize,
    pub indices: &'a [i32],
    pub topk: usize,
    pub topk_length: Option<&'a [i32]>,
}

/// Which keys a host-memory call reads.
#[derive(Clone, Copy, Debug)]
pub enum HostKeys<'a> {
    Dense {
        layout: crate::format::KvLayout,
        kv: CacheRef<'a>,
        num_blocks: usize,
        table: &'a [i32],
        stride: usize,
        seqlens: &'a [i32],
    },
    Sparse {
        main: HostIndexed<'a>,
        extra: Option<HostIndexed<'a>>,
    },
}

/// A validated decode whose small inputs are in host memory.
#[derive(Clone, Copy, Debug)]
pub struct HostDecode<'a> {
    pub shape: crate::decode::DecodeShape,
    pub q_dtype: Dtype,
    pub q: &'a [u8],
    pub keys: HostKeys<'a>,
    pub sink: Option<&'a [f32]>,
}

/// Host slices packed into one staging area, each piece 256-byte aligned.
struct Staging<'a> {
    pieces: Vec<(usize, &'a [u8])>,
    bytes: usize,
}

impl<'a> Staging<'a> {
    /// Reserves room for `data` (copied in) and returns its offset.
    fn put(&mut self, data: &'a [u8]) -> usize {
        let off = self.bytes;
        self.bytes += data.len().div_ceil(256) * 256;
        self.pieces.push((off, data));
        off
    }

    /// Reserves `len` bytes the device writes.
    fn reserve(&mut self, len: usize) -> usize {
        let off = self.bytes;
        self.bytes += len.div_ceil(256) * 256;
        off
    }
}

/// Where a staged piece will be: an offset in the staging area, or a
/// device address already.
#[derive(Clone, Copy)]
enum At {
    Staged(usize),
    Device(u64),
}

impl At {
    fn addr(self, base: u64) -> u64 {
        match self {
            At::Staged(off) => base + off as u64,
            At::Device(p) => p,
        }
    }
}

fn stage_cache<'a>(sg: &mut Staging<'a>, c: CacheRef<'a>) -> At {
    match c {
        CacheRef::Host(d) => At::Staged(sg.put(d)),
        CacheRef::Device(p) => At::Device(p),
    }
}

struct StagedIndexed {
    layout: crate::format::KvLayout,
    kv: At,
    num_blocks: usize,
    indices: usize,
    topk: usize,
    topk_length: Option<usize>,
}

fn stage_indexed<'a>(sg: &mut Staging<'a>, ik: &HostIndexed<'a>) -> StagedIndexed {
    StagedIndexed {
        layout: ik.layout,
        kv: stage_cache(sg, ik.kv),
        num_blocks: ik.num_blocks,
        indices: sg.put(as_bytes(ik.indices)),
        topk: ik.topk,
        topk_length: ik.topk_length.map(|l| sg.put(as_bytes(l))),
    }
}

fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: i32/f32 slices reinterpreted as their bytes; u8 has no alignment.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl CudaBackend {
    /// A decode whose queries, tables, output and (unless device-resident)
    /// caches are in host memory: stages them into engine memory, decodes,
    /// copies the results back.
    pub fn decode_host(&self, d: &HostDecode<'_>, out: &mut DecodeOutput<'_>) -> Result<()> {
        // One host-memory call at a time owns the staging area, from the
        // copies in to the copies back.
        let _host_call = self.host_calls.lock();
        let mut sg = Staging {
            pieces: Vec::new(),
            bytes: 0,
        };
        let q = sg.put(d.q);
        let sink = d.sink.map(|s| sg.put(as_bytes(s)));
        enum Staged {
            Dense(At, usize, usize, usize),
            Sparse(StagedIndexed, Option<StagedIndexed>),
        }
        let (layout, num_blocks, staged) = match &d.keys {
            HostKeys::Dense {
                layout,
                kv,
                num_blocks,
                table,
                stride,
                seqlens,
            } => {
                let kv = stage_cache(&mut sg, *kv);
                let bt = sg.put(as_bytes(table));
                let sl = sg.put(as_bytes(seqlens));
                (*layout, *num_blocks, Staged::Dense(kv, bt, *stride, sl))
            }
            HostKeys::Sparse { main, extra } => {
                let m = stage_indexed(&mut sg, main);
                let x = extra.as_ref().map(|x| stage_indexed(&mut sg, x));
                (main.layout, main.num_blocks, Staged::Sparse(m, x))
            }
        };
        let out_off = sg.reserve(out.out.len());
        let lse_off = out
            .lse
            .as_ref()
            .map(|l| sg.reserve(std::mem::size_of_val(&**l)));

        self.make_current()?;
        let base = {
            let mut st = self.state.lock();
            let base = self.ensure(&mut st, Which::Staging, sg.bytes)?;
            for (off, data) in &sg.pieces {
                if !data.is_empty() {
                    // SAFETY: the staging area holds `sg.bytes`. On our stream, so
                    // the kernels (same stream) see the data; a copy from
                    // pageable memory is staged before the call returns.
                    unsafe { result::memcpy_htod_async(base + *off as u64, data, st.stream) }
                        .map_err(dev_err("cuMemcpyHtoDAsync"))?;
                }
            }
            base
        };
        let at = |off: usize| base + off as u64;
        let (kv, keys_dev) = match staged {
            Staged::Dense(kv, bt, stride, sl) => (
                kv.addr(base),
                KeysDev::Dense(super::args::DenseDev {
                    block_table: at(bt),
                    stride,
                    seqlens: at(sl),
                }),
            ),
            Staged::Sparse(main, extra) => {
                let dev = |s: &StagedIndexed| super::args::IndexedDev {
                    layout: s.layout,
                    kv: s.kv.addr(base),
                    num_blocks: s.num_blocks,
                    indices: at(s.indices),
                    topk: s.topk,
                    topk_length: s.topk_length.map_or(0, at),
                };
                (
                    main.kv.addr(base),
                    KeysDev::Sparse {
                        main: dev(&main),
                        extra: extra.as_ref().map(dev),
                    },
                )
            }
        };
        let args = DeviceDecode {
            shape: d.shape,
            q_dtype: d.q_dtype,
            out_dtype: out.dtype,
            layout,
            q: at(q),
            kv,
            num_blocks,
            keys: keys_dev,
            sink: sink.map_or(0, at),
            out: at(out_off),
            lse: lse_off.map_or(0, at),
            stream: 0,
        };
        self.decode_device(&args)?;
        // SAFETY: the decode finished (stream 0 waits); sizes match the reservations.
        unsafe { result::memcpy_dtoh_sync(&mut *out.out, at(out_off)) }
            .map_err(dev_err("cuMemcpyDtoH"))?;
        if let (Some(l), Some(off)) = (out.lse.as_deref_mut(), lse_off) {
            // SAFETY: as above.
            unsafe { result::memcpy_dtoh_sync(l, at(off)) }.map_err(dev_err("cuMemcpyDtoH"))?;
        }
        Ok(())
    }
}

fn host_indexed<'a>(k: &crate::decode::IndexedKeys<'a>) -> HostIndexed<'a> {
    HostIndexed {
        layout: k.kv.layout,
        kv: CacheRef::Host(k.kv.data),
        num_blocks: k.kv.num_blocks,
        indices: k.indices,
        topk: k.topk,
        topk_length: k.topk_length,
    }
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
                kv: CacheRef::Host(k.kv.data),
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
                q: d.q,
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

    /// The KV pool keeps its layers in device memory through
    /// `CudaBackend::mem_alloc`; this host allocation is not used for it.
    fn alloc(&self, what: &str, bytes: usize) -> Result<Buffer> {
        Buffer::host_zeroed(what, bytes)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::args::{DenseDev, IndexedDev};
    use crate::decode::DecodeShape;
    use crate::format::KvLayout;

    fn dense(shape: DecodeShape) -> DeviceDecode {
        DeviceDecode {
            shape,
            q_dtype: Dtype::F16,
            out_dtype: Dtype::F32,
            layout: KvLayout::new(KvFormat::Fp8V32, 576, 100, "f").unwrap(),
            q: 0x1000,
            kv: 0x2000,
            num_blocks: 77,
            keys: KeysDev::Dense(DenseDev {
                block_table: 0x3000,
                stride: 9,
                seqlens: 0x4000,
            }),
            sink: 0x5000,
            out: 0x6000,
            lse: 0,
            stream: 0,
        }
    }

    #[test]
    fn dense_arguments_are_lowered_field_by_field() {
        let shape = DecodeShape::new(3, 2, 20, 576, 512, 0.0, true).unwrap();
        let a = dense(shape);
        let geo = Geometry::new(&shape, false, 16, 100).unwrap();
        let p = base_params(&a, &geo).unwrap();
        assert_eq!((p.batch, p.s_q, p.h_q, p.d_qk, p.d_v), (3, 2, 20, 576, 512));
        assert_eq!((p.sparse, p.causal), (0, 1));
        assert_eq!((p.rows_per_group, p.num_groups), (40, 3));
        assert!((p.scale_log2 - std::f32::consts::LOG2_E / 24.0).abs() < 1e-6);
        assert_eq!((p.q_dtype, p.out_dtype, p.kv_format), (2, 0, 3));
        assert_eq!((p.num_blocks, p.block_size, p.bt_stride), (77, 100, 9));
        assert_eq!(p.block_bytes, 65600);
        assert_eq!(
            (p.parts, p.max_items),
            (geo.parts as i32, geo.max_items as i32)
        );
        assert_eq!(
            (p.q, p.kv, p.block_table, p.seqlens),
            (0x1000, 0x2000, 0x3000, 0x4000)
        );
        assert_eq!(
            (p.sink, p.out, p.lse, p.indices, p.extra_kv),
            (0x5000, 0x6000, 0, 0, 0)
        );
    }

    #[test]
    fn sparse_arguments_take_the_caches_of_their_index_lists() {
        let shape = DecodeShape::new(2, 2, 128, 512, 512, 0.5, false).unwrap();
        let l64 = KvLayout::new(KvFormat::Fp8Model1, 512, 64, "f").unwrap();
        let l3 = KvLayout::new(KvFormat::Fp8Model1, 512, 3, "f").unwrap();
        let mut a = dense(shape);
        a.layout = l64;
        a.keys = KeysDev::Sparse {
            main: IndexedDev {
                layout: l64,
                kv: 0xa000,
                num_blocks: 5,
                indices: 0xb000,
                topk: 2048,
                topk_length: 0,
            },
            extra: Some(IndexedDev {
                layout: l3,
                kv: 0xc000,
                num_blocks: 6,
                indices: 0xd000,
                topk: 64,
                topk_length: 0xe000,
            }),
        };
        let geo = Geometry::new(&shape, true, 64, 264).unwrap();
        let p = base_params(&a, &geo).unwrap();
        assert_eq!((p.sparse, p.rows_per_group, p.num_groups), (1, 128, 4));
        assert!((p.scale_log2 - 0.5 * std::f32::consts::LOG2_E).abs() < 1e-6);
        assert_eq!((p.kv, p.num_blocks, p.block_size), (0xa000, 5, 64));
        assert_eq!(p.block_bytes, l64.block_bytes as i64);
        assert_eq!((p.indices, p.topk, p.topk_length), (0xb000, 2048, 0));
        assert_eq!(
            (p.extra_kv, p.extra_num_blocks, p.extra_block_size),
            (0xc000, 6, 3)
        );
        assert_eq!(p.extra_block_bytes, 2304); // 3 x 584 rounded up to 4 x 576
        assert_eq!(
            (p.extra_indices, p.extra_topk, p.extra_topk_length),
            (0xd000, 64, 0xe000)
        );
        assert_eq!((p.block_table, p.seqlens), (0, 0));
    }

    #[test]
    fn misaligned_device_pointers_are_named() {
        let shape = DecodeShape::new(1, 1, 16, 576, 512, 0.0, false).unwrap();
        let mut a = dense(shape);
        assert!(check_alignment(&a).is_ok());
        a.kv += 8;
        let e = check_alignment(&a).unwrap_err();
        assert!(
            e.message.contains("kv = 0x2008") && e.message.contains("16-byte"),
            "{}",
            e.message
        );
        let mut a = dense(shape);
        a.q += 1;
        assert!(check_alignment(&a)
            .unwrap_err()
            .message
            .contains("q = 0x1001"));
        let mut a = dense(shape);
        a.out += 2;
        assert!(check_alignment(&a).unwrap_err().message.contains("out"));
    }
}
