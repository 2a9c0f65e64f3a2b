//! The model's projections on the device: weights uploaded once, products
//! launched with host activations staged in and results copied back (see
//! `linear` for the kernels' layout and the plan).

use super::device::{CudaBackend, Which};
use super::driver::{dev_err, guarded};
use super::linear::{self, LinearCall, WeightImage, WeightShape, LINEAR_THREADS, REDUCE_THREADS};
use super::lowering::as_bytes;
use super::params::LinearParams;
use super::staging::Carve;
use crate::error::{Error, Result};
use cudarc::driver::{result, sys};
use std::ffi::c_void;

/// A weight in device memory; give it back with [`CudaBackend::free_weight`].
#[derive(Debug)]
pub struct DeviceWeight {
    pub shape: WeightShape,
    ptr: u64,
    /// FP8 scales, else 0.
    scales: u64,
    bytes: usize,
}

impl DeviceWeight {
    /// Bytes of device memory it holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// One product's launch and its buffers: x_hi, x_lo, y and the partial
/// sums, one after another from a base address.
pub(super) struct Launch {
    plan: linear::LinearPlan,
    kernel: sys::CUfunction,
    at: [usize; 4],
    bytes: usize,
}

impl CudaBackend {
    fn prepare(&self, w: &DeviceWeight, call: &LinearCall, lo_len: usize) -> Result<Launch> {
        let plan = linear::plan(&w.shape, call, self.props().sm_count as usize)?;
        let n_x = call.tokens * call.groups * w.shape.k;
        let n_y = call.tokens * call.groups * call.n_out;
        let mut cv = Carve::default();
        let at = [2 * n_x, 2 * lo_len, 4 * n_y, 4 * plan.partial_len].map(|n| cv.take(n));
        let bytes = cv.bytes();
        let kernel = self.linear_function(plan.kernel)?;
        Ok(Launch {
            plan,
            kernel,
            at,
            bytes,
        })
    }

    /// The kernels' parameters with the buffers at `base`.
    fn bind(l: &Launch, w: &DeviceWeight, base: u64, with_lo: bool) -> LinearParams {
        LinearParams {
            x_hi: base + l.at[0] as u64,
            x_lo: if with_lo { base + l.at[1] as u64 } else { 0 },
            y: base + l.at[2] as u64,
            partial: base + l.at[3] as u64,
            w: w.ptr,
            scales: w.scales,
            ..l.plan.params
        }
    }

    /// The launch of a product over device buffers the caller laid out.
    pub(super) fn bound_linear(
        &self,
        w: &DeviceWeight,
        call: &LinearCall,
        x_hi: u64,
        x_lo: u64,
        y: u64,
        partial: u64,
    ) -> Result<(Launch, LinearParams)> {
        let l = self.prepare(w, call, 0)?;
        let p = LinearParams {
            x_hi,
            x_lo,
            y,
            partial,
            w: w.ptr,
            scales: w.scales,
            ..l.plan.params
        };
        Ok((l, p))
    }

    /// Enqueues the product (and the sum of its partials).
    ///
    /// # Safety
    /// `stream` is live and `p`'s buffers are device memory as large as
    /// `l`'s plan reads and writes.
    pub(super) unsafe fn enqueue_linear(
        &self,
        l: &Launch,
        p: &LinearParams,
        stream: sys::CUstream,
    ) -> Result<()> {
        let mut args = [p as *const LinearParams as *mut c_void];
        // SAFETY: forwarded contract; `p` is copied at launch.
        unsafe {
            self.launch(
                l.plan.kernel,
                l.kernel,
                l.plan.grid,
                (LINEAR_THREADS, 1, 1),
                0,
                stream,
                &mut args,
            )?;
            if l.plan.reduce_blocks > 0 {
                self.launch(
                    "mla_linear_reduce",
                    self.linear_reduce,
                    (l.plan.reduce_blocks, 1, 1),
                    (REDUCE_THREADS, 1, 1),
                    0,
                    stream,
                    &mut args,
                )?;
            }
        }
        Ok(())
    }

    /// Copies a weight into device memory.
    pub fn upload_weight(&self, img: &WeightImage) -> Result<DeviceWeight> {
        let ptr = self.mem_alloc(img.bytes.len())?;
        let mut w = DeviceWeight {
            shape: img.shape,
            ptr,
            scales: 0,
            bytes: img.device_bytes(),
        };
        let r = (|| {
            self.mem_copy(ptr, img.bytes.as_ptr() as u64, img.bytes.len())?;
            if !img.scales.is_empty() {
                let sb = as_bytes(&img.scales);
                w.scales = self.mem_alloc(sb.len())?;
                self.mem_copy(w.scales, sb.as_ptr() as u64, sb.len())?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => Ok(w),
            Err(e) => {
                self.free_weight(&w);
                Err(e)
            }
        }
    }

    /// Frees a weight from [`Self::upload_weight`] (errors cannot be acted on).
    pub fn free_weight(&self, w: &DeviceWeight) {
        for p in [w.ptr, w.scales] {
            if p != 0 {
                let _ = self.mem_free(p);
            }
        }
    }

    /// `y [tokens, groups, n_out] = x · Wᵀ` per group (see [`LinearCall`]),
    /// `x` given as its bf16 parts `[tokens, groups, k]` (`x_lo` empty when
    /// the activations are rounded to bf16). Waits for the result.
    pub fn linear(
        &self,
        w: &DeviceWeight,
        call: &LinearCall,
        x_hi: &[u16],
        x_lo: &[u16],
        y: &mut [f32],
    ) -> Result<()> {
        let n_x = call.tokens * call.groups * w.shape.k;
        let n_y = call.tokens * call.groups * call.n_out;
        if x_hi.len() != n_x || !(x_lo.is_empty() || x_lo.len() == n_x) || y.len() != n_y {
            return Err(Error::internal(
                "GPU projection buffers are not [tokens, groups, k|n]",
            ));
        }
        let l = self.prepare(w, call, x_lo.len())?;
        let _host_call = self.host_calls.lock();
        self.make_current()?;
        let mut st = self.state.lock();
        let base = self.ensure(&mut st, Which::Staging, l.bytes)?;
        let p = Self::bind(&l, w, base, !x_lo.is_empty());
        let stream = st.stream;
        guarded("GPU projection", || {
            // SAFETY: the staging area holds `l.bytes` laid out as `l.at`;
            // the weight is ours and the plan reads only its rows (checked
            // by `plan`); copies and kernels are ordered on our stream; the
            // stream is synchronized before `y` is used.
            unsafe {
                result::memcpy_htod_async(p.x_hi, x_hi, stream)
                    .map_err(dev_err("cuMemcpyHtoDAsync"))?;
                if !x_lo.is_empty() {
                    result::memcpy_htod_async(p.x_lo, x_lo, stream)
                        .map_err(dev_err("cuMemcpyHtoDAsync"))?;
                }
                self.enqueue_linear(&l, &p, stream)?;
                result::memcpy_dtoh_async(y, p.y, stream).map_err(dev_err("cuMemcpyDtoHAsync"))?;
                result::stream::synchronize(stream).map_err(dev_err("GPU projection"))
            }
        })
    }

    /// Median seconds of one product on zeroed device-resident activations
    /// (no host copies), timed with events over `reps` launches: the
    /// kernels' own speed, for `mlart bench --cuda`.
    pub fn time_linear(
        &self,
        w: &DeviceWeight,
        call: &LinearCall,
        with_lo: bool,
        reps: usize,
    ) -> Result<f64> {
        let n_x = call.tokens * call.groups * w.shape.k;
        let l = self.prepare(w, call, n_x)?;
        let base = self.mem_alloc(l.bytes)?;
        let r = (|| {
            self.zero_async(base, l.bytes)?;
            self.sync()?;
            let p = Self::bind(&l, w, base, with_lo);
            self.time_on_stream(reps, |stream| {
                // SAFETY: every buffer is ours, allocated for this plan above.
                unsafe { self.enqueue_linear(&l, &p, stream) }
            })
        })();
        self.mem_free(base)?;
        r
    }
}
