//! Building blocks of a layer forward that stays on the GPU
//! (`model::resident`): products and elementwise row steps
//! (`kernels/mla_rows.cuh`) over device memory, enqueued on the engine's
//! stream in order, and a grow-only device arena for the activations. Only
//! `CudaBackend::download` waits.

use super::device::CudaBackend;
use super::driver::{dev_err, guarded};
use super::launch::{INDEX_ROWS_THREADS, ROWS_THREADS};
use super::linear::LinearCall;
use super::params::{IndexRowsParams, RowsParams};
use super::projection::DeviceWeight;
use crate::error::Result;
use cudarc::driver::{result, sys};
use std::ffi::c_void;

/// Device memory that grows to the largest request and is reused; give it
/// back with [`CudaBackend::free_arena`].
#[derive(Debug, Default)]
pub struct Arena {
    ptr: u64,
    bytes: usize,
}

impl CudaBackend {
    /// The arena's base address, grown to `bytes` first if needed (after
    /// the engine's stream is done with the old memory).
    pub fn arena(&self, a: &mut Arena, bytes: usize) -> Result<u64> {
        if a.ptr != 0 && a.bytes >= bytes {
            return Ok(a.ptr);
        }
        self.sync()?;
        self.free_arena(a);
        let want = bytes.max(1 << 20).next_power_of_two();
        a.ptr = self.mem_alloc(want)?;
        a.bytes = want;
        Ok(a.ptr)
    }

    /// Frees an arena's memory once the engine's stream is done with it.
    pub fn free_arena(&self, a: &mut Arena) {
        if a.ptr != 0 {
            let _ = self.sync();
            let _ = self.mem_free(a.ptr);
        }
        *a = Arena::default();
    }

    fn stream(&self) -> Result<sys::CUstream> {
        self.make_current()?;
        Ok(self.state.lock().stream)
    }

    /// Enqueues a host-to-device copy on the engine's stream.
    pub(crate) fn upload_async(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let stream = self.stream()?;
        guarded("cuMemcpyHtoDAsync", || {
            // SAFETY: `dst` is engine memory of at least `src.len()` bytes
            // (the caller's arena layout); a copy from pageable memory is
            // staged before the call returns.
            unsafe { result::memcpy_htod_async(dst, src, stream) }
                .map_err(dev_err("cuMemcpyHtoDAsync"))
        })
    }

    /// Copies `dst.len()` bytes from device memory at `src` after the work
    /// enqueued on the engine's stream, and waits for it (one wait).
    pub(crate) fn download(&self, dst: &mut [u8], src: u64) -> Result<()> {
        let stream = self.stream()?;
        guarded("cuMemcpyDtoHAsync", || {
            // SAFETY: our stream; `src` is engine memory of `dst.len()` bytes;
            // `dst` is written when the stream has been synchronized.
            unsafe {
                result::memcpy_dtoh_async(dst, src, stream)
                    .map_err(dev_err("cuMemcpyDtoHAsync"))?;
                result::stream::synchronize(stream).map_err(dev_err("cuStreamSynchronize"))
            }
        })
    }

    /// Makes the engine's stream wait for the work enqueued so far on the
    /// caller's CUstream `caller` (0: none). A stream being captured into
    /// a CUDA graph is refused: a layer forward or a pool decode stages host
    /// data.
    pub fn join_from(&self, caller: u64) -> Result<()> {
        if caller == 0 {
            return Ok(());
        }
        let stream = self.stream()?;
        let caller = caller as sys::CUstream;
        // SAFETY: a caller stream is a live CUstream (C contract).
        let capturing = guarded("cuStreamIsCapturing", || {
            unsafe { result::stream::is_capturing(caller) }.map_err(dev_err("cuStreamIsCapturing"))
        })? != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        if capturing {
            return Err(crate::error::Error::invalid(
                "stream is being captured into a CUDA graph: this call copies host data (block tables, indices, RoPE tables) and cannot be captured",
            ));
        }
        Self::wait_between(caller, stream)
    }

    /// Makes the caller's CUstream `caller` wait for the work enqueued so
    /// far on the engine's stream; `caller` 0: waits for it here.
    pub fn join_to(&self, caller: u64) -> Result<()> {
        if caller == 0 {
            return self.sync();
        }
        let stream = self.stream()?;
        Self::wait_between(stream, caller as sys::CUstream)
    }

    /// `to` waits (on the device) for the work enqueued so far on `from`.
    fn wait_between(from: sys::CUstream, to: sys::CUstream) -> Result<()> {
        guarded("cuStreamWaitEvent", || {
            let ev = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(dev_err("cuEventCreate"))?;
            // SAFETY: our new event; both streams are live (ours, or the
            // caller's by the C contract). Destroying an event that a wait
            // is enqueued on is allowed: the driver releases it afterwards.
            let r = unsafe {
                result::event::record(ev, from).and_then(|_| {
                    result::stream::wait_event(
                        to,
                        ev,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                })
            }
            .map_err(dev_err("cuStreamWaitEvent"));
            // SAFETY: as above.
            let _ = unsafe { result::event::destroy(ev) };
            r
        })
    }

    /// Launches kernel `f` (named `name` in errors) on `stream` with its
    /// one parameter block `p`, `threads` a block, `grid` blocks.
    ///
    /// # Safety
    /// `f` takes a `P`; every address in `p` is engine memory as large as
    /// the kernel reads or writes for `p`; `stream` is the engine's.
    pub(super) unsafe fn launch_one<P>(
        &self,
        f: sys::CUfunction,
        name: &'static str,
        grid: (u32, u32),
        threads: u32,
        p: &P,
        stream: sys::CUstream,
    ) -> Result<()> {
        let mut args = [p as *const P as *mut c_void];
        guarded(name, || {
            // SAFETY: forwarded contract; `p` is copied at launch.
            unsafe {
                self.launch(
                    name,
                    f,
                    (grid.0, grid.1, 1),
                    (threads, 1, 1),
                    0,
                    stream,
                    &mut args,
                )
            }
        })
    }

    /// Enqueues `mla_rows` over `p.rows` rows.
    ///
    /// # Safety
    /// Every address in `p` is engine memory as large as `p` says.
    pub unsafe fn enqueue_rows(&self, p: &RowsParams) -> Result<()> {
        if p.rows <= 0 {
            return Ok(());
        }
        let stream = self.stream()?;
        // Blocks loop over rows past the grid; 64K blocks fill any GPU.
        let grid = (p.rows as u32).min(65535);
        // SAFETY: forwarded contract; `mla_rows` takes a RowsParams.
        unsafe { self.launch_one(self.rows, "mla_rows", (grid, 1), ROWS_THREADS, p, stream) }
    }

    /// Enqueues `mla_index_rows` over `p.rows` rows (one block each).
    ///
    /// # Safety
    /// Every address in `p` is engine memory as large as `p` says.
    pub unsafe fn enqueue_index_rows(&self, p: &IndexRowsParams) -> Result<()> {
        if p.rows <= 0 {
            return Ok(());
        }
        let stream = self.stream()?;
        let grid = (p.rows as u32).min(65535);
        let (f, threads) = (self.index_rows, INDEX_ROWS_THREADS);
        // SAFETY: forwarded contract; `mla_index_rows` takes an IndexRowsParams.
        unsafe { self.launch_one(f, "mla_index_rows", (grid, 1), threads, p, stream) }
    }

    /// f32 elements of the partial sums a product needs.
    pub fn linear_partial_len(&self, w: &DeviceWeight, call: &LinearCall) -> Result<usize> {
        Ok(super::linear::plan(&w.shape, call, self.props().sm_count as usize)?.partial_len)
    }

    /// Enqueues `y [tokens, groups, n_out] = x · Wᵀ` on device buffers:
    /// `x_hi` (and `x_lo`, 0 for none) `[tokens, groups, k]` bf16, and
    /// `partial` of [`Self::linear_partial_len`] f32.
    ///
    /// # Safety
    /// The buffers are engine memory of those sizes.
    pub unsafe fn enqueue_linear_device(
        &self,
        w: &DeviceWeight,
        call: &LinearCall,
        x_hi: u64,
        x_lo: u64,
        y: u64,
        partial: u64,
    ) -> Result<()> {
        let (l, p) = self.bound_linear(w, call, x_hi, x_lo, y, partial)?;
        let stream = self.stream()?;
        guarded("GPU projection", || {
            // SAFETY: forwarded contract; the plan reads only the weight's rows.
            unsafe { self.enqueue_linear(&l, &p, stream) }
        })
    }
}
