//! The CPU attention-kernel interface and the scalar reference kernel.
//!
//! A kernel attends packed query rows (heads x query tokens = the GEMM "M"
//! dimension) to a contiguous range of keys (a sequence's tokens, or a
//! sparse index list) and produces a normalized partial output plus its
//! log-sum-exp. Splitting, merging, packing and output conversion live in the
//! driver (`super::CpuBackend`), so an ISA-specific kernel only replaces this.

use super::isa::CpuIsa;
use crate::decode::KvCache;

/// Tokens of K processed per tile.
pub const K_TILE: usize = 64;

/// Marks a key of the extra cache in a compacted key list.
pub const EXTRA_KEY: u32 = 1 << 31;

/// Where a task's keys come from, in attention order.
#[derive(Clone, Copy)]
pub enum KeySource<'a> {
    /// Key `j` is token `j` of a sequence, paged through `blocks`.
    Paged {
        kv: &'a KvCache<'a>,
        blocks: &'a [i32],
    },
    /// Key `j` is `keys[j]`: a flat position in `main`, or in `extra` when
    /// it carries [`EXTRA_KEY`].
    List {
        main: &'a KvCache<'a>,
        extra: Option<&'a KvCache<'a>>,
        keys: &'a [u32],
    },
}

/// What every task of a call shares and a kernel may want to know before
/// the call packs its queries ([`AttentionKernel::reads_f32_queries`]).
#[derive(Clone, Copy, Debug)]
pub struct CallQueries {
    /// The call's queries are bf16 ([`AttnTask::q_bf16`] is set).
    pub q_bf16: bool,
    /// The output is bf16 ([`AttnTask::p_bf16`]).
    pub p_bf16: bool,
    pub d_qk: usize,
    pub d_v: usize,
    /// The (main) cache's format.
    pub kv_format: crate::format::KvFormat,
}

/// One unit of work for a kernel: some query rows against a range of keys.
pub struct AttnTask<'a> {
    /// Packed queries `[n_q * h_q, d_qk]` (row `i * h_q + h`), already
    /// multiplied by the softmax scale; empty when the kernel said it does
    /// not read them ([`AttentionKernel::reads_f32_queries`]).
    pub q: &'a [f32],
    /// Query tokens in `q`.
    pub n_q: usize,
    pub h_q: usize,
    pub d_qk: usize,
    pub d_v: usize,
    pub source: KeySource<'a>,
    /// Keys `[start, end)` of the source.
    pub start: usize,
    pub end: usize,
    /// `Some(seqlen)`: bottom-right causal mask, query `i` sees keys
    /// `j < seqlen - (n_q - 1 - i)`. `None`: every key is visible.
    pub causal_seqlen: Option<usize>,
    /// The same queries as stored bf16 (unscaled), when the call's queries
    /// are bf16: lets a bf16 dot-product kernel use them exactly.
    pub q_bf16: Option<&'a [u8]>,
    /// The softmax scale already applied to `q`.
    pub scale: f32,
    /// The output is bf16: a kernel may round P to bf16 for P·V (FlashMLA
    /// does), whose error then stays below the output's own rounding.
    pub p_bf16: bool,
    /// Leading columns that are zero in every query row
    /// (`Decode::q_zero_prefix`): a kernel may leave them out of `Q·Kᵀ`.
    pub q_skip: usize,
}

impl AttnTask<'_> {
    /// Number of leading keys query `i` may see.
    #[inline]
    pub fn visible(&self, i: usize) -> usize {
        match self.causal_seqlen {
            Some(len) => (len + i + 1).saturating_sub(self.n_q),
            None => usize::MAX,
        }
    }

    /// What the task's call shares with its other tasks.
    pub fn call(&self) -> CallQueries {
        CallQueries {
            q_bf16: self.q_bf16.is_some(),
            p_bf16: self.p_bf16,
            d_qk: self.d_qk,
            d_v: self.d_v,
            kv_format: self.kv_format(),
        }
    }

    /// Format of the cache(s) the keys come from.
    pub fn kv_format(&self) -> crate::format::KvFormat {
        match self.source {
            KeySource::Paged { kv, .. } | KeySource::List { main: kv, .. } => kv.layout.format,
        }
    }

    /// Key `j` as bf16 pairs into `out` (`d_qk / 2`), straight from the
    /// cache (see `KvLayout::bf16_pairs_row`); false (`out` unspecified)
    /// when that row cannot be converted directly.
    #[inline]
    pub fn gather_pairs(&self, j: usize, out: &mut [u32]) -> bool {
        let (c, block, off) = self.locate(j);
        c.layout.bf16_pairs_row(c.data, block, off, out)
    }

    /// The cache, block and slot of key `j`.
    #[inline]
    fn locate(&self, j: usize) -> (&KvCache<'_>, usize, usize) {
        match self.source {
            KeySource::Paged { kv, blocks } => {
                let bs = kv.block_size();
                (kv, blocks[j / bs] as usize, j % bs)
            }
            KeySource::List { main, extra, keys } => {
                let k = keys[j];
                let (c, pos) = match (k & EXTRA_KEY != 0, extra) {
                    (true, Some(x)) => (x, (k & !EXTRA_KEY) as usize),
                    _ => (main, k as usize),
                };
                (c, pos / c.block_size(), pos % c.block_size())
            }
        }
    }

    /// Starts fetching keys `range` (clipped to the task's keys) into the
    /// cache. A kernel calls it for the next tile while it computes this
    /// one: rows read straight from the cache otherwise arrive at memory
    /// latency.
    #[inline]
    pub fn prefetch_keys(&self, range: std::ops::Range<usize>) {
        let end = range.end.min(self.end);
        if let KeySource::Paged { kv, blocks } = self.source {
            // Consecutive keys of one block are consecutive rows: one
            // fetch per run of them.
            let bs = kv.block_size();
            let mut j = range.start;
            while j < end {
                let (block, off) = (blocks[j / bs] as usize, j % bs);
                let n = (bs - off).min(end - j);
                kv.layout.prefetch_tokens(kv.data, block, off, n);
                j += n;
            }
            return;
        }
        for j in range.start..end {
            let (c, block, off) = self.locate(j);
            c.layout.prefetch_tokens(c.data, block, off, 1);
        }
    }

    /// The cached bytes of key `j` (see `KvLayout::token_bytes`), for a
    /// kernel that fetches them a few lines at a time.
    #[inline]
    pub fn key_bytes(&self, j: usize) -> [Option<&[u8]>; 2] {
        let (c, block, off) = self.locate(j);
        c.layout.token_bytes(c.data, block, off)
    }

    /// Keys `j0..j0 + n` as stored bf16 pairs, read in place, when they are
    /// consecutive rows of one block of a BF16 cache (a paged tile that
    /// does not cross a block) and the rows are 4-byte aligned.
    #[inline]
    pub fn bf16_tile(&self, j0: usize, n: usize) -> Option<&[u32]> {
        let KeySource::Paged { kv, blocks } = self.source else {
            return None;
        };
        let bs = kv.block_size();
        if n == 0 {
            return None;
        }
        let rows = kv
            .layout
            .bf16_rows(kv.data, *blocks.get(j0 / bs)? as usize, j0 % bs, n)?;
        bytemuck::try_cast_slice(rows).ok()
    }

    /// Key `j` as stored bf16 pairs, read in place, when its cache is BF16
    /// and the row is 4-byte aligned: a sparse key or a tile that crosses
    /// blocks then needs no copy either.
    #[inline]
    pub fn bf16_row(&self, j: usize) -> Option<&[u32]> {
        let (c, block, off) = self.locate(j);
        let row = c.layout.bf16_rows(c.data, block, off, 1)?;
        bytemuck::try_cast_slice(row).ok()
    }

    /// Whether every key source's rows can be read as bf16 pairs directly:
    /// BF16 caches, and FP8_V32 ones on CPUs with the byte-table lookups.
    pub fn keys_as_pairs(&self) -> bool {
        let direct = |c: &KvCache<'_>| match c.layout.format {
            crate::format::KvFormat::Bf16 => true,
            #[cfg(target_arch = "x86_64")]
            crate::format::KvFormat::Fp8V32 => *crate::format::fp8::SIMD_BF16,
            _ => false,
        };
        match self.source {
            KeySource::Paged { kv, .. } => direct(kv),
            KeySource::List { main, extra, .. } => direct(main) && extra.is_none_or(direct),
        }
    }

    /// Converts key `j` to f32 (`out[..d_qk]`).
    #[inline]
    pub fn gather(&self, j: usize, out: &mut [f32]) {
        let (c, block, off) = self.locate(j);
        c.load(block, off, out);
    }
}

/// Per-thread scratch memory, grown on first use and then reused.
#[derive(Default)]
pub struct Scratch {
    /// bf16 pairs (queries, then keys) for bf16 dot-product kernels.
    pub pairs: Vec<u32>,
    /// bf16 pairs of V and P along the keys, for bf16 P·V.
    pub pv_pairs: Vec<u32>,
    pub k_tile: Vec<f32>,
    pub scores: Vec<f32>,
    pub row_max: Vec<f32>,
    pub row_sum: Vec<f32>,
}

fn fit(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Normalizes each row's accumulated output by its softmax sum and writes
/// its natural log-sum-exp; a row that saw no key gets `o = 0`, `lse = -inf`.
pub fn finalize(o: &mut [f32], lse: &mut [f32], row_max: &[f32], row_sum: &[f32], d_v: usize) {
    finalize_with(o, lse, row_max, row_sum, d_v, |_, orow, inv| {
        orow.iter_mut().for_each(|x| *x *= inv)
    });
}

/// [`finalize`] with the unnormalized rows kept elsewhere: `fill(r, orow,
/// inv)` writes row `r` times `inv` into `orow` (rows that see a key).
pub fn finalize_with(
    o: &mut [f32],
    lse: &mut [f32],
    row_max: &[f32],
    row_sum: &[f32],
    d_v: usize,
    mut fill: impl FnMut(usize, &mut [f32], f32),
) {
    for (r, (&m, &sum)) in row_max.iter().zip(row_sum).enumerate() {
        let orow = &mut o[r * d_v..(r + 1) * d_v];
        if sum > 0.0 {
            fill(r, orow, 1.0 / sum);
            lse[r] = m + sum.ln();
        } else {
            orow.fill(0.0);
            lse[r] = f32::NEG_INFINITY;
        }
    }
}

/// An attention kernel for one CPU ISA.
pub trait AttentionKernel: Send + Sync {
    fn isa(&self) -> CpuIsa;

    /// Writes `o [rows, d_v]` = softmax-weighted sum of V over the visible
    /// keys in `[task.start, task.end)`, normalized, and `lse [rows]` = the
    /// natural log-sum-exp of the scaled scores, or `-inf` (with `o = 0`)
    /// for a row that sees no key in the range.
    fn attend(&self, task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]);

    /// Whether `attend` reads the packed, scaled f32 queries
    /// ([`AttnTask::q`]) of a call like `call`. When it does not, the
    /// backend skips packing them (one thread's work per sequence, before
    /// any kernel call starts) and passes them empty.
    fn reads_f32_queries(&self, call: &CallQueries) -> bool {
        let _ = call;
        true
    }
}

/// Plain Rust, written so the compiler can vectorise the inner loops. It is
/// also the oracle the faster variants are tested against.
pub struct ScalarKernel;

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums let the compiler use SIMD lanes without
    // reassociating a single serial sum.
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

impl AttentionKernel for ScalarKernel {
    fn isa(&self) -> CpuIsa {
        CpuIsa::Scalar
    }

    fn attend(&self, task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
        let (d_qk, d_v, h_q) = (task.d_qk, task.d_v, task.h_q);
        let rows = task.n_q * h_q;

        let k_tile = fit(&mut scratch.k_tile, K_TILE * d_qk);
        let scores = fit(&mut scratch.scores, K_TILE);
        let row_max = fit(&mut scratch.row_max, rows);
        let row_sum = fit(&mut scratch.row_sum, rows);
        row_max.fill(f32::NEG_INFINITY);
        row_sum.fill(0.0);
        o[..rows * d_v].fill(0.0);

        let mut t0 = task.start;
        while t0 < task.end {
            let n = K_TILE.min(task.end - t0);
            // Gather (and dequantize) the tile once for all query rows.
            for j in 0..n {
                task.gather(t0 + j, &mut k_tile[j * d_qk..(j + 1) * d_qk]);
            }
            for i in 0..task.n_q {
                // Keys visible to query i form a prefix of the key order.
                let vis = task.visible(i).saturating_sub(t0).min(n);
                if vis == 0 {
                    continue;
                }
                for h in 0..h_q {
                    let r = i * h_q + h;
                    let q = &task.q[r * d_qk..(r + 1) * d_qk];
                    let s = &mut scores[..vis];
                    for (j, sj) in s.iter_mut().enumerate() {
                        *sj = dot(q, &k_tile[j * d_qk..(j + 1) * d_qk]);
                    }
                    let tile_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let new_max = row_max[r].max(tile_max);
                    // exp(-inf) = 0 rescales an empty accumulator harmlessly.
                    let alpha = (row_max[r] - new_max).exp();
                    let orow = &mut o[r * d_v..(r + 1) * d_v];
                    if alpha != 1.0 {
                        orow.iter_mut().for_each(|x| *x *= alpha);
                    }
                    let mut sum = 0.0;
                    for (j, &sj) in s.iter().enumerate() {
                        let p = (sj - new_max).exp();
                        sum += p;
                        let v = &k_tile[j * d_qk..j * d_qk + d_v];
                        for (x, &vv) in orow.iter_mut().zip(v) {
                            *x += p * vv;
                        }
                    }
                    row_sum[r] = row_sum[r] * alpha + sum;
                    row_max[r] = new_max;
                }
            }
            t0 += n;
        }

        finalize(o, lse, row_max, row_sum, d_v);
    }
}
