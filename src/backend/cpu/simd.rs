//! AVX2+FMA and AVX-512F attention kernels (f32 FMA on dequantized tiles).
//!
//! Per tile of up to 64 keys, the query rows of a task are the M dimension
//! of two small GEMMs:
//! - `S = Q · Kᵀ`: K is gathered (and dequantized) once, transposed to
//!   `[d_qk][64]`, and a block of R query rows is multiplied against it with
//!   `R x KEYS/LANES` accumulators in registers (broadcast q, load Kᵀ row);
//! - online softmax on S (scalar exp, one per score);
//! - `O += P · V`: V is the first d_v columns of the row-major tile; a block
//!   of R rows x 4 vectors of O stays in registers over the 64 keys.
//!
//! The code is generic over a vector type and inlined into
//! `#[target_feature]` entry points, so each ISA gets its own instructions.

// Register blocks are indexed [row][vector] with run-time bounds (rows left,
// vectors per ISA); index loops state that layout more plainly than zips.
#![allow(clippy::needless_range_loop)]

use super::isa::CpuIsa;
use super::kernel::{finalize, AttentionKernel, AttnTask, Scratch, K_TILE};

/// Query rows per register block.
const R: usize = 6;

/// The few vector operations the kernel needs.
trait Vector: Copy {
    const LANES: usize;
    /// Vectors per register block along keys (scores) and along d_v
    /// (accumulate): `R x BLOCK` accumulators plus `BLOCK` loads must fit
    /// in the register file.
    const BLOCK: usize;
    /// # Safety
    /// `p` must point to `LANES` readable f32 and the ISA must be enabled.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// `p` must point to `LANES` writable f32 and the ISA must be enabled.
    unsafe fn store(self, p: *mut f32);
    /// # Safety
    /// The ISA must be enabled.
    unsafe fn splat(x: f32) -> Self;
    /// `self + a * b`.
    /// # Safety
    /// The ISA must be enabled.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Vector;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub struct V256(__m256);
    #[derive(Clone, Copy)]
    pub struct V512(__m512);

    impl Vector for V256 {
        const LANES: usize = 8;
        const BLOCK: usize = 2;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: caller contract.
            V256(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: caller contract.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: caller contract (AVX enabled).
            V256(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            // SAFETY: caller contract (FMA enabled).
            V256(unsafe { _mm256_fmadd_ps(a.0, b.0, self.0) })
        }
    }

    impl Vector for V512 {
        const LANES: usize = 16;
        const BLOCK: usize = 4;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: caller contract.
            V512(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: caller contract.
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: caller contract (AVX-512F enabled).
            V512(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            // SAFETY: caller contract (AVX-512F enabled).
            V512(unsafe { _mm512_fmadd_ps(a.0, b.0, self.0) })
        }
    }
}

fn fit(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// `s[r][0..64] = q[r] · kt[.][0..64]` for `rn <= R` rows.
///
/// # Safety
/// The ISA of `V` must be enabled; `q` holds `rn` rows of `d` at stride `d`,
/// `kt` holds `d * K_TILE`, `s` holds `rn * K_TILE`.
#[inline(always)]
unsafe fn scores<V: Vector>(q: &[f32], d: usize, rn: usize, kt: &[f32], s: &mut [f32]) {
    let nb = V::BLOCK;
    let width = nb * V::LANES;
    debug_assert!(nb <= 4 && K_TILE.is_multiple_of(width));
    debug_assert!(q.len() >= rn * d && kt.len() >= d * K_TILE && s.len() >= rn * K_TILE);
    // SAFETY: ISA enabled (caller); every pointer below stays inside the
    // slices whose lengths are checked above.
    unsafe {
        for kb in (0..K_TILE).step_by(width) {
            let mut acc = [[V::splat(0.0); 4]; R];
            for k in 0..d {
                let krow = kt.as_ptr().add(k * K_TILE + kb);
                let mut kv = [V::splat(0.0); 4];
                for (v, x) in kv.iter_mut().enumerate().take(nb) {
                    *x = V::load(krow.add(v * V::LANES));
                }
                for r in 0..rn {
                    let qv = V::splat(*q.get_unchecked(r * d + k));
                    for v in 0..nb {
                        acc[r][v] = acc[r][v].fma(qv, kv[v]);
                    }
                }
            }
            for r in 0..rn {
                for v in 0..nb {
                    acc[r][v].store(s.as_mut_ptr().add(r * K_TILE + kb + v * V::LANES));
                }
            }
        }
    }
}

/// `o[r][0..dv] += sum_j p[r][j] * vt[j][0..dv]` for `rn <= R` rows, where
/// row `j` of V starts at `vt[j * stride]`.
///
/// # Safety
/// The ISA of `V` must be enabled; `p` holds `rn * K_TILE`, `o` holds `rn`
/// rows of `dv` at stride `dv`, `vt` holds `n` rows at `stride >= dv`.
#[inline(always)]
unsafe fn accumulate<V: Vector>(
    p: &[f32],
    n: usize,
    vt: &[f32],
    stride: usize,
    o: &mut [f32],
    dv: usize,
    rn: usize,
) {
    let nb = V::BLOCK;
    let chunk = nb * V::LANES;
    debug_assert!(
        p.len() >= rn * K_TILE
            && o.len() >= rn * dv
            && (n == 0 || vt.len() >= (n - 1) * stride + dv)
    );
    let full = dv / chunk * chunk;
    // SAFETY: ISA enabled (caller); pointers stay inside the checked slices.
    unsafe {
        let mut c = 0;
        while c < full {
            let mut acc = [[V::splat(0.0); 4]; R];
            for r in 0..rn {
                for v in 0..nb {
                    acc[r][v] = V::load(o.as_ptr().add(r * dv + c + v * V::LANES));
                }
            }
            for j in 0..n {
                let vrow = vt.as_ptr().add(j * stride + c);
                let mut vv = [V::splat(0.0); 4];
                for (v, x) in vv.iter_mut().enumerate().take(nb) {
                    *x = V::load(vrow.add(v * V::LANES));
                }
                for r in 0..rn {
                    let pv = V::splat(*p.get_unchecked(r * K_TILE + j));
                    for v in 0..nb {
                        acc[r][v] = acc[r][v].fma(pv, vv[v]);
                    }
                }
            }
            for r in 0..rn {
                for v in 0..nb {
                    acc[r][v].store(o.as_mut_ptr().add(r * dv + c + v * V::LANES));
                }
            }
            c += chunk;
        }
    }
    // Columns past the last full chunk.
    for r in 0..rn {
        for j in 0..n {
            let pj = p[r * K_TILE + j];
            let v = &vt[j * stride..j * stride + dv];
            for x in full..dv {
                o[r * dv + x] += pj * v[x];
            }
        }
    }
}

/// The kernel body for one vector type.
///
/// # Safety
/// The ISA of `V` must be enabled.
#[inline(always)]
unsafe fn attend_with<V: Vector>(
    task: &AttnTask<'_>,
    scratch: &mut Scratch,
    o: &mut [f32],
    lse: &mut [f32],
) {
    let (d, dv, h_q) = (task.d_qk, task.d_v, task.h_q);
    let rows = task.n_q * h_q;
    let k_tile = fit(&mut scratch.k_tile, K_TILE * d);
    let kt = fit(&mut scratch.scores, K_TILE * d + R * K_TILE);
    let (kt, s) = kt.split_at_mut(K_TILE * d);
    let row_max = fit(&mut scratch.row_max, rows);
    let row_sum = fit(&mut scratch.row_sum, rows);
    row_max.fill(f32::NEG_INFINITY);
    row_sum.fill(0.0);
    o[..rows * dv].fill(0.0);

    let mut t0 = task.start;
    while t0 < task.end {
        let n = K_TILE.min(task.end - t0);
        for j in 0..n {
            task.gather(t0 + j, &mut k_tile[j * d..(j + 1) * d]);
        }
        // Transpose to [d][64]; missing keys are zero (masked below).
        for k in 0..d {
            let dst = &mut kt[k * K_TILE..(k + 1) * K_TILE];
            for (j, x) in dst.iter_mut().enumerate() {
                *x = if j < n { k_tile[j * d + k] } else { 0.0 };
            }
        }
        let mut r0 = 0;
        while r0 < rows {
            let rn = R.min(rows - r0);
            // SAFETY: ISA enabled (caller); slice sizes as required.
            unsafe { scores::<V>(&task.q[r0 * d..], d, rn, kt, s) };
            // Online softmax per row; keys past the visible prefix get p = 0.
            for r in 0..rn {
                let row = r0 + r;
                let vis = task.visible(row / h_q).saturating_sub(t0).min(n);
                let sr = &mut s[r * K_TILE..(r + 1) * K_TILE];
                let tile_max = sr[..vis].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let new_max = row_max[row].max(tile_max);
                if new_max == f32::NEG_INFINITY {
                    sr.fill(0.0);
                    continue;
                }
                let alpha = (row_max[row] - new_max).exp();
                let mut sum = 0.0;
                for (j, x) in sr.iter_mut().enumerate() {
                    *x = if j < vis { (*x - new_max).exp() } else { 0.0 };
                    sum += *x;
                }
                row_sum[row] = row_sum[row] * alpha + sum;
                row_max[row] = new_max;
                if alpha != 1.0 {
                    o[row * dv..(row + 1) * dv]
                        .iter_mut()
                        .for_each(|x| *x *= alpha);
                }
            }
            // SAFETY: ISA enabled (caller); slice sizes as required.
            unsafe { accumulate::<V>(s, n, k_tile, d, &mut o[r0 * dv..], dv, rn) };
            r0 += rn;
        }
        t0 += n;
    }
    finalize(o, lse, row_max, row_sum, dv);
}

/// AVX2 + FMA, 8 lanes.
pub struct Avx2Kernel;
/// AVX-512F, 16 lanes.
pub struct Avx512Kernel;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
    // SAFETY: this function only runs with AVX2 and FMA enabled.
    unsafe { attend_with::<x86::V256>(task, scratch, o, lse) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn attend_avx512(task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
    // SAFETY: this function only runs with AVX-512F enabled.
    unsafe { attend_with::<x86::V512>(task, scratch, o, lse) }
}

impl AttentionKernel for Avx2Kernel {
    fn isa(&self) -> CpuIsa {
        CpuIsa::Avx2
    }

    fn attend(&self, task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the engine selects this kernel only after detecting AVX2 and FMA.
        unsafe {
            attend_avx2(task, scratch, o, lse)
        }
        #[cfg(not(target_arch = "x86_64"))]
        super::kernel::ScalarKernel.attend(task, scratch, o, lse)
    }
}

impl AttentionKernel for Avx512Kernel {
    fn isa(&self) -> CpuIsa {
        CpuIsa::Avx512
    }

    fn attend(&self, task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the engine selects this kernel only after detecting AVX-512F.
        unsafe {
            attend_avx512(task, scratch, o, lse)
        }
        #[cfg(not(target_arch = "x86_64"))]
        super::kernel::ScalarKernel.attend(task, scratch, o, lse)
    }
}
