//! DeepSeek-V3.2's indexer over a device pool (`kernels/mla_index.cuh`):
//! the pool keeps its indexer keys in GPU memory beside the cache, an
//! append scatters the new keys into their slots, and each new token's
//! choice (score every earlier key, keep the `topk` best) runs on the GPU.
//! No key leaves the device, and the host's share of a selection does not
//! grow with the context. `model::indexer::select` is the CPU twin.

use super::device::{CudaBackend, Which};
use super::driver::{dev_err, guarded};
use super::launch::{
    INDEX_MAX_DIM, INDEX_MMA_KEYS, INDEX_SCATTER_THREADS, INDEX_SCORE_KEYS, INDEX_TOPK_THREADS,
};
use super::lowering::{as_bytes, int};
use super::params::{IndexScoreParams, IndexTopkParams, ScatterParams};
use super::staging::{Carve, DataRef};
use crate::error::{Error, Result};
use cudarc::driver::result;

/// Bytes of scores one selection pass may hold by default: longer contexts
/// or more tokens run in passes of fewer tokens. The scores live in the
/// engine's staging area, which grows to a power of two and stays: 32 MiB
/// keeps it at 64 MiB (64 tokens a pass at a context of 128K).
pub const SCORE_BUDGET: usize = 32 << 20;

/// One selection over a device pool's indexer keys.
#[derive(Clone, Copy, Debug)]
pub struct IndexQuery<'a> {
    /// The layer's key rows `[num_blocks, block_size, dim + 4]` (device).
    pub keys: u64,
    pub block_size: usize,
    /// Elements per key and query head (a multiple of 4, at most 128).
    pub dim: usize,
    pub heads: usize,
    /// Block tables `[sequences, stride]`.
    pub table: &'a [i32],
    pub stride: usize,
    /// Per token: its row of `table`, and its candidates (positions
    /// `0..tok_len`: its own position + 1).
    pub tok_seq: &'a [i32],
    pub tok_len: &'a [i32],
    /// The tokens' queries `[tokens, heads, dim]` (E4M3 code values, f32)
    /// and head weights `[tokens, heads]` (see
    /// `model::indexer::IndexerTokens`): host, or engine memory.
    pub q: DataRef<'a>,
    pub w: DataRef<'a>,
    pub topk: usize,
    /// Bytes of scores one pass may hold (at least one token's row).
    pub score_budget: usize,
}

/// Indexer keys an append writes to the same slots as its cache rows.
#[derive(Clone, Copy, Debug)]
pub struct KeyScatter<'a> {
    /// The layer's key rows (device).
    pub dst: u64,
    /// Bytes of one key row (a multiple of 4).
    pub row_bytes: usize,
    /// The new rows `[slots, row_bytes]`, host or engine memory.
    pub rows: DataRef<'a>,
}

/// Where a selection goes.
pub enum SelectOut<'a> {
    /// Ascending positions `[tokens, topk]`, -1 past the last; the call
    /// waits for them.
    Host(&'a mut [i32]),
    /// Engine memory `[tokens, topk]` (0: not wanted): the positions, and
    /// the same as pool slots (`block * block_size + offset`, what a
    /// sparse decode reads); enqueued, not waited for.
    Device { positions: u64, slots: u64 },
}

impl CudaBackend {
    /// Enqueues `mla_index_scatter` on our `stream` (the state lock held).
    ///
    /// # Safety
    /// `p.src` holds `[p.rows, p.row_words]` words and `p.slots` `[p.rows]`
    /// slots, each of which `p.dst` holds a row for (engine memory).
    pub(super) unsafe fn enqueue_scatter(
        &self,
        p: &ScatterParams,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        let words = p.rows as usize * p.row_words as usize;
        let grid = words
            .div_ceil(INDEX_SCATTER_THREADS as usize)
            .clamp(1, 65535) as u32;
        let (f, threads) = (self.index_scatter, INDEX_SCATTER_THREADS);
        // SAFETY: forwarded contract; `mla_index_scatter` takes a ScatterParams.
        unsafe { self.launch_one(f, "mla_index_scatter", (grid, 1), threads, p, stream) }
    }

    /// Each token's choice (`model::indexer::select`'s semantics) into
    /// `out` (see [`SelectOut`]).
    pub fn index_select(&self, q: &IndexQuery<'_>, mut out: SelectOut<'_>) -> Result<()> {
        let t = q.tok_len.len();
        let (heads, dim, topk) = (q.heads, q.dim, q.topk);
        let host_short =
            |d: DataRef<'_>, n: usize| matches!(d, DataRef::Host(h) if h.len() < 4 * n);
        if q.tok_seq.len() != t
            || host_short(q.q, t * heads * dim)
            || host_short(q.w, t * heads)
            || matches!(&out, SelectOut::Host(o) if o.len() < t * topk)
            || dim == 0
            || dim > INDEX_MAX_DIM
            || !dim.is_multiple_of(4)
            || topk == 0
            || q.stride == 0
        {
            return Err(Error::internal("indexer selection arguments disagree"));
        }
        if t == 0 {
            return Ok(());
        }
        let max_len = q
            .tok_len
            .iter()
            .map(|&n| n.max(0) as usize)
            .max()
            .unwrap_or(0);
        // Scores in rows of a 256-byte multiple, as many tokens per pass as
        // the budget holds.
        let stride = max_len.max(1).next_multiple_of(64);
        let per_pass = (q.score_budget / (4 * stride)).clamp(1, 65535);
        let _host_call = self.host_calls.lock();
        self.make_current()?;
        for first in (0..t).step_by(per_pass) {
            let n = per_pass.min(t - first);
            let toks = first..first + n;
            let mut st = self.state.lock();
            let mut cv = Carve::default();
            let (q_host, q_dev) = pass_part(q.q, first, n, heads * dim);
            let (w_host, w_dev) = pass_part(q.w, first, n, heads);
            let pieces: [&[u8]; 5] = [
                as_bytes(q.table),
                as_bytes(&q.tok_seq[toks.clone()]),
                as_bytes(&q.tok_len[toks.clone()]),
                q_host,
                w_host,
            ];
            let at: Vec<usize> = pieces.iter().map(|p| cv.take(p.len())).collect();
            let inputs = cv.bytes();
            let scores_at = cv.take(4 * n * stride);
            let out_at = cv.take(4 * n * topk);
            let base = self.ensure(&mut st, Which::Staging, cv.bytes())?;
            let mut host = vec![0u8; inputs];
            for (p, &o) in pieces.iter().zip(&at) {
                host[o..o + p.len()].copy_from_slice(p);
            }
            let dev = |o: usize| base + o as u64;
            let sp = IndexScoreParams {
                tokens: int("tokens", n)?,
                heads: int("index_n_heads", heads)?,
                dim: int("index_head_dim", dim)?,
                block_size: int("block_size", q.block_size)?,
                table_stride: int("table_stride", q.stride)?,
                score_stride: int("score_stride", stride)?,
                row_bytes: int("row_bytes", dim + 4)?,
                pad0: 0,
                q: if q_host.is_empty() { q_dev } else { dev(at[3]) },
                w: if w_host.is_empty() { w_dev } else { dev(at[4]) },
                keys: q.keys,
                table: dev(at[0]),
                tok_seq: dev(at[1]),
                tok_len: dev(at[2]),
                scores: dev(scores_at),
            };
            let tp = IndexTopkParams {
                tokens: sp.tokens,
                topk: int("topk", topk)?,
                score_stride: sp.score_stride,
                block_size: sp.block_size,
                table_stride: sp.table_stride,
                pad0: 0,
                scores: sp.scores,
                table: sp.table,
                tok_seq: sp.tok_seq,
                tok_len: sp.tok_len,
                positions: dev(out_at),
                slots: 0,
            };
            let (positions, slots) = match &out {
                SelectOut::Host(_) => (dev(out_at), 0),
                SelectOut::Device { positions, slots } => {
                    let at = |p: u64| {
                        if p == 0 {
                            0
                        } else {
                            p + (4 * first * topk) as u64
                        }
                    };
                    (at(*positions), at(*slots))
                }
            };
            let tp = IndexTopkParams {
                positions,
                slots,
                ..tp
            };
            // Tensor cores take heads of a multiple of 16 values (V3.2's 128).
            let (score_fn, score_name, keys_per_block, score_threads) = if dim.is_multiple_of(16) {
                let name = "mla_index_score_mma";
                (self.index_score_mma, name, INDEX_MMA_KEYS, 128)
            } else {
                let name = "mla_index_score";
                (self.index_score, name, INDEX_SCORE_KEYS, INDEX_SCORE_KEYS)
            };
            let key_blocks = max_len.div_ceil(keys_per_block as usize).max(1);
            let key_blocks = u32::try_from(key_blocks)
                .map_err(|_| Error::internal("indexer context too long for one grid"))?;
            let grid = (key_blocks, n as u32);
            let stream = st.stream;
            let got = match &mut out {
                SelectOut::Host(o) => Some(&mut o[first * topk..(first + n) * topk]),
                SelectOut::Device { .. } => None,
            };
            guarded("the GPU indexer", || {
                // SAFETY: the staging area holds every piece carved above;
                // the copies and kernels are ordered on our stream and the
                // download waits for them; the params are copied at launch;
                // `q.keys` holds every slot the block tables name (the
                // caller's pool layer); device q and w are the caller's
                // engine memory of `[tokens, heads, dim]` and `[tokens,
                // heads]`, device outputs of `[tokens, topk]`.
                unsafe {
                    result::memcpy_htod_async(base, &host, stream)
                        .map_err(dev_err("cuMemcpyHtoDAsync"))?;
                    let name = score_name;
                    self.launch_one(score_fn, name, grid, score_threads, &sp, stream)?;
                    let threads = INDEX_TOPK_THREADS;
                    let name = "mla_index_topk";
                    self.launch_one(self.index_topk, name, (n as u32, 1), threads, &tp, stream)?;
                    if let Some(got) = got {
                        let bytes: &mut [u8] = bytemuck::cast_slice_mut(got);
                        result::memcpy_dtoh_async(bytes, tp.positions, stream)
                            .map_err(dev_err("cuMemcpyDtoHAsync"))?;
                        result::stream::synchronize(stream).map_err(dev_err("the GPU indexer"))?;
                    }
                    Ok(())
                }
            })?;
        }
        Ok(())
    }
}

/// Tokens `first..first + n` of host or device data of `per` f32 per token:
/// the host bytes (empty for device data) and the device address (0 for
/// host data).
fn pass_part(d: DataRef<'_>, first: usize, n: usize, per: usize) -> (&[u8], u64) {
    match d {
        DataRef::Host(h) => (&h[4 * first * per..4 * (first + n) * per], 0),
        DataRef::Device(p) => (&[], p + (4 * first * per) as u64),
    }
}
