//! Measures the machine's ceilings in the same run as the kernels, so every
//! figure can be stated as a fraction of what the hardware can do: the FP32
//! FMA peak (the ceiling of an f32-accumulating kernel) and the DRAM read
//! bandwidth (the ceiling of a memory-bound decode). Same method as
//! `shared/tools/peak.c` and `stream.c`.

use std::time::Instant;

/// The unit a kernel variant runs Q·Kᵀ on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkUnit {
    Fma,
    Bf16Dp,
    Amx,
}

#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    /// FP32 FMA peak over all threads, FLOP/s (0 if no SIMD FMA).
    pub fma_flops: f64,
    /// Which instruction measured `fma_flops`.
    pub fma_isa: &'static str,
    /// DRAM read bandwidth over all threads, bytes/s.
    pub read_bw: f64,
    /// AVX512-BF16 `vdpbf16ps` peak over all threads, FLOP/s (0 if absent).
    pub bf16_flops: f64,
    /// AMX-BF16 `tdpbf16ps` peak over all threads, FLOP/s (0 if absent).
    pub amx_flops: f64,
    /// The compute ceiling of the kernel being measured and its name: the
    /// FP32 FMA peak, or the blend of the peaks of the units its two GEMMs
    /// run on (Q·Kᵀ is d_qk of every d_qk + d_v FLOPs, P·V the rest).
    pub compute_flops: f64,
    pub compute_name: &'static str,
}

impl Ceilings {
    fn peak(&self, unit: QkUnit) -> f64 {
        match unit {
            QkUnit::Fma => self.fma_flops,
            QkUnit::Bf16Dp => self.bf16_flops,
            QkUnit::Amx => self.amx_flops,
        }
    }

    /// Sets the compute ceiling for a kernel variant whose Q·Kᵀ runs on
    /// `qk` and P·V on `pv`, and a head geometry.
    pub fn for_kernel(mut self, qk: QkUnit, pv: QkUnit, d_qk: usize, d_v: usize) -> Self {
        let (pq, pp) = (self.peak(qk), self.peak(pv));
        if pq > 0.0 && pp > 0.0 && (qk, pv) != (QkUnit::Fma, QkUnit::Fma) {
            let t = d_qk as f64 / pq + d_v as f64 / pp;
            self.compute_flops = (d_qk + d_v) as f64 / t;
            self.compute_name = match (qk, pv) {
                (QkUnit::Bf16Dp, QkUnit::Bf16Dp) => "bf16dp",
                (QkUnit::Bf16Dp, _) => "bf16dp+fma",
                (QkUnit::Amx, QkUnit::Amx) => "amx",
                (QkUnit::Amx, QkUnit::Bf16Dp) => "amx+bf16dp",
                _ => "amx+fma",
            };
        } else {
            self.compute_flops = self.fma_flops;
            self.compute_name = "fp32 fma";
        }
        self
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    const CHAINS: usize = 12;

    /// FLOPs done by one call: iters x chains x lanes x 2.
    pub fn flops_512(iters: usize) -> f64 {
        (iters * CHAINS * 16 * 2) as f64
    }

    pub fn flops_256(iters: usize) -> f64 {
        (iters * CHAINS * 8 * 2) as f64
    }

    /// Independent FMA chains, enough to cover latency x ports.
    #[target_feature(enable = "avx512f")]
    pub fn fma_512(iters: usize) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    /// FLOPs of one `dp_512` call: each `vdpbf16ps` does 16 lanes x 2 products x 2.
    pub fn flops_dp(iters: usize) -> f64 {
        (iters * CHAINS * 16 * 2 * 2) as f64
    }

    /// Independent `vdpbf16ps` chains.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub fn dp_512(iters: usize) -> f32 {
        let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80)) };
        let b: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3c23_3c23)) };
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn fma_256(iters: usize) -> f32 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut out = [0f32; 8];
        let mut s = 0.0;
        for x in acc {
            // SAFETY: out has room for 8 f32.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), x) };
            s += out.iter().sum::<f32>();
        }
        s
    }

    /// Sums a buffer with wide loads (a pure read stream).
    #[target_feature(enable = "avx2")]
    pub fn read_256(data: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let chunks = data.chunks_exact(32);
        for c in chunks {
            for (k, x) in acc.iter_mut().enumerate() {
                // SAFETY: c has 32 elements, so 8 at offset 8k are in bounds.
                *x = _mm256_add_ps(*x, unsafe { _mm256_loadu_ps(c.as_ptr().add(8 * k)) });
            }
        }
        let mut out = [0f32; 8];
        let mut s = 0.0;
        for x in acc {
            // SAFETY: out has room for 8 f32.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), x) };
            s += out.iter().sum::<f32>();
        }
        s
    }
}

/// Runs `f(thread)` on `threads` threads at once, thread t pinned to the
/// t-th CPU the process may use (as `shared/tools/peak.c` pins; unpinned,
/// two threads could share one CPU); returns the slowest time.
fn timed_parallel(threads: usize, f: impl Fn(usize) -> f32 + Sync) -> f64 {
    use mlart::backend::cpu::affinity;
    let barrier = std::sync::Barrier::new(threads);
    let cpus = affinity::process_mask().unwrap_or_default();
    let times: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (f, barrier, cpus) = (&f, &barrier, &cpus);
                s.spawn(move || {
                    if !cpus.is_empty() {
                        // Unpinned is still a reading: a failure is ignored.
                        let _ = affinity::set_thread_cpus(&[cpus[t % cpus.len()]]);
                    }
                    barrier.wait();
                    let t0 = Instant::now();
                    std::hint::black_box(f(t));
                    t0.elapsed().as_secs_f64()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(f64::INFINITY))
            .collect()
    });
    times.into_iter().fold(0.0, f64::max)
}

/// Median DRAM read bandwidth (bytes/s) of `reps` sums over 512 MiB.
pub fn read_bandwidth(threads: usize, reps: usize) -> f64 {
    // 512 MiB: far beyond any last-level cache.
    let n = (512usize << 20) / 4;
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let per = n / threads;
    let read = |t: usize| -> f32 {
        let part = &data[t * per..(t + 1) * per];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: avx2 was detected.
            return unsafe { simd::read_256(part) };
        }
        part.iter().sum()
    };
    let runs = (0..reps)
        .map(|_| (per * threads * 4) as f64 / timed_parallel(threads, read))
        .collect();
    median(runs)
}

#[cfg(target_arch = "x86_64")]
fn amx_usable() -> bool {
    use mlart::backend::cpu::isa::{amx_permitted, CpuFeatures, CpuIsa};
    CpuFeatures::detect().supports(CpuIsa::Amx) && amx_permitted()
}

/// FLOPs of one [`amx_run`].
#[cfg(target_arch = "x86_64")]
fn amx_flops(iters: usize) -> f64 {
    (iters * 4 * 16 * 16 * 32 * 2) as f64
}

/// `iters` x four `tdpbf16ps` on this thread. Callers check
/// [`amx_usable`] first.
#[cfg(target_arch = "x86_64")]
fn amx_run(iters: usize) -> f32 {
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    for t in 0..8 {
        cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
        cfg[48 + t] = 16;
    }
    let tile = [0x3c23_3c23u32; 256];
    let mut c = [0f32; 256];
    // SAFETY: AMX is present and permitted (checked by the caller); the
    // configuration is valid, every tile load reads 16 rows of 64 bytes
    // from `tile` (1 KiB) and the store writes 1 KiB into `c`.
    unsafe {
        std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack, readonly));
        std::arch::asm!(
            "tileloadd tmm4, [{p} + {s}]", "tileloadd tmm5, [{p} + {s}]",
            "tileloadd tmm6, [{p} + {s}]", "tileloadd tmm7, [{p} + {s}]",
            "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
            p = in(reg) tile.as_ptr(), s = in(reg) 64usize, options(nostack, readonly),
        );
        for _ in 0..iters {
            std::arch::asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                options(nostack, nomem),
            );
        }
        std::arch::asm!("tilestored [{p} + {s}], tmm0", p = in(reg) c.as_mut_ptr(), s = in(reg) 64usize, options(nostack));
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }
    c[0]
}

/// One reading of the peak of `unit` over `threads`, FLOP/s (0 where the
/// unit is absent): its register-only loop, run `iters / div` times. FMA
/// is `vfmadd231ps` on zmm (ymm without AVX-512), `Bf16Dp` `vdpbf16ps`,
/// `Amx` `tdpbf16ps` on four accumulator tiles (as `shared/tools/peak.c`).
fn reading(threads: usize, unit: QkUnit, div: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    match unit {
        QkUnit::Amx if amx_usable() => {
            let iters = 2_000_000 / div;
            amx_flops(iters) * threads as f64 / timed_parallel(threads, |_| amx_run(iters))
        }
        QkUnit::Bf16Dp
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bf16") =>
        {
            let iters = 10_000_000 / div;
            // SAFETY: avx512f and avx512bf16 were detected above.
            let t = timed_parallel(threads, |_| unsafe { simd::dp_512(iters) });
            simd::flops_dp(iters) * threads as f64 / t
        }
        QkUnit::Fma if std::is_x86_feature_detected!("avx512f") => {
            let iters = 20_000_000 / div;
            // SAFETY: avx512f was detected above.
            let t = timed_parallel(threads, |_| unsafe { simd::fma_512(iters) });
            simd::flops_512(iters) * threads as f64 / t
        }
        QkUnit::Fma
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") =>
        {
            let iters = 20_000_000 / div;
            // SAFETY: avx2 and fma were detected above.
            let t = timed_parallel(threads, |_| unsafe { simd::fma_256(iters) });
            simd::flops_256(iters) * threads as f64 / t
        }
        _ => 0.0,
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, unit, div);
        0.0
    }
}

/// The median of `reps` full readings of `unit`'s peak.
fn peak(threads: usize, unit: QkUnit, reps: usize) -> f64 {
    median((0..reps).map(|_| reading(threads, unit, 1)).collect())
}

/// Which instruction measures the FMA peak.
fn fma_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        return "avx512 vfmadd231ps zmm";
    } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        return "avx2 vfmadd231ps ymm";
    }
    "none"
}

/// One short reading (about 10 ms, an eighth of a full one) of the peak
/// of `unit` over `threads`, FLOP/s (0 where the unit is absent): `mlart
/// bench` takes one before every timed run of a kernel on that unit, so
/// that each run is rated against the machine as it was then (on a shared
/// VM the peaks swing by 2x within seconds, see BENCHMARKS.md).
pub fn probe(threads: usize, unit: QkUnit) -> f64 {
    reading(threads, unit, 8)
}

/// The compute peaks a model's projections can run at: the FP32 FMA peak
/// and (0 if absent) the `vdpbf16ps` and AMX `tdpbf16ps` peaks, FLOP/s
/// over `threads`.
pub fn projection_peaks(threads: usize) -> (f64, f64, f64) {
    (
        peak(threads, QkUnit::Fma, 5),
        peak(threads, QkUnit::Bf16Dp, 5),
        peak(threads, QkUnit::Amx, 5),
    )
}

pub fn measure(threads: usize) -> Ceilings {
    let (fma_flops, fma_isa) = (peak(threads, QkUnit::Fma, 5), fma_isa());
    let bf16_flops = peak(threads, QkUnit::Bf16Dp, 5);
    let amx_flops = peak(threads, QkUnit::Amx, 5);
    let read_bw = read_bandwidth(threads, 7);
    Ceilings {
        bf16_flops,
        amx_flops,
        compute_flops: fma_flops,
        compute_name: "fp32 fma",
        fma_flops,
        fma_isa,
        read_bw,
    }
}
