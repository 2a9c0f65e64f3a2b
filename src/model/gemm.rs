//! Prefill projections on `vdpbf16ps`: `Y [T, out] = X [T, in] · Wᵀ` for
//! many tokens, with bf16 or FP8 weights kept in their stored precision.
//!
//! The f32 path converts each weight row once and dots it with every
//! token's `x`, which re-reads all of `X` (7 MB for 256 tokens of V3's
//! hidden size) from L3 per weight row. This one is a register-tiled GEMM:
//! - `X` is split once per call into bf16 `hi` and `lo = x − hi` (about 16
//!   bits of each activation are kept), stored as column pairs × tokens,
//!   so one load gives one pair for 16 tokens;
//! - a tile is 12 weight rows × 16 tokens: per column pair, each row's
//!   bf16 pair is broadcast and multiplied into 16 tokens' `hi` and `lo`;
//! - with [`Activations::Bf16`] `X` is only rounded to bf16 and the `lo`
//!   slots hold 16 more tokens, so a tile is 12 rows × 32 tokens and every
//!   product is useful: half the instructions per token; with 16 tokens or
//!   fewer the `lo` slots stay empty and their products are skipped;
//! - bf16 weight rows are read where they are stored (the pairs are
//!   broadcast from the mapped rows); FP8 ones are converted 12 rows × 128
//!   columns at a time (one scale block: `vpermi2b` lookups, exact), and
//!   that block serves every token;
//! - each 128-column block's sums are scaled per row (the FP8 block scale,
//!   1 for bf16) into an f32 accumulator.
//!
//! FP8 codes convert in an interleaved column order; `X` is packed in the
//! same order, which a dot product does not mind.
//!
//! On AMX CPUs the same product runs on tiles (`matmul_amx`), verified on
//! an Intel Xeon; `MLART_AMX_GEMM=0` keeps it on `vdpbf16ps`.

use super::columns::OutputColumns;
use super::fp8_bf16::{self, source_of, CHUNK};
use super::linear::{Activations, FP8_BLOCK};
use super::scratch::{Buf, Scratch};
#[cfg(target_arch = "x86_64")]
use crate::backend::cpu::amx;
use rayon::prelude::*;

/// Weight rows per tile.
const ROWS: usize = 12;
/// Tokens per vector of f32 lanes; a tile has one such block of tokens
/// (split activations) or two (bf16 activations).
const TOKENS: usize = 16;
/// Columns per block: one FP8 scale block.
const COLS: usize = FP8_BLOCK;
const PAIRS: usize = COLS / 2;

/// One tile's weights: `ROWS` rows of `PAIRS` bf16 pairs (little-endian
/// bytes), row `r` starting at byte `r · stride`. Either a converted
/// block (`stride` = one block row) or, for bf16 weights, the stored rows
/// themselves, read in place.
#[derive(Clone, Copy)]
struct TileWeights<'a> {
    bytes: &'a [u8],
    stride: usize,
}

impl<'a> TileWeights<'a> {
    /// Converted pairs `[ROWS][PAIRS]`.
    fn converted(w: &'a [u32]) -> Self {
        assert!(w.len() >= ROWS * PAIRS);
        // SAFETY: u32 has no padding and any byte is a valid u8; the view
        // covers exactly `w`'s memory and borrows it.
        let bytes = unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), 4 * w.len()) };
        TileWeights {
            bytes,
            stride: 4 * PAIRS,
        }
    }

    /// Whether every pair of the tile is inside `bytes`.
    fn complete(&self) -> bool {
        self.bytes.len() >= (ROWS - 1) * self.stride + 4 * PAIRS
    }

    /// Pair `q` of row `r`, in native order: the converted pairs are
    /// native u32 and the in-place path runs on little-endian CPUs only.
    fn pair(&self, r: usize, q: usize) -> u32 {
        let at = r * self.stride + 4 * q;
        u32::from_ne_bytes([
            self.bytes[at],
            self.bytes[at + 1],
            self.bytes[at + 2],
            self.bytes[at + 3],
        ])
    }
}

/// How a tile takes its tokens' activations.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pack {
    /// 16 tokens, each split into `hi + lo` (precise activations).
    Split,
    /// 32 tokens rounded to bf16: the `lo` slots hold tokens 16..32.
    Wide,
    /// Up to 16 tokens rounded to bf16; the `lo` slots are empty and their
    /// products skipped.
    Narrow,
}

impl Pack {
    fn of(a: Activations, tokens: usize) -> Self {
        match a {
            Activations::Precise => Pack::Split,
            Activations::Bf16 if tokens <= TOKENS => Pack::Narrow,
            Activations::Bf16 => Pack::Wide,
        }
    }

    fn tokens(self) -> usize {
        match self {
            Pack::Wide => 2 * TOKENS,
            Pack::Split | Pack::Narrow => TOKENS,
        }
    }
}

/// Fewest tokens for which bf16 activations take the narrow tile rather
/// than the weight stream of `Linear` (one V3 layer, bf16 weights, decode
/// steps, ms, stream against narrow tile: 9 tokens 27 against 34, 12
/// tokens 33–35 against 35–38, 16 tokens 43–49 against 37).
const NARROW_MIN_TOKENS: usize = 13;

/// Whether `tokens` tokens with activations `a` are better served by this
/// GEMM than by the weight stream: more than half a tile, and for a
/// narrow tile at least `NARROW_MIN_TOKENS` (13).
pub fn takes(a: Activations, tokens: usize) -> bool {
    let pack = Pack::of(a, tokens);
    super::linear::fills(tokens, pack.tokens())
        && (pack != Pack::Narrow || tokens >= NARROW_MIN_TOKENS)
}

/// Whether this CPU runs the GEMM (AVX512-BF16 and VBMI, as the FP8 dot).
pub fn available() -> bool {
    fp8_bf16::available()
}

/// The weight operand: bf16 rows, or E4M3 codes with `[ceil(out/128),
/// ceil(in/128)]` scales.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    Bf16(&'a [u8]),
    Fp8 { codes: &'a [u8], scales: &'a [f32] },
}

impl Weights<'_> {
    /// Starts fetching rows `o0..o0 + rows` (clipped to `out`), columns of
    /// block `cb`, into the cache: with few tokens a block's products take
    /// about as long as its weights take to arrive, so the next block is
    /// fetched while this one computes.
    fn prefetch(&self, o0: usize, rows: usize, out: usize, inp: usize, cb: usize) {
        let c0 = cb * COLS;
        if c0 >= inp {
            return;
        }
        let cols = COLS.min(inp - c0);
        let (data, width) = match *self {
            Weights::Bf16(b) => (b, 2),
            Weights::Fp8 { codes, .. } => (codes, 1),
        };
        for o in o0..(o0 + rows).min(out) {
            let at = (o * inp + c0) * width;
            if let Some(row) = data.get(at..at + cols * width) {
                crate::format::prefetch_bytes(row);
            }
        }
    }

    /// Rows `o0..o0 + ROWS`, columns of block `cb`, read where they are
    /// stored: bf16 weights whose rows and block are all there (no row past
    /// `out`, no partial block) on a little-endian CPU. Copying them
    /// instead costs a pass over every weight byte, which with few tokens
    /// is a good part of the step.
    fn in_place(&self, o0: usize, out: usize, inp: usize, cb: usize) -> Option<TileWeights<'_>> {
        let c0 = cb * COLS;
        match *self {
            Weights::Bf16(b)
                if cfg!(target_endian = "little") && o0 + ROWS <= out && c0 + COLS <= inp =>
            {
                let t = TileWeights {
                    bytes: b.get((o0 * inp + c0) * 2..)?,
                    stride: inp * 2,
                };
                t.complete().then_some(t)
            }
            _ => None,
        }
    }

    /// Column pair `q` of a 64-column chunk: the two columns it holds.
    fn pair_columns(&self, q: usize) -> (usize, usize) {
        match self {
            Weights::Bf16(_) => (2 * q, 2 * q + 1),
            Weights::Fp8 { .. } => (source_of(2 * q), source_of(2 * q + 1)),
        }
    }

    /// Rows `o0..o0 + rows` (zero past `out`), columns of block `cb`, as
    /// bf16 pairs `[rows][PAIRS]`; and each row's scale for the block.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        o0: usize,
        rows: usize,
        out: usize,
        inp: usize,
        cb: usize,
        w: &mut [u32],
        s: &mut [f32],
    ) {
        let c0 = cb * COLS;
        let cols = COLS.min(inp - c0);
        // Row o's scale for this block (FP8).
        let scale =
            |scales: &[f32], o: usize| scales[(o / FP8_BLOCK) * inp.div_ceil(FP8_BLOCK) + cb];
        // FP8 tiles whose rows and block are all there convert in one call.
        if let Weights::Fp8 { codes, scales } = *self {
            let at = o0 * inp + c0;
            if o0 + rows <= out && cols == COLS && codes.len() >= at + (rows - 1) * inp + COLS {
                fp8_bf16::code_rows_to_bf16_pairs(&codes[at..], inp, rows, &mut w[..rows * PAIRS]);
                for (r, sr) in s[..rows].iter_mut().enumerate() {
                    *sr = scale(scales, o0 + r);
                }
                return;
            }
        }
        // Whole bf16 blocks are their pairs' little-endian bytes: one copy.
        if let Weights::Bf16(b) = *self {
            let at = (o0 * inp + c0) * 2;
            if cfg!(target_endian = "little")
                && o0 + rows <= out
                && cols == COLS
                && b.len() >= at + ((rows - 1) * inp + COLS) * 2
            {
                for (r, dst) in w.chunks_exact_mut(PAIRS).take(rows).enumerate() {
                    let src = &b[at + r * inp * 2..][..COLS * 2];
                    bytemuck::cast_slice_mut::<u32, u8>(dst).copy_from_slice(src);
                }
                s[..rows].fill(1.0);
                return;
            }
        }
        for r in 0..rows {
            let dst = &mut w[r * PAIRS..][..PAIRS];
            let o = o0 + r;
            if o >= out {
                dst.fill(0);
                s[r] = 0.0;
                continue;
            }
            match *self {
                Weights::Bf16(b) => {
                    // Two consecutive little-endian bf16 are one pair; an odd
                    // last column pairs with zero, and pairs past it are zero.
                    let row = &b[(o * inp + c0) * 2..][..cols * 2];
                    let pairs = row.chunks_exact(4);
                    let (full, odd) = (pairs.len(), pairs.remainder());
                    for (d, p) in dst.iter_mut().zip(pairs) {
                        *d = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                    }
                    dst[full..].fill(0);
                    if let [lo, hi] = *odd {
                        dst[full] = u16::from_le_bytes([lo, hi]) as u32;
                    }
                    s[r] = 1.0;
                }
                Weights::Fp8 { codes, scales } => {
                    let row = &codes[o * inp + c0..][..cols];
                    for (h, pairs) in dst.chunks_exact_mut(CHUNK / 2).enumerate() {
                        let pairs: &mut [u32; CHUNK / 2] =
                            pairs.try_into().expect("PAIRS is a multiple of CHUNK / 2");
                        let part = row.get(h * CHUNK..).unwrap_or(&[]);
                        match part.get(..CHUNK).and_then(|c| c.try_into().ok()) {
                            // Whole chunks convert where they are.
                            Some(whole) => fp8_bf16::codes_to_bf16_pairs(whole, pairs),
                            None => {
                                // Zero codes past the row's end (a partial
                                // last block).
                                let mut chunk = [0u8; CHUNK];
                                chunk[..part.len()].copy_from_slice(part);
                                fp8_bf16::codes_to_bf16_pairs(&chunk, pairs);
                            }
                        }
                    }
                    s[r] = scale(scales, o);
                }
            }
        }
    }
}

/// `X` split into bf16 `hi` and `lo` in the weights' column order, zero
/// past `in` and past `T`: per (column block, 16-token block), `PAIRS`
/// entries of 16 `hi` pairs then 16 `lo` pairs, so a tile reads one
/// contiguous 8 KiB run. With bf16 activations a block has 32 tokens:
/// the `lo` slots hold `hi` of tokens 16..32 ([`Pack::Wide`]), or stay
/// zero ([`Pack::Narrow`]).
struct PackedX<'s> {
    data: Buf<'s, u32>,
    /// Where the runs start in `data`: its first 64-byte boundary, so each
    /// AMX tile row is one cache line.
    at: usize,
    token_blocks: usize,
    /// Tokens per block: 16, or 32 ([`Pack::Wide`]).
    block_tokens: usize,
}

/// u32s per (column block, token block) of [`PackedX`].
const XBLOCK: usize = PAIRS * 2 * TOKENS;

impl<'s> PackedX<'s> {
    fn new(
        w: &Weights,
        x: &[f32],
        tokens: usize,
        inp: usize,
        pack: Pack,
        scratch: &'s Scratch,
    ) -> Self {
        let split = pack == Pack::Split;
        let block_tokens = pack.tokens();
        let token_blocks = tokens.div_ceil(block_tokens);
        let blocks = inp.div_ceil(COLS);
        // Zeroed run by run on the workers, not all at once on this thread.
        let mut data = scratch.overwritten::<u32>(blocks * token_blocks * XBLOCK + 16);
        let at = crate::backend::to_line(data.as_ptr());
        // Columns of each pair, relative to the block's first column.
        let cols: [(usize, usize); PAIRS] = std::array::from_fn(|p| {
            let (a, b) = w.pair_columns(p % (CHUNK / 2));
            let base = p / (CHUNK / 2) * CHUNK;
            (base + a, base + b)
        });
        data[at..][..blocks * token_blocks * XBLOCK]
            .par_chunks_mut(XBLOCK)
            .enumerate()
            .for_each(|(i, xb)| {
                xb.fill(0);
                let (cb, tb) = (i / token_blocks, i % token_blocks);
                let c0 = cb * COLS;
                let n = COLS.min(inp - c0);
                for j in 0..block_tokens.min(tokens - tb * block_tokens) {
                    let t = tb * block_tokens + j;
                    let row = &x[t * inp + c0..][..n];
                    let value = |c: usize| row.get(c).copied().unwrap_or(0.0);
                    // Slot of pair p for this token: hi (part 0) or lo (part
                    // 1); with bf16 activations tokens 16..32 take the lo slots.
                    let (l, part) = if split {
                        (j, 0)
                    } else {
                        (j % TOKENS, j / TOKENS)
                    };
                    let slot = |p: usize, part: usize| p * 2 * TOKENS + part * TOKENS + l;
                    for (p, &(a, b)) in cols.iter().enumerate() {
                        let (va, vb) = (value(a), value(b));
                        let (ha, hb) = (bf16_bits(va), bf16_bits(vb));
                        xb[slot(p, part)] = ha | hb << 16;
                        if split {
                            let la = bf16_bits(va - f32::from_bits(ha << 16));
                            let lb = bf16_bits(vb - f32::from_bits(hb << 16));
                            xb[slot(p, 1)] = la | lb << 16;
                        }
                    }
                }
            });
        PackedX {
            data,
            at,
            token_blocks,
            block_tokens,
        }
    }

    /// The run of column block `cb`, token block `tb`.
    fn block(&self, cb: usize, tb: usize) -> &[u32] {
        &self.data[self.at + (cb * self.token_blocks + tb) * XBLOCK..][..XBLOCK]
    }
}

/// A value on its own cache lines (the AMX GEMM's stack tiles).
#[repr(C, align(64))]
struct Lines<T>(T);

/// `v` rounded to bf16 (nearest even; NaN stays a quiet NaN), as its 16
/// bits: `half::bf16::from_f32` without its branches, which on
/// activations' random low bits mispredict about half the time.
fn bf16_bits(v: f32) -> u32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    if nan {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

/// Row tiles per task: the tiles share each `X` run while it is in L1.
const TILES: usize = 4;

/// Fewest token blocks for which a task copies its weight blocks rather
/// than reading them where they are stored. In place, a task's 48 rows
/// sit a row's width apart, which for V3's 7168- and 16384-wide inputs
/// maps them onto a few cache sets: with many token blocks each block's
/// rows are re-read from L2 or L3 per token block. A copy of 12 KiB per
/// block then pays for itself; with few token blocks it does not. (One
/// V3 layer's projections on 2 cores, GFLOP/s in place → copied: o_proj
/// 128 tokens 331 → 373, 512 tokens 295 → 350; q_a 128 tokens 348 → 336,
/// 512 tokens 305 → 309; 32 tokens every shape 5–15% slower copied.)
const COPY_MIN_TOKEN_BLOCKS: usize = 8;

/// `y [T, out] = x [T, inp] · Wᵀ`, `x` taken as `a` says, temporaries from
/// `scratch`. Requires [`available`]; `w` holds `out` rows of `inp`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    w: Weights,
    out: usize,
    inp: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    a: Activations,
    scratch: &Scratch,
) {
    #[cfg(target_arch = "x86_64")]
    if *AMX {
        // SAFETY: AMX is present and permitted (the AMX flag checks both).
        return matmul_amx(w, out, inp, x, tokens, y, a, scratch, || unsafe {
            amx::Session::start()
        });
    }
    matmul_dp(w, out, inp, x, tokens, y, a, scratch)
}

/// [`matmul`] on `vdpbf16ps` tiles.
#[allow(clippy::too_many_arguments)]
fn matmul_dp(
    w: Weights,
    out: usize,
    inp: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    a: Activations,
    scratch: &Scratch,
) {
    let pack = Pack::of(a, tokens);
    let px = PackedX::new(&w, x, tokens, inp, pack, scratch);
    let blocks = inp.div_ceil(COLS);
    let t_pad = px.token_blocks * px.block_tokens;
    // Many token blocks per weight block repay a copy of it (see COPY_MIN_TOKEN_BLOCKS).
    let copy = px.token_blocks >= COPY_MIN_TOKEN_BLOCKS;
    let task_rows = TILES * ROWS;
    let y = OutputColumns::new(y, out, tokens);
    (0..out.div_ceil(task_rows)).into_par_iter().for_each(|g| {
        let (o0, rows) = (g * task_rows, task_rows.min(out - g * task_rows));
        // This task's outputs for every token, [rows][t_pad].
        let mut acc = scratch.zeroed::<f32>(task_rows * t_pad);
        let mut wb = [0u32; TILES * ROWS * PAIRS];
        let mut s = [0f32; TILES * ROWS];
        for cb in 0..blocks {
            w.prefetch(o0, task_rows, out, inp, cb + 1);
            // Each tile's rows in place where they can be, else copied or converted.
            let mut in_place: [Option<TileWeights>; TILES] = [None; TILES];
            for (k, ((wk, sk), ip)) in wb
                .chunks_exact_mut(ROWS * PAIRS)
                .zip(s.chunks_exact_mut(ROWS))
                .zip(&mut in_place)
                .enumerate()
            {
                let r0 = o0 + k * ROWS;
                *ip = if copy {
                    None
                } else {
                    w.in_place(r0, out, inp, cb)
                };
                match ip {
                    Some(_) => sk.fill(1.0),
                    None => w.block(r0, ROWS, out, inp, cb, wk, sk),
                }
            }
            for tb in 0..px.token_blocks {
                let xb = px.block(cb, tb);
                for k in 0..rows.div_ceil(ROWS) {
                    let wk = in_place[k].unwrap_or_else(|| {
                        TileWeights::converted(&wb[k * ROWS * PAIRS..][..ROWS * PAIRS])
                    });
                    tile(
                        wk,
                        &s[k * ROWS..][..ROWS],
                        xb,
                        &mut acc[k * ROWS * t_pad..][..ROWS * t_pad],
                        t_pad,
                        tb * px.block_tokens,
                        pack,
                    );
                }
            }
        }
        // SAFETY: task g alone has outputs o0..o0 + rows.
        unsafe { y.put(o0, rows, &acc, t_pad) };
    });
}

/// AMX for the GEMM wherever the CPU has AMX-BF16 and the OS grants it
/// (its logic is also tested on the tile model everywhere);
/// `MLART_AMX_GEMM=0` turns it off.
#[cfg(target_arch = "x86_64")]
static AMX: once_cell::sync::Lazy<bool> = once_cell::sync::Lazy::new(|| {
    std::env::var("MLART_AMX_GEMM").map_or(true, |v| v != "0")
        && crate::backend::cpu::isa::CpuFeatures::detect().amx_bf16
        && crate::backend::cpu::isa::amx_permitted()
});

/// Whether [`matmul`] runs on AMX tiles in this process (AMX-BF16
/// present and granted, and not turned off by `MLART_AMX_GEMM=0`).
pub fn on_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        *AMX
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Weight rows per AMX task: two A tiles of 16 rows.
#[cfg(target_arch = "x86_64")]
const AMX_ROWS: usize = 32;

/// [`matmul`] on AMX tiles, as `Yᵀ = W · Xᵀ`: per task 32 weight rows (two
/// A tiles, `[16 rows][16 pairs]` of a converted block) against every
/// token (B tiles straight from [`PackedX`]'s runs, whose `[pair][16
/// tokens]` layout is AMX's pair-interleaved B), so each C tile is 16
/// weight rows × 16 tokens, the layout of the task's accumulator. Per
/// 128-column block and run of tokens, four C tiles (2 row tiles × 2
/// columns of 16 tokens) take 2 A and 2 B loads per 4 `tdpbf16ps`:
/// - bf16 weights (scale 1): C is loaded from the accumulator and stored
///   back, no vector work at all;
/// - FP8: C starts at zero and is added into the accumulator times each
///   row's block scale (16 tokens per AVX-512 FMA).
///
/// A column of tokens sums the B tiles of its sources: the `hi` and `lo`
/// parts of one block of 16 tokens (split activations), or one part (bf16
/// activations: a wide run's two parts are two columns). `tiles` gives
/// each task its tiles, configured.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn matmul_amx<T: amx::Tiles>(
    w: Weights,
    out: usize,
    inp: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    a: Activations,
    scratch: &Scratch,
    tiles: impl Fn() -> T + Sync,
) {
    let pack = Pack::of(a, tokens);
    let px = PackedX::new(&w, x, tokens, inp, pack, scratch);
    let (blocks, t_pad) = (inp.div_ceil(COLS), px.token_blocks * px.block_tokens);
    // bf16 weights are unscaled: C accumulates in place.
    let unscaled = matches!(w, Weights::Bf16(_));
    // Columns of 16 tokens, each with its sources: (token block, first
    // token, parts summed into it).
    let mut columns: Vec<(usize, usize, &[usize])> = Vec::new();
    for tb in 0..px.token_blocks {
        let t0 = tb * px.block_tokens;
        match pack {
            Pack::Split => columns.push((tb, t0, &[0, 1])),
            Pack::Wide => {
                columns.push((tb, t0, &[0]));
                columns.push((tb, t0 + TOKENS, &[1]));
            }
            Pack::Narrow => columns.push((tb, t0, &[0])),
        }
    }
    let y = OutputColumns::new(y, out, tokens);
    (0..out.div_ceil(AMX_ROWS)).into_par_iter().for_each(|g| {
        let o0 = g * AMX_ROWS;
        // This task's outputs for every token, [rows][t_pad], from a cache line.
        let mut acc_buf = scratch.zeroed::<f32>(AMX_ROWS * t_pad + 16);
        let at = crate::backend::to_line(acc_buf.as_ptr());
        let acc = &mut acc_buf[at..][..AMX_ROWS * t_pad];
        // Configured for this task on this thread; released when dropped.
        let mut t = tiles();
        let mut wb = Lines([0u32; AMX_ROWS * PAIRS]);
        let wb = &mut wb.0;
        let mut s = [0f32; AMX_ROWS];
        // The FP8 path's C tiles: [row tile][column][16 rows][16 tokens].
        let mut c = Lines([0f32; 4 * 16 * TOKENS]);
        let c = &mut c.0;
        let stride = t_pad * 4;
        for cb in 0..blocks {
            w.block(o0, AMX_ROWS, out, inp, cb, wb, &mut s);
            for pair in columns.chunks(2) {
                let accp = acc.as_mut_ptr();
                let acc_at = |rt: usize, j: usize| accp.wrapping_add(rt * 16 * t_pad + pair[j].1);
                // SAFETY: the tiles are configured (tiles()). A tiles read
                // 16 rows of 64 bytes of wb ([32][PAIRS] u32); B tiles 16
                // pair rows of a run (stride 2 x 16 tokens) inside the
                // XBLOCK run; C tiles 16 rows of 16 f32 of acc at a token
                // column t0 + 16 <= t_pad (stride t_pad), or of c.
                unsafe {
                    macro_rules! c_in {
                        ($ct:literal, $rt:expr, $j:expr) => {
                            if unscaled {
                                t.load::<$ct>(acc_at($rt, $j) as *const u8, stride)
                            } else {
                                t.zero::<$ct>()
                            }
                        };
                    }
                    c_in!(0, 0, 0);
                    c_in!(1, 1, 0);
                    if pair.len() == 2 {
                        c_in!(2, 0, 1);
                        c_in!(3, 1, 1);
                    }
                    for kc in (0..PAIRS).step_by(16) {
                        t.load::<4>(wb.as_ptr().add(kc) as *const u8, PAIRS * 4);
                        t.load::<5>(wb.as_ptr().add(16 * PAIRS + kc) as *const u8, PAIRS * 4);
                        for (j, &(tb, _, parts)) in pair.iter().enumerate() {
                            let xb = px.block(cb, tb);
                            for &part in parts {
                                let b = xb.as_ptr().add(kc * 2 * TOKENS + part * TOKENS);
                                t.load::<6>(b as *const u8, 2 * TOKENS * 4);
                                if j == 0 {
                                    t.dp::<0, 4, 6>();
                                    t.dp::<1, 5, 6>();
                                } else {
                                    t.dp::<2, 4, 6>();
                                    t.dp::<3, 5, 6>();
                                }
                            }
                        }
                    }
                    if unscaled {
                        t.store::<0>(acc_at(0, 0) as *mut u8, stride);
                        t.store::<1>(acc_at(1, 0) as *mut u8, stride);
                        if pair.len() == 2 {
                            t.store::<2>(acc_at(0, 1) as *mut u8, stride);
                            t.store::<3>(acc_at(1, 1) as *mut u8, stride);
                        }
                    } else {
                        let cp = c.as_mut_ptr() as *mut u8;
                        t.store::<0>(cp, 64);
                        t.store::<1>(cp.add(1024), 64);
                        if pair.len() == 2 {
                            t.store::<2>(cp.add(2048), 64);
                            t.store::<3>(cp.add(3072), 64);
                        }
                    }
                }
                if !unscaled {
                    for (j, &(_, t0, _)) in pair.iter().enumerate() {
                        for rt in 0..2 {
                            let ct = &c[(2 * j + rt) * 256..][..256];
                            let rows = rt * 16..rt * 16 + 16;
                            // SAFETY: AVX-512F (AMX CPUs and the tile
                            // model's hosts have it); sizes as required.
                            unsafe { scale_add(acc, t_pad, t0, rows, &s, ct) };
                        }
                    }
                }
            }
        }
        let rows = AMX_ROWS.min(out - o0);
        // SAFETY: task g alone has outputs o0..o0 + rows.
        unsafe { y.put(o0, rows, acc, t_pad) };
    });
}

/// `acc[r][t0..t0 + 16] += s[r] · c[r - rows.start][..]` for `r` in `rows`.
///
/// # Safety
/// AVX-512F enabled; `acc` holds `rows.end` rows of `t_pad` with `t0 + 16
/// <= t_pad`, `s` `rows.end`, `c` 16 x 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scale_add(
    acc: &mut [f32],
    t_pad: usize,
    t0: usize,
    rows: std::ops::Range<usize>,
    s: &[f32],
    c: &[f32],
) {
    use std::arch::x86_64::*;
    assert!(t0 + 16 <= t_pad && acc.len() >= rows.end * t_pad);
    assert!(s.len() >= rows.end && c.len() >= 16 * rows.len());
    for (i, r) in rows.enumerate() {
        // SAFETY: AVX-512F enabled (caller); 16 f32 inside acc and c (asserted).
        unsafe {
            let dst = acc.as_mut_ptr().add(r * t_pad + t0);
            let v = _mm512_loadu_ps(c.as_ptr().add(i * 16));
            _mm512_storeu_ps(
                dst,
                _mm512_fmadd_ps(_mm512_set1_ps(s[r]), v, _mm512_loadu_ps(dst)),
            );
        }
    }
}

/// One tile over one column block (`x`: one [`PackedX`] run), added
/// (scaled per row) into `acc [ROWS][t_pad]` from token `tb` on: 12 rows ×
/// 16 tokens of split activations, 12 rows × 32 tokens of bf16 ones
/// ([`Pack::Wide`]), or 12 rows × 16 tokens of bf16 ones ([`Pack::Narrow`],
/// whose empty `lo` slots are not read).
fn tile(
    w: TileWeights,
    s: &[f32],
    x: &[u32],
    acc: &mut [f32],
    t_pad: usize,
    tb: usize,
    pack: Pack,
) {
    let tokens = pack.tokens();
    assert!(w.complete() && s.len() >= ROWS && x.len() >= XBLOCK);
    assert!(tb + tokens <= t_pad && acc.len() >= (ROWS - 1) * t_pad + tb + tokens);
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: features detected at run time; sizes checked above.
        unsafe {
            match pack {
                Pack::Split => avx512::tile::<false, true>(w, s, x, acc, t_pad, tb),
                Pack::Wide => avx512::tile::<true, true>(w, s, x, acc, t_pad, tb),
                Pack::Narrow => avx512::tile::<false, false>(w, s, x, acc, t_pad, tb),
            }
        };
        return;
    }
    // The empty `lo` slots of a narrow run add zero products.
    tile_portable(w, s, x, acc, t_pad, tb, pack == Pack::Wide)
}

/// [`tile`] without SIMD: the fallback, and the vector tile's test oracle.
fn tile_portable(
    w: TileWeights,
    s: &[f32],
    x: &[u32],
    acc: &mut [f32],
    t_pad: usize,
    tb: usize,
    wide: bool,
) {
    let bf = |v: u32| half::bf16::from_bits(v as u16).to_f32();
    for r in 0..ROWS {
        for part in 0..if wide { 2 } else { 1 } {
            for t in 0..TOKENS {
                let mut sum = 0f32;
                for q in 0..PAIRS {
                    let wv = w.pair(r, q);
                    let (h, l) = (x[q * 2 * TOKENS + t], x[q * 2 * TOKENS + TOKENS + t]);
                    // Split: hi + lo of one token; wide: token t or t + 16.
                    let xv = match (wide, part) {
                        (false, _) => [h, l],
                        (true, 0) => [h, 0],
                        _ => [l, 0],
                    };
                    for k in [0, 16] {
                        sum += bf(wv >> k) * (bf(xv[0] >> k) + bf(xv[1] >> k));
                    }
                }
                acc[r * t_pad + tb + part * TOKENS + t] += s[r] * sum;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{TileWeights, PAIRS, ROWS, TOKENS};
    use std::arch::x86_64::*;

    /// `WIDE`: the run's two halves are 16 tokens each (bf16
    /// activations), summed apart; otherwise `hi` and `lo` of the same 16,
    /// or with `LO` false `hi` alone (the `lo` half is not read).
    ///
    /// # Safety
    /// `w` is complete, `s` has `ROWS` scales, `x` one
    /// `XBLOCK` run, `acc` rows of `t_pad` with `tb + 16 <= t_pad`
    /// (`tb + 32` with `WIDE`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile<const WIDE: bool, const LO: bool>(
        w: TileWeights,
        s: &[f32],
        x: &[u32],
        acc: &mut [f32],
        t_pad: usize,
        tb: usize,
    ) {
        let mut sum = [_mm512_setzero_ps(); ROWS];
        let mut sum2 = [_mm512_setzero_ps(); ROWS];
        for q in 0..PAIRS {
            // SAFETY (caller): entry q of the run is in x.
            let (xh, xl) = unsafe {
                let p = x.as_ptr().add(q * 2 * TOKENS);
                (
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _)),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        p.add(TOKENS) as *const _
                    )),
                )
            };
            for (r, (sr, sr2)) in sum.iter_mut().zip(sum2.iter_mut()).enumerate() {
                // SAFETY (caller): w is complete, so pair q of row r is
                // inside w.bytes; any bits are a valid bf16 pair vector.
                let wv = unsafe {
                    let p = w.bytes.as_ptr().add(r * w.stride + 4 * q);
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        p.cast::<i32>().read_unaligned(),
                    ))
                };
                *sr = _mm512_dpbf16_ps(*sr, wv, xh);
                if WIDE {
                    *sr2 = _mm512_dpbf16_ps(*sr2, wv, xl);
                } else if LO {
                    *sr = _mm512_dpbf16_ps(*sr, wv, xl);
                }
            }
        }
        let halves: &[[__m512; ROWS]] = if WIDE { &[sum, sum2] } else { &[sum] };
        for (part, sums) in halves.iter().enumerate() {
            for (r, v) in sums.iter().enumerate() {
                // SAFETY (caller): row r of acc has t_pad >= tb + 16 (32
                // with WIDE) values.
                unsafe {
                    let p = acc.as_mut_ptr().add(r * t_pad + tb + part * TOKENS);
                    _mm512_storeu_ps(
                        p,
                        _mm512_fmadd_ps(*v, _mm512_set1_ps(s[r]), _mm512_loadu_ps(p)),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    // The AMX test, which uses the shared helpers, is x86-64 only.
    #![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    use super::*;
    use crate::model::linear::testing::values;

    /// bf16 weight bytes, FP8 codes, FP8 scales, X, and `Y = X·Wᵀ` in f64
    /// over the bf16 and the dequantized FP8 weights.
    type Case = (Vec<u8>, Vec<u8>, Vec<f32>, Vec<f32>, [Vec<f64>; 2]);

    /// Weights of both kinds and the f64 reference `Y = X·Wᵀ` over their
    /// dequantized values (and `X` rounded to bf16 for bf16 activations).
    fn weights_case(out: usize, inp: usize, tokens: usize, a: Activations) -> Case {
        use crate::format::fp8::{f32_to_e4m3, E4M3_TABLE};
        let w = values(out * inp, 1);
        let bf: Vec<u8> = w
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let sc = inp.div_ceil(FP8_BLOCK);
        let scales: Vec<f32> = (0..out.div_ceil(FP8_BLOCK) * sc)
            .map(|k| 0.01 * (1 + k) as f32)
            .collect();
        let scale = |i: usize| scales[(i / inp / FP8_BLOCK) * sc + (i % inp) / FP8_BLOCK];
        let codes: Vec<u8> = (0..out * inp)
            .map(|i| f32_to_e4m3(w[i] / scale(i)))
            .collect();
        let x = values(tokens * inp, 2);
        let xv = |i: usize| match a {
            Activations::Precise => x[i] as f64,
            Activations::Bf16 => half::bf16::from_f32(x[i]).to_f64(),
        };
        let reference = |wv: &dyn Fn(usize) -> f64| -> Vec<f64> {
            let mut y = vec![0f64; tokens * out];
            for t in 0..tokens {
                for o in 0..out {
                    y[t * out + o] = (0..inp).map(|k| wv(o * inp + k) * xv(t * inp + k)).sum();
                }
            }
            y
        };
        let yb = reference(&|i| half::bf16::from_f32(w[i]).to_f64());
        let y8 = reference(&|i| E4M3_TABLE[codes[i] as usize] as f64 * scale(i) as f64);
        (bf, codes, scales, x, [yb, y8])
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what} [{k}]: {g} vs {w}"
            );
        }
    }

    /// The AMX GEMM on the tile model and on the CPU's tiles (where it has
    /// them), and the `vdpbf16ps` GEMM, against float64: bf16 and FP8 weights,
    /// both activation precisions, partial row tiles, token blocks and
    /// column blocks. (The tolerance is far below bf16's rounding of X, so
    /// taking X the wrong way fails.)
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_gemm_on_the_tile_model_matches_f64() {
        use crate::backend::cpu::amx::Emu;
        let cases = [
            (20usize, 300usize, 5usize),
            (24, 256, 9),
            (33, 128, 16),
            (33, 128, 17),
            (16, 40, 33),
            (40, 200, 70),
            // At least COPY_MIN_TOKEN_BLOCKS token blocks: the dp GEMM copies
            // its weight blocks (precise activations at 130 tokens, both at
            // 260) rather than reading them in place.
            (50, 300, 130),
            (26, 256, 260),
        ];
        let hardware = crate::backend::cpu::isa::CpuFeatures::detect().amx_bf16
            && crate::backend::cpu::isa::amx_permitted();
        if !hardware {
            eprintln!("SKIPPED gemm on AMX hardware: this CPU has no AMX-BF16 (tile model only)");
        }
        if !available() {
            eprintln!("SKIPPED gemm on vdpbf16ps: CPU lacks avx512bf16/avx512vbmi");
        }
        assert!(130usize.div_ceil(TOKENS) >= COPY_MIN_TOKEN_BLOCKS);
        assert!(260usize.div_ceil(2 * TOKENS) >= COPY_MIN_TOKEN_BLOCKS);
        for ((out, inp, tokens), a) in cases
            .into_iter()
            .flat_map(|c| [(c, Activations::Precise), (c, Activations::Bf16)])
        {
            let (bf, codes, scales, x, [yb, y8]) = weights_case(out, inp, tokens, a);
            for (w, want, name) in [
                (Weights::Bf16(&bf), &yb, "bf16"),
                (
                    Weights::Fp8 {
                        codes: &codes,
                        scales: &scales,
                    },
                    &y8,
                    "fp8",
                ),
            ] {
                let mut y = vec![f32::NAN; tokens * out];
                let scratch = Scratch::default();
                matmul_amx(w, out, inp, &x, tokens, &mut y, a, &scratch, Emu::default);
                assert_close(&y, want, &format!("amx {name} {a:?} {out}x{inp} t{tokens}"));
                if hardware {
                    let mut y = vec![f32::NAN; tokens * out];
                    // SAFETY: AMX-BF16 present and permitted (checked above).
                    let session = || unsafe { crate::backend::cpu::amx::Session::start() };
                    matmul_amx(w, out, inp, &x, tokens, &mut y, a, &scratch, session);
                    assert_close(
                        &y,
                        want,
                        &format!("amx hw {name} {a:?} {out}x{inp} t{tokens}"),
                    );
                }
                if available() {
                    let mut y = vec![f32::NAN; tokens * out];
                    matmul_dp(w, out, inp, &x, tokens, &mut y, a, &scratch);
                    assert_close(&y, want, &format!("dp {name} {a:?} {out}x{inp} t{tokens}"));
                }
            }
        }
    }

    /// The branch-free rounding equals `half`'s on every high half with
    /// low halves around each rounding boundary, and on NaN and infinity.
    #[test]
    fn bf16_bits_matches_half() {
        for hi in 0..=u16::MAX as u32 {
            for lo in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xc000, 0xffff, hi ^ 0x5a5a] {
                let v = f32::from_bits(hi << 16 | lo);
                let want = half::bf16::from_f32(v).to_bits() as u32;
                assert_eq!(bf16_bits(v), want, "{:#010x}", v.to_bits());
            }
        }
    }

    /// The vector tile equals the portable one (both sum the same bf16
    /// products in f32; the order differs, so up to rounding).
    #[test]
    fn vector_tile_matches_portable() {
        if !available() {
            eprintln!("SKIPPED gemm vector tile: CPU lacks avx512bf16/avx512vbmi");
            return;
        }
        let t_pad = 48;
        let bits = |v: &[f32]| -> Vec<u32> {
            v.chunks(2)
                .map(|p| {
                    half::bf16::from_f32(p[0]).to_bits() as u32
                        | (half::bf16::from_f32(p[1]).to_bits() as u32) << 16
                })
                .collect()
        };
        let w = bits(&values(ROWS * PAIRS * 2, 1));
        let x = bits(&values(XBLOCK * 2, 2));
        let s: Vec<f32> = (0..ROWS).map(|r| 0.5 + r as f32).collect();
        let init = values(ROWS * t_pad, 4);
        // A narrow tile does not read the lo slots: the portable tile sees
        // them zero.
        let mut x_hi = x.clone();
        for q in 0..PAIRS {
            x_hi[q * 2 * TOKENS + TOKENS..][..TOKENS].fill(0);
        }
        let cases = [
            (0, Pack::Split),
            (16, Pack::Split),
            (32, Pack::Split),
            (0, Pack::Wide),
            (16, Pack::Wide),
            (0, Pack::Narrow),
            (32, Pack::Narrow),
        ];
        for (tb, pack) in cases {
            let (mut a, mut b) = (init.clone(), init.clone());
            let w = TileWeights::converted(&w);
            tile(w, &s, &x, &mut a, t_pad, tb, pack);
            let xp = if pack == Pack::Narrow { &x_hi } else { &x };
            tile_portable(w, &s, xp, &mut b, t_pad, tb, pack == Pack::Wide);
            for (k, (p, q)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                    "tb {tb} {pack:?} [{k}]: {p} vs {q}"
                );
            }
            // Exactly this token block changed.
            let block = tb..tb + pack.tokens();
            for (k, (p, q)) in a.iter().zip(&init).enumerate() {
                assert_eq!(
                    p == q,
                    !block.contains(&(k % t_pad)),
                    "tb {tb} {pack:?} [{k}]"
                );
            }
        }
    }
}
