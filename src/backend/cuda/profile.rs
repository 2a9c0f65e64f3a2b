//! Where a GPU step's time goes, per kernel: while a profile is open, every
//! kernel the backend launches (on a stream that is not being captured into
//! a graph) is bracketed by two timing events, and closing the profile sums
//! the elapsed times per kernel name. `mlart bench --model` and `bench
//! --cuda` print the breakdown; off (the default), a launch costs one
//! relaxed atomic load more.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::{result, sys};
use parking_lot::Mutex;

use super::device::CudaBackend;
use super::driver::{dev_err, guarded};
use crate::error::Result;

/// One kernel's share of a closed profile.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub name: &'static str,
    pub launches: u64,
    /// GPU time between each launch's two events, summed.
    pub seconds: f64,
}

/// The open profile's launches: (kernel, start event, end event).
#[derive(Default)]
pub(super) struct Profile {
    on: AtomicBool,
    spans: Mutex<Vec<(&'static str, sys::CUevent, sys::CUevent)>>,
}

impl Profile {
    /// Destroys the events of `spans` (after their work, or unused).
    fn destroy(spans: Vec<(&'static str, sys::CUevent, sys::CUevent)>) {
        for (_, a, b) in spans {
            // SAFETY: events this profile created; no longer used.
            unsafe {
                let _ = result::event::destroy(a);
                let _ = result::event::destroy(b);
            }
        }
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = guarded("profile teardown", || {
            Self::destroy(std::mem::take(self.spans.get_mut()));
            Ok(())
        });
    }
}

impl CudaBackend {
    /// Launches kernel `f` (`name` in errors and profiles) on `stream` with
    /// `args`; while a profile is open, between two timing events.
    ///
    /// # Safety
    /// As `cuLaunchKernel`: `f` is this backend's, `args` are its
    /// parameters (read at launch), `stream` is live, the context current.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn launch(
        &self,
        name: &'static str,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        stream: sys::CUstream,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let start = if self.profile.on.load(Ordering::Relaxed) {
            self.span_start(stream)?
        } else {
            None
        };
        // SAFETY: forwarded contract.
        let launched = unsafe { result::launch_kernel(f, grid, block, smem, stream, args) }
            .map_err(|e| dev_err(&format!("launch {name}"))(e));
        if let Some(start) = start {
            match (&launched, self.span_event(stream)) {
                (Ok(()), Ok(end)) => self.profile.spans.lock().push((name, start, end)),
                (_, end) => {
                    // SAFETY: events of this launch, no longer used.
                    unsafe {
                        let _ = result::event::destroy(start);
                        if let Ok(end) = end {
                            let _ = result::event::destroy(end);
                        }
                    }
                }
            }
        }
        launched
    }

    /// A recorded start event, or None on a stream being captured (a graph
    /// has its own timing).
    fn span_start(&self, stream: sys::CUstream) -> Result<Option<sys::CUevent>> {
        // SAFETY: a live stream (the caller's contract).
        let status = unsafe { result::stream::is_capturing(stream) }
            .map_err(dev_err("cuStreamIsCapturing"))?;
        if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Ok(None);
        }
        self.span_event(stream).map(Some)
    }

    /// A new timing event, recorded on `stream`.
    fn span_event(&self, stream: sys::CUstream) -> Result<sys::CUevent> {
        let ev = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(dev_err("cuEventCreate"))?;
        // SAFETY: our new event; a live stream.
        if let Err(e) = unsafe { result::event::record(ev, stream) } {
            // SAFETY: unused.
            let _ = unsafe { result::event::destroy(ev) };
            return Err(dev_err("cuEventRecord")(e));
        }
        Ok(ev)
    }

    /// Opens a profile: from now on every launch is timed (a profile still
    /// open is dropped).
    pub fn profile_start(&self) -> Result<()> {
        guarded("profile", || {
            self.make_current()?;
            Profile::destroy(std::mem::take(&mut *self.profile.spans.lock()));
            self.profile.on.store(true, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Closes the profile after its launches have run (waits for them):
    /// per kernel, in the order each first ran, its launches and GPU time.
    pub fn profile_stop(&self) -> Result<Vec<KernelTime>> {
        guarded("profile", || {
            self.make_current()?;
            self.profile.on.store(false, Ordering::Relaxed);
            let spans = std::mem::take(&mut *self.profile.spans.lock());
            let times = (|| {
                let mut times: Vec<KernelTime> = Vec::new();
                for &(name, a, b) in &spans {
                    // SAFETY: recorded events of this profile.
                    let ms = unsafe {
                        result::event::synchronize(b).map_err(dev_err("cuEventSynchronize"))?;
                        result::event::elapsed(a, b).map_err(dev_err("cuEventElapsedTime"))?
                    };
                    match times.iter_mut().find(|t| t.name == name) {
                        Some(t) => {
                            t.launches += 1;
                            t.seconds += ms as f64 * 1e-3;
                        }
                        None => times.push(KernelTime {
                            name,
                            launches: 1,
                            seconds: ms as f64 * 1e-3,
                        }),
                    }
                }
                Ok(times)
            })();
            Profile::destroy(spans);
            times
        })
    }
}
