//! The AMX attention kernel: per tile of up to 256 keys both GEMMs run on
//! AMX tiles, and only the softmax and the packing of operands on AVX-512.
//!
//! - `Sᵀ = K · Qᵀ`: the keys' bf16 rows are the A tiles as the cache holds
//!   them (read in place, or converted once per tile), the queries are
//!   packed once per call as the B operand (`[d/2][rows]` pairs), and the C
//!   tiles land as `st [key][row]`, the layout of the vector softmax (rows
//!   in lanes). Nothing is transposed per key tile.
//! - online softmax in f32 (the scale applied on the way, the running max
//!   moved only when a tile tops it by [`RESCALE_SLACK`]), and P rounded
//!   to bf16 (as FlashMLA does; only with a bf16 output) straight into the
//!   A operand of P·V: pairs along the keys, 16 x 16 transposed, one tile
//!   after another (`pa`);
//! - `O += P · V`: V's rows interleaved in pairs (the B operand), O
//!   accumulated in C tiles over the tile's keys. P, V and O are kept tile
//!   by tile (each tile's 16 rows in one KiB), so a tile load reads 16
//!   consecutive lines and no two rows of an operand share an L1 set. For
//!   16 query rows or fewer, V's B tiles are the keys' rows as they are,
//!   against P in two A tiles that keep V's even and odd columns apart
//!   ([`PvForm::Split`]): twice the products and no pass over V, which
//!   costs more than those products when M is one tile.
//! - the next tile's keys are fetched a few lines per tile product
//!   ([`Trickle`]): a burst of prefetches stalls the tiles behind it, a
//!   trickle keeps the memory busy while they compute.
//!
//! Generic over [`Tiles`], so the tests run the whole kernel on the
//! software tile model.

use super::x86::V512;
use super::{fit, fit_lines, fit_u32_lines, q_pairs_t, softmax_row, transpose16, Vector};
use crate::backend::cpu::amx::{grid, mac_dyn, Acc, Operand, Scattered, Tiled, Tiles};
use crate::backend::cpu::kernel::{finalize_with, AttnTask, CallQueries, Scratch};
use crate::backend::cpu::phases::{Laps, Phase};
use crate::format::{prefetch, KvFormat};
use std::arch::x86_64::*;

/// Keys per tile: P·V loads and stores each O tile once per tile, 256
/// keys make that 8 K chunks (128 keys: 4, and 1-10% slower at h_q >= 64;
/// 512 keys: up to 12% slower than 128).
const KT: usize = 256;
/// How far (natural log) a tile's max may exceed a row's running max
/// before the row takes it and its O is rescaled ("lazy rescaling"): the
/// row's P stays below e^8 ≈ 3000, far inside f32 and bf16 range (bf16's
/// relative rounding does not depend on the scale), and O is rescaled only
/// when the max jumps, not whenever it creeps up: 2-4% faster at h_q = 128
/// (in-process A/B). (The f32 kernels rescale row by row: neutral there.)
const RESCALE_SLACK: f32 = 8.0;
/// Keys per A tile of `Sᵀ`.
const SUB: usize = 16;
/// u32 (or f32) in one tile: 16 rows of 64 bytes.
const TILE: usize = 256;
/// Query rows (padded to 16) up to which P·V takes V straight from the
/// keys ([`PvForm::Split`]).
const SPLIT_ROWS: usize = 16;

/// How P·V gets its operands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PvForm {
    /// V's rows interleaved in pairs ([`v_pairs`]) and P paired along the
    /// keys ([`pack_p`]): one product per 32 keys of a C tile.
    Pairs,
    /// V's B tiles read straight from the keys' bf16 rows, whose column
    /// pairs then are the VNNI pairs, against P twice ([`pack_p_split`]):
    /// in the pairs' low halves for the even columns, in the high halves
    /// for the odd ones, each into its own C tiles. Twice the products of
    /// `Pairs`, and no pass over V: the cheaper form for few rows.
    Split,
}

impl PvForm {
    fn of(rp: usize, dv: usize) -> Self {
        match rp <= SPLIT_ROWS && dv.is_multiple_of(32) {
            true => PvForm::Split,
            false => PvForm::Pairs,
        }
    }

    /// u32 of P's A tiles per row block of 16, for tiles of up to `2 *
    /// np16` keys.
    fn pa_block(self, np16: usize) -> usize {
        match self {
            PvForm::Pairs => 16 * np16,
            PvForm::Split => 64 * np16,
        }
    }

    /// Row `i` of one row block of O from its C tiles (`block`, tile
    /// order) into `orow`, times `scale`: `Pairs` keeps O's columns in
    /// order, 16 a tile; `Split` keeps the even and odd columns of each 32
    /// in two tiles.
    fn untile(self, block: &[f32], i: usize, orow: &mut [f32], scale: f32) {
        let line = |c: usize| &block[c * TILE + i * 16..][..16];
        match self {
            PvForm::Pairs => {
                for (c, out) in orow.chunks_exact_mut(16).enumerate() {
                    out.iter_mut()
                        .zip(line(c))
                        .for_each(|(o, &x)| *o = x * scale);
                }
            }
            PvForm::Split => {
                for (c, out) in orow.chunks_exact_mut(32).enumerate() {
                    let (even, odd) = (line(2 * c), line(2 * c + 1));
                    for (k, pair) in out.chunks_exact_mut(2).enumerate() {
                        pair.copy_from_slice(&[even[k] * scale, odd[k] * scale]);
                    }
                }
            }
        }
    }
}

/// Whether the kernel computes the tasks of a call like `call` as exactly
/// as the AVX512-BF16 one: bf16 queries, a cache whose values are bf16
/// (BF16, or FP8 with power-of-two scales), a bf16 output (P may be
/// rounded), `d_qk % 32 == 0` (whole A tiles) and `d_v % 16 == 0` (whole C
/// tiles). It then reads the bf16 queries, never the f32 ones.
pub fn applies_to(call: &CallQueries) -> bool {
    call.q_bf16
        && call.p_bf16
        && call.d_qk.is_multiple_of(32)
        && call.d_v.is_multiple_of(16)
        && call.d_v <= call.d_qk
        && matches!(
            call.kv_format,
            KvFormat::Bf16 | KvFormat::Fp8V32 | KvFormat::Fp8Model1
        )
}

/// [`applies_to`] `task`'s call.
pub fn applies(task: &AttnTask<'_>) -> bool {
    applies_to(&task.call())
}

/// The kernel body (see the module comment).
///
/// # Safety
/// AVX-512F, BW and BF16 are enabled; `tiles` are configured (all eight,
/// 16 x 64 bytes) on this thread; [`applies`] holds for `task`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn attend<T: Tiles>(
    tiles: &mut T,
    task: &AttnTask<'_>,
    scratch: &mut Scratch,
    o: &mut [f32],
    lse: &mut [f32],
) {
    debug_assert!(applies(task));
    let mut laps = Laps::start();
    let (d, dv) = (task.d_qk, task.d_v);
    let d2 = d / 2;
    // Whole A-tile steps (16 pairs) of leading query columns that are
    // zero: left out of the scores (at least one step stays).
    let k0 = (task.q_skip / 32).min((d2 / 16).saturating_sub(1));
    let rows = task.n_q * task.h_q;
    let rp = rows.div_ceil(16) * 16;

    let pairs = fit_u32_lines(&mut scratch.pairs, d2 * rp + KT * d2);
    let (qb, kb) = pairs.split_at_mut(d2 * rp);
    // SAFETY: AVX-512F enabled; the bf16 queries hold rows x d, qb d2 x rp.
    unsafe { q_pairs_t(task.q_bf16.unwrap_or_default(), rows, d, rp, qb) };
    let form = PvForm::of(rp, dv);
    let vp_len = if form == PvForm::Pairs {
        KT / 2 * dv
    } else {
        0
    };
    let pv_buf = fit_u32_lines(
        &mut scratch.pv_pairs,
        vp_len + rp / 16 * form.pa_block(KT / 2),
    );
    let (vp, pa) = pv_buf.split_at_mut(vp_len);
    let sc = fit_lines(&mut scratch.scores, KT * rp + rp * dv);
    // O (`acc`) is written by the first tile's P·V, not zeroed first.
    let (st, acc) = sc.split_at_mut(KT * rp);
    let row = fit(&mut scratch.k_tile, d);
    let row_max = fit(&mut scratch.row_max, rows);
    let row_sum = fit(&mut scratch.row_sum, rows);
    row_max.fill(f32::NEG_INFINITY);
    row_sum.fill(0.0);

    laps.lap(Phase::Rest);
    let mut t0 = task.start;
    while t0 < task.end {
        let n = KT.min(task.end - t0);
        let nsub = n.div_ceil(SUB);
        // Each 16-key A tile: in place when its rows are consecutive in one
        // block of a BF16 cache, else converted into `kb` (zero rows past n).
        let mut in_place: [Option<&[u32]>; KT / SUB] = [None; KT / SUB];
        for (s, place) in in_place.iter_mut().enumerate().take(nsub) {
            let (j0, m) = (t0 + s * SUB, SUB.min(n - s * SUB));
            if m == SUB {
                *place = task.bf16_tile(j0, SUB);
                if place.is_some() {
                    continue;
                }
            }
            let dst = &mut kb[s * SUB * d2..][..SUB * d2];
            for (j, kr) in dst.chunks_exact_mut(d2).enumerate() {
                if j >= m {
                    kr.fill(0);
                } else if !task.gather_pairs(j0 + j, kr) {
                    // Exact: the cache's values are bf16 (`applies`).
                    task.gather(j0 + j, row);
                    for (x, p) in kr.iter_mut().zip(row.chunks_exact(2)) {
                        *x = (p[0].to_bits() >> 16) | (p[1].to_bits() & 0xffff_0000);
                    }
                }
            }
        }
        let kb: &[u32] = kb;
        let sub: [&[u32]; KT / SUB] =
            std::array::from_fn(|s| in_place[s].unwrap_or(&kb[s * SUB * d2..][..SUB * d2]));
        let sub = &sub[..nsub];

        let np16 = n.div_ceil(2 * SUB) * SUB;
        let (rb, cb) = (rp / 16, dv / 16);
        let pv_ticks = match form {
            PvForm::Pairs => rb.div_ceil(2) * cb.div_ceil(2) * (np16 / 16),
            PvForm::Split => rb * (dv / 32).div_ceil(2) * nsub,
        };
        let ticks = nsub.div_ceil(2) * rb.div_ceil(2) * (d2 / 16 - k0) + pv_ticks;
        let mut fetch = Trickle::new(task, t0 + n..t0 + n + KT, ticks);
        laps.lap(Phase::Keys);
        // SAFETY: tiles configured (caller); each `sub` tile holds 16 rows
        // of d2 pairs, qb d2 x rp, st KT x rp >= nsub * 16 x rp.
        unsafe { scores(tiles, sub, qb, rp, (k0, d2), st, || fetch.step()) };
        laps.lap(Phase::Scores);
        let first = t0 == task.start;
        // SAFETY: AVX-512F, BW and BF16 enabled; st holds n * rp, row_max
        // and row_sum rows, acc rp x dv, pa rp / 16 blocks of the form's
        // size for np16 <= KT / 2.
        unsafe {
            softmax_p(
                task,
                st,
                rp,
                t0,
                n,
                rows,
                (row_max, row_sum),
                (!first).then_some(&mut *acc),
                dv,
                (form, np16),
                pa,
            )
        };
        laps.lap(Phase::Softmax);
        // SAFETY: AVX-512F, BW and BF16 enabled; vp holds np16 * dv <=
        // KT/2 * dv (Pairs), pa rp / 16 blocks of the form's size for np16
        // (Split needs dv % 32 == 0), acc rp * dv.
        unsafe {
            match form {
                PvForm::Pairs => {
                    v_pairs(sub, d2, n, np16, dv, vp);
                    laps.lap(Phase::VPairs);
                    pv(tiles, pa, rp, np16, vp, dv, (acc, first), || fetch.step());
                }
                PvForm::Split => {
                    let pa = (&*pa, np16);
                    pv_split(tiles, pa, rp, sub, d2, dv, (acc, first), || fetch.step())
                }
            }
        }
        laps.lap(Phase::Pv);
        fetch.rest();
        laps.lap(Phase::Keys);
        t0 += n;
    }
    // O from tile order (16 x 16 blocks) back to rows, normalized on the
    // way (no tile ran: every sum is 0, and the rows are zeroed).
    let cb = dv / 16;
    finalize_with(o, lse, row_max, row_sum, dv, |r, orow, inv| {
        form.untile(&acc[(r / 16) * cb * TILE..][..cb * TILE], r % 16, orow, inv)
    });
    laps.lap(Phase::Rest);
    laps.finish(task.end - task.start, rows);
}

/// The cache lines of a range of keys, prefetched (into L2) a few per
/// [`Trickle::step`]: spread evenly over the `ticks` steps a tile takes.
struct Trickle<'t, 'a> {
    task: &'t AttnTask<'a>,
    /// The next key to open, and the end of the range.
    next: usize,
    end: usize,
    /// The next part of the open key (MODEL1 keeps a key's scales apart).
    part: usize,
    /// The open part's lines: the next one's address, and its end.
    line: usize,
    stop: usize,
    per_step: usize,
}

impl<'t, 'a> Trickle<'t, 'a> {
    fn new(task: &'t AttnTask<'a>, keys: std::ops::Range<usize>, ticks: usize) -> Self {
        let end = keys.end.min(task.end);
        let per_key: usize = match keys.start < end {
            true => task
                .key_bytes(keys.start)
                .iter()
                .flatten()
                .map(|b| b.len() / 64 + 2)
                .sum(),
            false => 0,
        };
        Trickle {
            task,
            next: keys.start,
            end,
            part: 0,
            line: 0,
            stop: 0,
            per_step: (end.saturating_sub(keys.start) * per_key).div_ceil(ticks.max(1)),
        }
    }

    #[inline(always)]
    fn step(&mut self) {
        self.fetch(self.per_step);
    }

    /// Whatever the steps left.
    fn rest(&mut self) {
        self.fetch(usize::MAX);
    }

    #[inline]
    fn fetch(&mut self, mut lines: usize) {
        while lines > 0 {
            if self.line >= self.stop && !self.open() {
                return;
            }
            prefetch(self.line as *const u8);
            self.line += 64;
            lines -= 1;
        }
    }

    /// Opens the next part of the open key, or the next key; false when
    /// none is left.
    fn open(&mut self) -> bool {
        loop {
            if self.part == 0 {
                if self.next >= self.end {
                    return false;
                }
                self.next += 1;
            }
            let bytes = self.task.key_bytes(self.next - 1)[self.part];
            self.part = (self.part + 1) % 2;
            if let Some(b) = bytes.filter(|b| !b.is_empty()) {
                // From the line holding the first byte to the last byte.
                let at = b.as_ptr() as usize;
                (self.line, self.stop) = (at & !63, at + b.len());
                return true;
            }
        }
    }
}

/// `st [16 s + j][r] = Σ_d sub[s][j][d] · Q[r][d]` for every key tile `s`
/// and all `rp` rows, unscaled, `d` from step `k0` (16 pairs a step; the
/// queries are zero before it): 2 key tiles x 2 row blocks per [`mac_dyn`],
/// `tick` once per K chunk of each.
///
/// [`mac_dyn`]: crate::backend::cpu::amx::mac_dyn
///
/// # Safety
/// Tiles configured; every `sub[s]` holds 16 x `d2` u32 with `d2 % 16 ==
/// 0`, `qb` `d2 * rp`, `st` `sub.len() * 16 * rp`, `rp % 16 == 0`.
#[inline(always)]
unsafe fn scores<T: Tiles>(
    t: &mut T,
    sub: &[&[u32]],
    qb: &[u32],
    rp: usize,
    (k0, d2): (usize, usize),
    st: &mut [f32],
    tick: impl FnMut(),
) {
    assert!(d2.is_multiple_of(16) && rp.is_multiple_of(16) && qb.len() >= d2 * rp);
    assert!(k0 * 16 <= d2);
    assert!(st.len() >= sub.len() * SUB * rp && sub.iter().all(|s| s.len() >= SUB * d2));
    let stp = st.as_mut_ptr();
    let a = Tiled {
        at: |s: usize| sub[s][k0 * 16..].as_ptr() as *const u8,
        stride: d2 * 4,
        step: 64,
    };
    let b = Tiled {
        at: |r: usize| qb[k0 * 16 * rp + r * 16..].as_ptr() as *const u8,
        stride: rp * 4,
        step: 16 * rp * 4,
    };
    let c = |s: usize, r: usize| stp.wrapping_add(s * SUB * rp + r * 16) as *mut u8;
    // SAFETY: A tile (s, k): rows of sub[s], bytes 64(k0 + k)..+ 64 of
    // each (k0 + k < d2 / 16); B tile (r, k): qb rows 16(k0 + k)..+ 16,
    // columns of block r; C tile (s, r): st rows of key tile s, columns of
    // block r. All inside the asserted sizes.
    unsafe {
        grid(
            t,
            (sub.len(), rp / 16),
            d2 / 16 - k0,
            a,
            b,
            c,
            rp * 4,
            false,
            tick,
        )
    };
}

/// The online softmax of one tile's scores `st [n][rp]` (unscaled; keys
/// `t0..t0 + n`) and P as the A operand of P·V: `pa`, tile `(r, k)` (rows
/// block r, pairs 16k..16k + 16) at `(r * np16 / 16 + k) * TILE`, row i
/// of it holding the pairs (P[2jp][16r + i], P[2jp + 1][16r + i]) rounded
/// to bf16 (nearest even), zero for keys past `n` (in `Split`,
/// [`pack_p_split`]'s tiles, row block r at `r * 64 np16`). Running max
/// and sum advance (a block's max only when the tile's tops it by
/// [`RESCALE_SLACK`]; rows at an edge exactly); O rows whose max moved are
/// rescaled (`acc`, tile order; `None` before the first tile's P·V has
/// written O).
///
/// A block of 16 rows that all see every key goes through in vectors
/// (the scores read once for the max, once for P); a block at a causal
/// edge, or past the last row, goes row by row through `st` and is then
/// packed from it.
///
/// # Safety
/// AVX-512F, BW and BF16 enabled; `st` holds `n * rp`, `row_max` and
/// `row_sum` `rows`, `acc` `rp * dv`, `pa` `rp * np16`; `rows <= rp`, `rp`,
/// `np16` and `dv` multiples of 16, `1 <= n <= 2 * np16`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn softmax_p(
    task: &AttnTask<'_>,
    st: &mut [f32],
    rp: usize,
    t0: usize,
    n: usize,
    rows: usize,
    (row_max, row_sum): (&mut [f32], &mut [f32]),
    mut acc: Option<&mut [f32]>,
    dv: usize,
    (form, np16): (PvForm, usize),
    pa: &mut [u32],
) {
    let pa_block = form.pa_block(np16);
    assert!(st.len() >= n * rp && row_max.len() >= rows && row_sum.len() >= rows);
    assert!(acc.as_ref().is_none_or(|a| a.len() >= rp * dv));
    assert!(pa.len() >= rp / 16 * pa_block && rows <= rp);
    assert!(rp.is_multiple_of(16) && np16.is_multiple_of(16) && dv.is_multiple_of(16));
    assert!(n >= 1 && n <= 2 * np16);
    let (scale, h_q) = (task.scale, task.h_q);
    for r0 in (0..rp).step_by(16) {
        let out = &mut pa[r0 / 16 * pa_block..][..pa_block];
        // This row block's O tiles (none before the first P·V).
        let mut o = acc.as_deref_mut().map(|a| &mut a[r0 * dv..][..16 * dv]);
        let whole = r0 + 16 <= rows && (r0..r0 + 16).all(|r| task.visible(r / h_q) >= t0 + n);
        if !whole {
            let mut alpha = [1f32; 16];
            for (i, al) in alpha.iter_mut().enumerate() {
                let r = r0 + i;
                if r >= rows {
                    (0..n).for_each(|j| st[j * rp + r] = 0.0);
                    continue;
                }
                let vis = task.visible(r / h_q).saturating_sub(t0).min(n);
                let (max, sum) = (&mut row_max[r], &mut row_sum[r]);
                *al = softmax_row(st, rp, r, (n, vis), scale, max, sum);
            }
            rescale(o.as_deref_mut(), &alpha);
            // SAFETY: rows r0..r0 + 16 of keys < n lie in st (asserted).
            let p = |j: usize| unsafe { _mm512_loadu_ps(st.as_ptr().add(j * rp + r0)) };
            // SAFETY: features enabled (caller); out holds the form's block.
            unsafe { pack(form, n, np16, p, out) };
            continue;
        }
        // SAFETY: AVX-512F enabled (caller); every load reads 16 f32 of
        // key row j < n at columns r0..r0 + 16 <= rp (asserted above), and
        // row_max, row_sum, o hold rows r0..r0 + 16 (whole: r0 + 16 <=
        // rows).
        unsafe {
            let s = st.as_ptr().add(r0);
            let sv = V512::splat(scale);
            let x = |j: usize| V512::load(s.add(j * rp)).mul(sv);
            // Four running maxima: the loads, not one max chain, set the pace.
            let ninf = V512::splat(f32::NEG_INFINITY);
            let (mut m0, mut m1, mut m2, mut m3) = (ninf, ninf, ninf, ninf);
            let mut j = 0;
            while j + 4 <= n {
                m0 = m0.max(x(j));
                m1 = m1.max(x(j + 1));
                m2 = m2.max(x(j + 2));
                m3 = m3.max(x(j + 3));
                j += 4;
            }
            for j in j..n {
                m0 = m0.max(x(j));
            }
            let tmax = m0.max(m1).max(m2.max(m3));
            let m_old = V512::load(row_max.as_ptr().add(r0));
            // Lazily (RESCALE_SLACK): a row keeps its max while the tile's
            // stays within the slack of it, else takes the tile's (also
            // when either is NaN).
            let limit = _mm512_add_ps(m_old.0, _mm512_set1_ps(RESCALE_SLACK));
            let grow = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(tmax.0, limit);
            let m_new = V512(_mm512_mask_blend_ps(grow, m_old.0, tmax.0));
            let alpha = m_old.sub(m_new).exp();
            // P by `exp2_scaled`; even and odd keys into two sums (one add
            // chain would set the pace).
            let (mut even, mut odd) = (V512::splat(0.0), V512::splat(0.0));
            let c = _mm512_set1_ps(scale * std::f32::consts::LOG2_E);
            let m2 = _mm512_mul_ps(m_new.0, _mm512_set1_ps(std::f32::consts::LOG2_E));
            let p = |j: usize| {
                let p = V512(exp2_scaled(_mm512_loadu_ps(s.add(j * rp)), c, m2));
                match j % 2 {
                    0 => even = even.add(p),
                    _ => odd = odd.add(p),
                }
                p.0
            };
            pack(form, n, np16, p, out);
            let sum = even.add(odd);
            let rs = row_sum.as_mut_ptr().add(r0);
            V512::load(rs).mul(alpha).add(sum).store(rs);
            m_new.store(row_max.as_mut_ptr().add(r0));
            let mut a = [0f32; 16];
            alpha.store(a.as_mut_ptr());
            rescale(o, &a);
        }
    }
}

/// O rows of one row block (`o`: its tiles, in tile order) times their
/// `alpha` (row i of every tile by `alpha[i]`); nothing when all are 1 or
/// no O exists yet.
fn rescale(o: Option<&mut [f32]>, alpha: &[f32; 16]) {
    let Some(o) = o.filter(|_| alpha.iter().any(|&a| a != 1.0)) else {
        return;
    };
    for tile in o.chunks_exact_mut(TILE) {
        for (line, &a) in tile.chunks_exact_mut(16).zip(alpha) {
            if a != 1.0 {
                line.iter_mut().for_each(|v| *v *= a);
            }
        }
    }
}

/// `e^(s·scale − m)` for `c = scale·log2(e)`, `m2 = m·log2(e)`: `2^t` with
/// `t = s·c − m2` in one FMA, `t = n + f` (`|f| ≤ ½`), 2^f by its Taylor
/// polynomial of degree 6 (truncation error about 1.7e-7; the test allows
/// 3e-7 plus the f32 argument's rounding) and `vscalefps` for 2^n (which
/// gives 0 far below the max). About half the instructions of
/// the clamped Cephes `exp` the other kernels share.
///
/// # Safety
/// AVX-512F enabled.
#[inline(always)]
unsafe fn exp2_scaled(s: __m512, c: __m512, m2: __m512) -> __m512 {
    const LN2: f32 = std::f32::consts::LN_2;
    // SAFETY: caller contract.
    unsafe {
        let t = _mm512_fmsub_ps(s, c, m2);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm512_sub_ps(t, n);
        let k = |x: f32| _mm512_set1_ps(x);
        let mut p = k(LN2 * LN2 * LN2 * LN2 * LN2 * LN2 / 720.0);
        for coef in [
            LN2 * LN2 * LN2 * LN2 * LN2 / 120.0,
            LN2 * LN2 * LN2 * LN2 / 24.0,
            LN2 * LN2 * LN2 / 6.0,
            LN2 * LN2 / 2.0,
            LN2,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, f, k(coef));
        }
        _mm512_scalef_ps(p, n)
    }
}

/// One row block of P in the A tiles of `form` ([`pack_p`] or
/// [`pack_p_split`]).
///
/// # Safety
/// As the form's packer.
#[inline(always)]
unsafe fn pack(
    form: PvForm,
    n: usize,
    np16: usize,
    p: impl FnMut(usize) -> __m512,
    out: &mut [u32],
) {
    // SAFETY: forwarded contract.
    unsafe {
        match form {
            PvForm::Pairs => pack_p(n, np16, p, out),
            PvForm::Split => pack_p_split(n, p, out),
        }
    }
}

/// One row block of P as the A tiles of [`PvForm::Split`]: for each
/// 16-key tile s, at `2 s * TILE` the tile whose row i holds (P[16s +
/// k][i] rounded to bf16, 0) for k in 0..16 and at `(2 s + 1) * TILE` the
/// same with the halves swapped; zero for keys past `n`. `p(j)` gives key
/// j's 16 values, each asked once, in order.
///
/// # Safety
/// AVX-512F, BW and BF16 enabled; `out` holds `2 * TILE * n.div_ceil(16)`.
#[inline(always)]
unsafe fn pack_p_split(n: usize, mut p: impl FnMut(usize) -> __m512, out: &mut [u32]) {
    let nsub = n.div_ceil(SUB);
    assert!(out.len() >= 2 * TILE * nsub);
    // SAFETY: AVX-512F, BW and BF16 enabled (caller); every store writes
    // 16 u32 inside tile 2s or 2s + 1 of out (asserted size).
    unsafe {
        for s in 0..nsub {
            let mut v = [_mm512_setzero_si512(); 16];
            for (k, vk) in v.iter_mut().enumerate().take(n - s * SUB) {
                let b = _mm512_cvtneps_pbh(p(s * SUB + k));
                *vk = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(b));
            }
            transpose16(&mut v);
            let low = out.as_mut_ptr().add(2 * s * TILE);
            let high = low.add(TILE);
            for (i, vi) in v.iter().enumerate() {
                _mm512_storeu_si512(low.add(i * 16) as *mut __m512i, *vi);
                _mm512_storeu_si512(
                    high.add(i * 16) as *mut __m512i,
                    _mm512_slli_epi32::<16>(*vi),
                );
            }
        }
    }
}

/// Interleaves the two halves of a 32 x bf16 vector: lane r of the result
/// holds (low half's r, high half's r).
const PAIR_HALVES: [i16; 32] = {
    let mut t = [0i16; 32];
    let mut i = 0;
    while i < 32 {
        t[i] = (i / 2 + 16 * (i % 2)) as i16;
        i += 1;
    }
    t
};

/// One row block of P as `pa` tiles (see [`softmax_p`]): `p(j)` gives key
/// j's 16 values (j < n, each asked once, in pairs), rounded to bf16 and
/// paired along the keys, 16 pairs transposed into each tile.
///
/// # Safety
/// AVX-512F, BW and BF16 enabled; `out` holds `16 * np16`, `n <= 2 *
/// np16`, `np16 % 16 == 0`.
#[inline(always)]
unsafe fn pack_p(n: usize, np16: usize, mut p: impl FnMut(usize) -> __m512, out: &mut [u32]) {
    assert!(out.len() >= 16 * np16 && n <= 2 * np16 && np16.is_multiple_of(16));
    // SAFETY: AVX-512F, BW and BF16 enabled (caller); every store writes
    // 16 u32 inside tile jc / 16 of out (asserted size).
    unsafe {
        let mix = _mm512_loadu_si512(PAIR_HALVES.as_ptr() as *const __m512i);
        let pair = |lo: __m512, hi: __m512| {
            let pair = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_permutexvar_epi16(mix, std::mem::transmute::<__m512bh, __m512i>(pair))
        };
        for jc in (0..np16).step_by(16) {
            let mut v = [_mm512_setzero_si512(); 16];
            for (x, vx) in v.iter_mut().enumerate() {
                let j = 2 * (jc + x);
                if j < n {
                    let lo = p(j);
                    let hi = if j + 1 < n {
                        p(j + 1)
                    } else {
                        _mm512_setzero_ps()
                    };
                    *vx = pair(lo, hi);
                }
            }
            transpose16(&mut v);
            let tile = out.as_mut_ptr().add(jc * 16);
            for (i, vi) in v.iter().enumerate() {
                _mm512_storeu_si512(tile.add(i * 16) as *mut __m512i, *vi);
            }
        }
    }
}

/// Pairs two rows of 32 bf16 (`vpermt2w`: the second row's lanes count
/// from 32): columns 0..16 of both, then 16..32, each as (first, second).
const ROWS_PAIRED: [[i16; 32]; 2] = {
    let mut t = [[0i16; 32]; 2];
    let mut i = 0;
    while i < 32 {
        t[0][i] = (i / 2 + 32 * (i % 2)) as i16;
        t[1][i] = (16 + i / 2 + 32 * (i % 2)) as i16;
        i += 1;
    }
    t
};

/// V as the B operand of P·V, tile by tile: `vp [c][jp][16]` (column block
/// c, its 16 columns) = (V[2jp][16c + i], V[2jp + 1][16c + i]) for the first
/// `dv` columns of the keys' bf16 rows (`sub[j / 16]` row `j % 16`), zero
/// past `n` up to `np16` pairs. Tile `(c, k)` is then rows 16k..16k + 16
/// of block c: one KiB.
///
/// # Safety
/// AVX-512F and BW enabled; each `sub[s]` holds 16 rows of `d2` u32,
/// `n <= 16 * sub.len()`, `dv % 16 == 0`, `dv <= 2 * d2`, `vp` holds
/// `np16 * dv`, `n <= 2 * np16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn v_pairs(sub: &[&[u32]], d2: usize, n: usize, np16: usize, dv: usize, vp: &mut [u32]) {
    assert!(n <= SUB * sub.len() && dv.is_multiple_of(16) && dv <= 2 * d2);
    assert!(vp.len() >= np16 * dv && n <= 2 * np16 && sub.iter().all(|s| s.len() >= SUB * d2));
    let key = |j: usize| -> *const u16 { sub[j / SUB][(j % SUB) * d2..].as_ptr() as *const u16 };
    // Row jp of column block c.
    let at = |c: usize, jp: usize| (c * np16 + jp) * 16;
    // SAFETY: AVX-512F and BW enabled (caller); masked loads read columns
    // c..c + w < dv <= 2 * d2 of a key row < n; stores write row jp < np16
    // of a column block < dv / 16 inside vp (asserted sizes).
    unsafe {
        let (lo, hi) = (
            _mm512_loadu_si512(ROWS_PAIRED[0].as_ptr() as *const __m512i),
            _mm512_loadu_si512(ROWS_PAIRED[1].as_ptr() as *const __m512i),
        );
        let out = vp.as_mut_ptr();
        // Column blocks outer: the stores of one pass run down a block
        // (the blocks' rows jp lie 8 KiB apart for np16 = 128: one L1 set).
        for c in (0..dv).step_by(32) {
            let w = 32.min(dv - c);
            let m: __mmask32 = if w == 32 { !0 } else { (1 << w) - 1 };
            for jp in 0..np16 {
                if 2 * jp >= n {
                    _mm512_storeu_si512(
                        out.add(at(c / 16, jp)) as *mut __m512i,
                        _mm512_setzero_si512(),
                    );
                    if w == 32 {
                        _mm512_storeu_si512(
                            out.add(at(c / 16 + 1, jp)) as *mut __m512i,
                            _mm512_setzero_si512(),
                        );
                    }
                    continue;
                }
                let (a, b) = (key(2 * jp), (2 * jp + 1 < n).then(|| key(2 * jp + 1)));
                let x = _mm512_maskz_loadu_epi16(m, a.add(c) as *const i16);
                let y = match b {
                    Some(b) => _mm512_maskz_loadu_epi16(m, b.add(c) as *const i16),
                    None => _mm512_setzero_si512(),
                };
                _mm512_storeu_si512(
                    out.add(at(c / 16, jp)) as *mut __m512i,
                    _mm512_permutex2var_epi16(x, lo, y),
                );
                if w == 32 {
                    _mm512_storeu_si512(
                        out.add(at(c / 16 + 1, jp)) as *mut __m512i,
                        _mm512_permutex2var_epi16(x, hi, y),
                    );
                }
            }
        }
    }
}

/// `O += P · V` on tiles: C tile `(r, c)` of `acc` (tile order, at `(r *
/// dv / 16 + c) * TILE`) += Σ_k `pa` tile `(r, k)` · `vp` tile `(c, k)`
/// over `np16 / 16` chunks (`=` for the `first` tile: `acc` is not read), 2 row blocks x 2 column blocks per
/// [`mac_dyn`], `tick` once per chunk of each.
///
/// [`mac_dyn`]: crate::backend::cpu::amx::mac_dyn
///
/// # Safety
/// Tiles configured; `pa` holds `rp * np16`, `vp` `np16 * dv`, `acc`
/// `rp * dv`; `rp`, `np16`, `dv` multiples of 16.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pv<T: Tiles>(
    t: &mut T,
    pa: &[u32],
    rp: usize,
    np16: usize,
    vp: &[u32],
    dv: usize,
    (acc, first): (&mut [f32], bool),
    tick: impl FnMut(),
) {
    assert!(rp.is_multiple_of(16) && np16.is_multiple_of(16) && dv.is_multiple_of(16));
    assert!(pa.len() >= rp * np16 && vp.len() >= np16 * dv && acc.len() >= rp * dv);
    let (ap, cb) = (acc.as_mut_ptr(), dv / 16);
    let a = Tiled {
        at: |r: usize| pa[r * 16 * np16..].as_ptr() as *const u8,
        stride: 64,
        step: TILE * 4,
    };
    let b = Tiled {
        at: |c: usize| vp[c * 16 * np16..].as_ptr() as *const u8,
        stride: 64,
        step: TILE * 4,
    };
    let c = |r: usize, c: usize| ap.wrapping_add((r * cb + c) * TILE) as *mut u8;
    // SAFETY: A tile (r, k): pa's tile k of row block r; B tile (c, k):
    // vp's rows 16k..16k + 16 of column block c; C tile (r, c): acc's
    // tile (r, c). All inside the asserted sizes.
    unsafe { grid(t, (rp / 16, cb), np16 / 16, a, b, c, 64, !first, tick) };
}

/// `O += P · V` in [`PvForm::Split`]: for each row block r and each 32
/// columns c of V, C tiles `(r, 2c)` (O's even columns of them) and `(r,
/// 2c + 1)` (the odd ones) of `acc` += (`=` when `first`) Σ_s `pa`'s low (high) tile of key
/// tile s · the B tile of `sub[s]`'s bytes 64c..64c + 64 (16 keys, each
/// row's column pairs the VNNI pairs): 2 x 2 per [`mac_dyn`], `tick` once
/// per key tile of each.
///
/// # Safety
/// Tiles configured; `pa` holds `rp / 16` blocks of `64 * np16` u32
/// (`pack_p_split`'s tiles for `sub.len() <= np16 / 8` key tiles), every
/// `sub[s]` 16 rows of `d2` u32, `acc` `rp * dv`; `rp % 16 == 0`, `dv % 32
/// == 0`, `dv <= 2 * d2`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pv_split<T: Tiles>(
    t: &mut T,
    (pa, np16): (&[u32], usize),
    rp: usize,
    sub: &[&[u32]],
    d2: usize,
    dv: usize,
    (acc, first): (&mut [f32], bool),
    mut tick: impl FnMut(),
) {
    let block = PvForm::Split.pa_block(np16);
    assert!(rp.is_multiple_of(16) && dv.is_multiple_of(32) && dv <= 2 * d2);
    assert!(pa.len() >= rp / 16 * block && acc.len() >= rp * dv && sub.len() * 8 <= np16);
    assert!(sub.iter().all(|s| s.len() >= SUB * d2));
    let keys: [*const u8; KT / SUB] = std::array::from_fn(|s| {
        sub.get(s)
            .map_or(std::ptr::null(), |k| k.as_ptr() as *const u8)
    });
    let (ap, cb, c32) = (acc.as_mut_ptr(), dv / 16, dv / 32);
    let c = |r: usize, c: usize| ap.wrapping_add((r * cb + c) * TILE) as *mut u8;
    for r in 0..rp / 16 {
        let low = pa[r * block..].as_ptr() as *const u8;
        let a = Operand {
            base: [low, low.wrapping_add(TILE * 4)],
            stride: 64,
            step: 2 * TILE * 4,
        };
        for j in (0..c32).step_by(2) {
            let (nn, jl) = (2.min(c32 - j), (j + 1).min(c32 - 1));
            let b = Scattered {
                chunks: &keys[..sub.len()],
                offset: [64 * j, 64 * jl],
                stride: d2 * 4,
            };
            let acc = Acc {
                base: [
                    [c(r, 2 * j), c(r, 2 * jl)],
                    [c(r, 2 * j + 1), c(r, 2 * jl + 1)],
                ],
                stride: 64,
            };
            // SAFETY: A tiles (i, s): pa's tile 2s + i of row block r; B
            // tile (j, s): 16 rows of sub[s], bytes 64j..64j + 64 < 4 d2 of
            // each; C tiles: acc's tiles of row block r. All inside the
            // asserted sizes.
            unsafe { mac_dyn(t, (2, nn), a, b, sub.len(), acc, !first, &mut tick) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avx512_bw_bf16() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
    }

    fn bf16_bits(x: f32) -> u32 {
        half::bf16::from_f32(x).to_bits() as u32
    }

    /// `exp2_scaled` against f64: relative error within 3e-7 plus what the
    /// f32 argument's rounding allows, down to 1e-30; 1 at the max (to the
    /// same allowance); and below 1e-29 far under it.
    #[test]
    fn exp2_scaled_matches_f64() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("SKIPPED exp2_scaled: CPU lacks avx512f");
            return;
        }
        let log2e = std::f32::consts::LOG2_E;
        for (scale, m) in [(0.0417f32, 3.5f32), (1.0, 0.0), (0.125, -20.0), (2.0, 80.0)] {
            let xs: Vec<f32> = (0..4096).map(|i| (i as f32 - 3000.0) * 0.0731).collect();
            for chunk in xs.chunks_exact(16) {
                let mut got = [0f32; 16];
                // SAFETY: AVX-512F detected; chunk and got hold 16 f32.
                unsafe {
                    let v = exp2_scaled(
                        _mm512_loadu_ps(chunk.as_ptr()),
                        _mm512_set1_ps(scale * log2e),
                        _mm512_set1_ps(m * log2e),
                    );
                    _mm512_storeu_ps(got.as_mut_ptr(), v);
                }
                for (&x, &g) in chunk.iter().zip(&got) {
                    let arg = x as f64 * scale as f64 - m as f64;
                    let want = arg.exp();
                    if want > 1e-30 {
                        // The polynomial's error, and the f32 argument's:
                        // rounding s·c and m·log2(e) moves e^t by about
                        // their size in ulp (as x·scale − m does in f32).
                        let tol = 3e-7 + 1.5e-7 * ((x * scale).abs() + m.abs()) as f64;
                        let rel = (g as f64 - want).abs() / want;
                        assert!(
                            rel < tol,
                            "x {x} scale {scale} m {m}: {g} vs {want} ({rel:e})"
                        );
                    } else {
                        assert!((0.0..1e-29).contains(&g), "x {x} scale {scale} m {m}: {g}");
                    }
                }
            }
            // The max itself: exactly representable products give 1.
            let at_max = m / scale;
            let mut one = [0f32; 16];
            // SAFETY: as above.
            unsafe {
                let v = exp2_scaled(
                    _mm512_set1_ps(at_max),
                    _mm512_set1_ps(scale * log2e),
                    _mm512_set1_ps(m * log2e),
                );
                _mm512_storeu_ps(one.as_mut_ptr(), v);
            }
            let tol = 3e-7 + 3e-7 * m.abs();
            assert!(
                (one[0] - 1.0).abs() < tol,
                "scale {scale} m {m}: {}",
                one[0]
            );
        }
    }

    /// P's A operand: pairs along the keys, rounded to nearest even, 16
    /// pairs of 16 rows per tile, zero past n (odd n, n not a multiple of
    /// 32); each key asked for once.
    #[test]
    fn pack_p_pairs_and_transposes() {
        if !avx512_bw_bf16() {
            eprintln!("SKIPPED pack_p: CPU lacks avx512f+bw+bf16");
            return;
        }
        for n in [128usize, 37, 1, 64] {
            let np16 = n.div_ceil(32) * 16;
            let st = crate::model::gen::uniform(n * 16, n as u64);
            let st: Vec<f32> = st.iter().map(|x| x + 0.5).collect();
            let mut asked = vec![0; n];
            let mut out = vec![0xdead_beefu32; 16 * np16];
            let p = |j: usize| {
                asked[j] += 1;
                // SAFETY: AVX-512F detected; key j < n holds 16 values.
                unsafe { _mm512_loadu_ps(st[j * 16..].as_ptr()) }
            };
            // SAFETY: features detected; sizes as required.
            unsafe { pack_p(n, np16, p, &mut out) };
            assert!(asked.iter().all(|&a| a == 1), "n {n}: {asked:?}");
            for i in 0..16 {
                for jp in 0..np16 {
                    let p = |j: usize| if j < n { bf16_bits(st[j * 16 + i]) } else { 0 };
                    let want = p(2 * jp) | (p(2 * jp + 1) << 16);
                    let got = out[(jp / 16) * TILE + i * 16 + jp % 16];
                    assert_eq!(got, want, "n {n} row {i} pair {jp}");
                }
            }
        }
    }

    /// P's A tiles for the split P·V: per 16 keys a tile with P (rounded to
    /// nearest even) in the pairs' low halves and one with it in the high
    /// halves, rows transposed, zero past n; each key asked for once.
    #[test]
    fn pack_p_split_halves_and_transposes() {
        if !avx512_bw_bf16() {
            eprintln!("SKIPPED pack_p_split: CPU lacks avx512f+bw+bf16");
            return;
        }
        for n in [128usize, 37, 1, 16] {
            let nsub = n.div_ceil(SUB);
            let st = crate::model::gen::uniform(n * 16, 3 + n as u64);
            let mut asked = vec![0; n];
            let mut out = vec![0xdead_beefu32; 2 * TILE * nsub + 16];
            let p = |j: usize| {
                asked[j] += 1;
                // SAFETY: AVX-512F detected; key j < n holds 16 values.
                unsafe { _mm512_loadu_ps(st[j * 16..].as_ptr()) }
            };
            // SAFETY: features detected; out holds 2 TILE per key tile.
            unsafe { pack_p_split(n, p, &mut out) };
            assert!(asked.iter().all(|&a| a == 1), "n {n}: {asked:?}");
            for s in 0..nsub {
                for i in 0..16 {
                    for k in 0..16 {
                        let j = s * SUB + k;
                        let want = if j < n { bf16_bits(st[j * 16 + i]) } else { 0 };
                        let low = out[2 * s * TILE + i * 16 + k];
                        let high = out[(2 * s + 1) * TILE + i * 16 + k];
                        assert_eq!((low, high), (want, want << 16), "n {n} row {i} key {j}");
                    }
                }
            }
            assert!(
                out[2 * TILE * nsub..].iter().all(|&x| x == 0xdead_beef),
                "n {n}: wrote past"
            );
        }
    }

    /// V's B operand from rows spread over key tiles: pairs of rows in
    /// column blocks of 16, a column tail of 16, zero past n.
    #[test]
    fn v_pairs_interleave_rows() {
        if !avx512_bw_bf16() {
            eprintln!("SKIPPED v_pairs: CPU lacks avx512f+bw+bf16");
            return;
        }
        for (n, d2, dv) in [(128usize, 288usize, 512usize), (37, 24, 48), (1, 16, 16)] {
            let tiles = n.div_ceil(SUB);
            let raw: Vec<Vec<u32>> = (0..tiles)
                .map(|s| {
                    crate::model::gen::uniform(SUB * d2 * 2, s as u64)
                        .chunks_exact(2)
                        .map(|p| bf16_bits(p[0]) | (bf16_bits(p[1]) << 16))
                        .collect()
                })
                .collect();
            let sub: Vec<&[u32]> = raw.iter().map(|v| v.as_slice()).collect();
            let np16 = n.div_ceil(32) * 16;
            let mut vp = vec![0xdead_beefu32; np16 * dv];
            // SAFETY: features detected; sizes as required.
            unsafe { v_pairs(&sub, d2, n, np16, dv, &mut vp) };
            let half = |j: usize, c: usize| -> u32 {
                if j >= n {
                    return 0;
                }
                let w = sub[j / SUB][(j % SUB) * d2 + c / 2];
                if c.is_multiple_of(2) {
                    w & 0xffff
                } else {
                    w >> 16
                }
            };
            for jp in 0..np16 {
                for c in 0..dv {
                    let want = half(2 * jp, c) | (half(2 * jp + 1, c) << 16);
                    let got = vp[((c / 16) * np16 + jp) * 16 + c % 16];
                    assert_eq!(got, want, "n {n} dv {dv} [{jp}][{c}]");
                }
            }
        }
    }
}
