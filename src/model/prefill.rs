//! Prefill chunks in DeepSeek's expanded form (`inference/model.py`, class
//! `MLA`, `attn_impl = "naive"`), on the CPU. The absorbed form attends
//! with 576-value rows shared by all heads: `2·(d_qk + d_v)` = 2176 FLOPs
//! per head, query and key for DeepSeek-V3. For a chunk of many tokens it
//! is cheaper to up-project each cached latent row once per call
//! (`kv_b_proj`: K_nope and V of every head, `2·H·(nope + v)·kv_lora`
//! FLOPs per key) and let each head attend as plain multi-head attention
//! over rows of `nope + rope` dims with its own `v`-dim V.
//!
//! The attention reuses the engine's MLA decode kernel, whose V is the
//! first `d_v` values of each key row: each head becomes one sequence of a
//! batch, with rows `[V | K_nope | k_pe]` in a temporary cache and queries
//! `[0 | q_nope | q_pe]`, so `Q·Kᵀ` is `q_nope·K_nope + q_pe·k_pe`; the
//! kernel is told the zero part is zero and leaves it out: 640 FLOPs per
//! head, query and key for V3 instead of 2176. The queries' absorption
//! (`W_UK`) and the outputs' (`W_UV`) disappear, and the keys of a call's
//! tokens see exactly the causal prefix they see in the absorbed form.
//!
//! A forward of several passes keeps the rows it builds (`KeptKeys`),
//! so later passes up-project only their own positions.

use super::config::ModelConfig;
use super::linear::Linear;
use super::Model;
use crate::decode::desc::DecodeOutput;
use crate::decode::{Decode, DecodeShape, KvCache};
use crate::error::{Error, Result};
use crate::format::{load_slice, store_slice, Dtype, KvFormat, KvLayout};
use crate::kv::KvPool;
use rayon::prelude::*;

/// New tokens of a sequence from which a forward takes the expanded form
/// whatever the sequence's earlier context; a shorter chunk takes it when
/// its context is no longer than the chunk (decided per sequence of a
/// call). Measured on one V3 layer (BENCHMARKS.md, "expanded prefill"):
/// after 2048 cached tokens, chunks of 32–128 tokens take the same time in
/// both forms; from an empty cache the expanded form is faster at every
/// length tried (8 to 2048 tokens).
pub const EXPANDED_MIN_TOKENS: usize = 128;

/// Heads per attention call: the temporary cache holds this many heads'
/// rows.
const HEAD_GROUP: usize = 16;

/// Cached positions up-projected at a time. The temporaries then stay
/// bounded whatever the context (about 130 MB for V3: K_nope and V of 16
/// heads in f32, their rows in bf16, the latent rows); longer contexts
/// run in chunks of keys whose results merge by their log-sum-exp.
pub const KEY_CHUNK: usize = 4096;

/// Block size of the temporary cache.
const BLOCK: usize = 64;

impl Model {
    /// Whether pool layer `pl` can attend in the expanded form: CPU
    /// projections on a CPU engine, no V3.2 indexer, and rows
    /// `[V | K_nope | k_pe]` within the kernel's head-dim limit.
    pub(super) fn can_expand(&self, pl: usize) -> bool {
        let c = &self.config;
        self.device.get(pl).is_none()
            && self.engine.backend().cuda().is_none()
            && self.layers[pl].indexer.is_none()
            && c.v_head_dim + c.qk_head_dim() <= crate::decode::desc::MAX_HEAD_DIM
    }

    /// The attention output `o [n, H, v]` (f32) of sequence `seq`'s `n`
    /// newest tokens in pool layer `pl`, whose rows are already appended,
    /// in the expanded form. `q [n, H, qk]` holds each token's queries
    /// as projected (`q_pe` not yet rotated), `pos` their positions;
    /// `adt` is the attention's operand dtype (bf16 over a bf16-valued
    /// cache, else f32), as in the absorbed form. With `kept` (for this
    /// sequence and `adt`) the positions it may hold come from it, and
    /// only those it does not hold yet are up-projected, into it; the
    /// other positions are up-projected `key_chunk` (at least `n`) at a
    /// time into temporaries, and the chunks merge by log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn expanded_attention(
        &self,
        kv_b: &Linear,
        pool: &KvPool,
        pl: i64,
        seq: u64,
        (q, pos): (&[f32], &[usize]),
        adt: Dtype,
        o: &mut [f32],
        key_chunk: usize,
        kept: Option<&mut KeptKeys>,
    ) -> Result<()> {
        let c = &self.config;
        let sc = &self.scratch;
        let h = c.num_heads;
        let n = pos.len();
        let ctx = pool.len(seq, pl)?;
        let kept = kept.filter(|k| k.seq == seq && k.adt == adt);
        if n > ctx || kept.as_ref().is_some_and(|k| k.len > ctx) {
            return Err(Error::internal(format!(
                "expanded attention of {n} tokens over {ctx} positions"
            )));
        }
        // The kept rows: the whole context when they may hold it, else
        // their first positions up to the first new token (seen whole).
        let mut parts = Vec::new();
        let mut first = 0;
        if let Some(k) = kept {
            first = if ctx <= k.limit {
                ctx
            } else {
                k.limit.min(ctx - n)
            };
            if first > 0 {
                parts.push(KeyRows::Kept(k, first));
            }
        }
        if first < ctx && n > key_chunk {
            return Err(Error::internal(format!(
                "expanded attention of {n} tokens in chunks of {key_chunk} positions"
            )));
        }
        // The other positions in chunks, ordered from the end: the last
        // one holds every new position, so its causal mask is the
        // kernel's (query i sees the chunk's keys up to its own position);
        // earlier chunks lie before every new token and are seen whole.
        let mut k1 = ctx;
        while k1 > first {
            let k0 = k1.saturating_sub(key_chunk).max(first);
            parts.push(KeyRows::Chunk(k0..k1));
            k1 = k0;
        }
        // One part writes `o` as it is; more merge into it, with each
        // (token, head)'s log-sum-exp so far in `lse`.
        // (+inf, FlashMLA's value for no key, until a part is merged.)
        let mut lse = sc.overwritten::<f32>(if parts.len() > 1 { n * h } else { 0 });
        lse.fill(f32::INFINITY);
        for keys in parts {
            let merge = (!lse.is_empty()).then_some(&mut lse[..]);
            self.expanded_chunk(kv_b, pool, pl, seq, keys, ctx, (q, pos), adt, o, merge)?;
        }
        Ok(())
    }

    /// One chunk of keys of [`Self::expanded_attention`] (of `ctx`
    /// positions). `merge`: None writes `o`; else this chunk's results
    /// merge into `o` and `lse [n, H]` ([`merge_by_lse`]).
    #[allow(clippy::too_many_arguments)]
    fn expanded_chunk(
        &self,
        kv_b: &Linear,
        pool: &KvPool,
        pl: i64,
        seq: u64,
        keys: KeyRows<'_>,
        ctx: usize,
        (q, pos): (&[f32], &[usize]),
        adt: Dtype,
        o: &mut [f32],
        merge: Option<&mut [f32]>,
    ) -> Result<()> {
        // The chunk's positions, and those whose rows are built here.
        let (range, new) = match &keys {
            KeyRows::Chunk(r) => (r.clone(), r.clone()),
            KeyRows::Kept(k, end) => (0..*end, k.len.min(*end)..*end),
        };
        // The new positions' cached rows, read under the pool's lock on
        // this thread; the rest runs on the engine's workers, which must
        // never wait for a pool lock (see forward_staged).
        let mut lat = self
            .scratch
            .overwritten::<f32>(new.len() * self.config.d_qk());
        pool.read_rows(seq, pl, new.clone(), &mut lat)?;
        self.engine.install(|| {
            let rows = (range, new);
            self.expanded_rows_attend(kv_b, keys, rows, ctx, (q, pos), adt, o, merge, &lat)
        })
    }

    /// [`Self::expanded_chunk`] once the new positions' cached rows `lat`
    /// are read: builds the key rows of `range` (those of `new` here),
    /// attends, and writes or merges `o`.
    #[allow(clippy::too_many_arguments)]
    fn expanded_rows_attend(
        &self,
        kv_b: &Linear,
        mut keys: KeyRows<'_>,
        (range, new): (std::ops::Range<usize>, std::ops::Range<usize>),
        ctx: usize,
        (q, pos): (&[f32], &[usize]),
        adt: Dtype,
        o: &mut [f32],
        mut merge: Option<&mut [f32]>,
        lat: &[f32],
    ) -> Result<()> {
        let c = &self.config;
        let sc = &self.scratch;
        let (h, lora, rope) = (c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim);
        let (nope, v, qk) = (c.qk_nope_head_dim, c.v_head_dim, c.qk_head_dim());
        let d_lat = c.d_qk();
        let (n, len, fresh) = (pos.len(), range.len(), new.len());
        // The new positions' latent parts, for kv_b.
        let mut cl = sc.overwritten::<f32>(fresh * lora);
        cl.par_chunks_mut(lora)
            .zip(lat.par_chunks(d_lat))
            .for_each(|(dst, row)| dst.copy_from_slice(&row[..lora]));

        let d = v + nope + rope;
        let es = adt.size();
        let format = match adt {
            Dtype::Bf16 => KvFormat::Bf16,
            _ => KvFormat::F32,
        };
        let layout = KvLayout::new(format, d, BLOCK, "expanded prefill cache")?;
        let nb = len.div_ceil(BLOCK);
        let per_head = nope + v;
        for (gi, g0) in (0..h).step_by(HEAD_GROUP).enumerate() {
            let gc = HEAD_GROUP.min(h - g0);
            // One block of each of the group's heads per block row: the
            // blocks of a growing context are appended.
            let row_bytes = gc * BLOCK * d * es;
            let mut temp;
            let cache: &mut [u8] = match &mut keys {
                KeyRows::Chunk(_) => {
                    temp = sc.overwritten::<u8>(nb * row_bytes);
                    &mut temp
                }
                KeyRows::Kept(k, _) => {
                    let buf = &mut k.groups[gi];
                    crate::backend::try_grow(buf, "kept prefill keys", nb * row_bytes)?;
                    &mut buf[..nb * row_bytes]
                }
            };
            #[cfg(test)]
            if gi == 0 {
                self.up_projected
                    .fetch_add(fresh, std::sync::atomic::Ordering::Relaxed);
            }
            if fresh > 0 {
                // K_nope and V of these heads for every new position.
                let mut kvh = sc.overwritten::<f32>(fresh * gc * per_head);
                kv_b.matmul_rows_with(g0 * per_head, gc * per_head, &cl, fresh, &mut kvh, sc);
                // Rows [V | K_nope | k_pe]; slots past the chunk in a
                // head's last block are never read.
                let b0 = (new.start - range.start) / BLOCK;
                cache[b0 * row_bytes..]
                    .par_chunks_mut(row_bytes)
                    .enumerate()
                    .for_each(|(bi, blocks)| {
                        let first = range.start + (b0 + bi) * BLOCK;
                        let slots = first.max(new.start)..(first + BLOCK).min(new.end);
                        for (j, blk) in blocks.chunks_exact_mut(BLOCK * d * es).enumerate() {
                            for p in slots.clone() {
                                let dst = &mut blk[(p - first) * d * es..][..d * es];
                                let f = p - new.start;
                                let src = &kvh[(f * gc + j) * per_head..][..per_head];
                                let (dv, rest) = dst.split_at_mut(v * es);
                                let (dn, dr) = rest.split_at_mut(nope * es);
                                store_slice(adt, &src[nope..], dv);
                                store_slice(adt, &src[..nope], dn);
                                store_slice(adt, &lat[f * d_lat + lora..][..rope], dr);
                            }
                        }
                    });
            }
            // Queries [head, token, 1, d]: [0 | q_nope | RoPE(q_pe)].
            let mut qb = sc.overwritten::<u8>(gc * n * d * es);
            qb.par_chunks_mut(d * es).enumerate().for_each(|(jt, dst)| {
                let (j, t) = (jt / n, jt % n);
                let src = &q[(t * h + g0 + j) * qk..][..qk];
                let mut row = vec![0f32; d];
                row[v..].copy_from_slice(src);
                self.rope.apply(&mut row[v + nope..], pos[t]);
                store_slice(adt, &row, dst);
            });
            // Head j's blocks: j, gc + j, 2 gc + j, ...
            let table: Vec<i32> = (0..gc)
                .flat_map(|j| (0..nb).map(move |b| (b * gc + j) as i32))
                .collect();
            let seqlens = vec![len as i32; gc];
            let shape = DecodeShape::new(
                gc as i32,
                n as i32,
                1,
                d as i32,
                v as i32,
                c.softmax_scale() as f32,
                range.end == ctx,
            )?;
            let kv = KvCache::new(layout, cache, gc * nb)?;
            // The queries' V part is zero: the kernel leaves it out of Q·Kᵀ.
            let dec = Decode::dense(shape, adt, &qb, kv, &table, nb, &seqlens)?
                .with_zero_query_prefix(v)?;
            let mut ob = sc.overwritten::<u8>(gc * n * v * es);
            // [head, 1, token]: the chunk's log-sum-exp, when merging.
            let mut lse_c = sc.overwritten::<f32>(if merge.is_some() { gc * n } else { 0 });
            let mut out = DecodeOutput::new(
                &shape,
                adt,
                &mut ob,
                merge.is_some().then_some(&mut lse_c[..]),
            )?;
            self.engine.decode(&dec, &mut out)?;
            // [head, token, v] into o [token, H, v].
            match merge.as_deref_mut() {
                None => o[..n * h * v]
                    .par_chunks_mut(h * v)
                    .enumerate()
                    .for_each(|(t, ot)| {
                        for j in 0..gc {
                            let src = &ob[(j * n + t) * v * es..][..v * es];
                            load_slice(adt, src, &mut ot[(g0 + j) * v..][..v]);
                        }
                    }),
                Some(lse) => o[..n * h * v]
                    .par_chunks_mut(h * v)
                    .zip(lse.par_chunks_mut(h))
                    .enumerate()
                    .for_each(|(t, (ot, lt))| {
                        let mut part = vec![0f32; v];
                        for j in 0..gc {
                            load_slice(adt, &ob[(j * n + t) * v * es..][..v * es], &mut part);
                            let acc = &mut ot[(g0 + j) * v..][..v];
                            merge_by_lse(acc, &mut lt[g0 + j], &part, lse_c[j * n + t]);
                        }
                    }),
            }
        }
        if let KeyRows::Kept(k, end) = keys {
            k.len = k.len.max(end);
        }
        Ok(())
    }
}

/// Where a chunk's key rows are built: temporaries for the positions of a
/// chunk, or the rows a sequence keeps between passes (its positions
/// before the given end).
enum KeyRows<'k> {
    Chunk(std::ops::Range<usize>),
    Kept(&'k mut KeptKeys, usize),
}

/// The default of [`Model::kept_keys_bytes`](super::Model): the most
/// bytes of up-projected keys a forward keeps between its passes (80 KB a
/// position for V3 over a bf16-valued pool: 13,056 positions, in whole
/// blocks). The positions of a longer context past those are up-projected
/// again in each pass, in chunks of [`KEY_CHUNK`].
pub const KEPT_KEYS_BYTES: usize = 1 << 30;

/// The up-projected key rows `[V | K_nope | k_pe]` of every head for the
/// first `len` positions of one sequence, kept between the passes of one
/// forward so each pass up-projects only its own new positions (those
/// within `limit`).
pub(crate) struct KeptKeys {
    seq: u64,
    adt: Dtype,
    /// Positions whose rows are built.
    len: usize,
    /// Positions it may hold ([`kept_positions`]).
    limit: usize,
    /// Per group of [`HEAD_GROUP`] heads, blocks of [`BLOCK`] rows; it
    /// grows with the context.
    groups: Vec<Vec<u8>>,
}

impl KeptKeys {
    /// The sequence whose keys these are.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Room for the first `limit` positions of `seq` ([`kept_positions`]),
    /// attended with `adt`. Memory is taken as the context grows.
    pub(crate) fn new(config: &ModelConfig, seq: u64, limit: usize, adt: Dtype) -> Self {
        KeptKeys {
            seq,
            adt,
            len: 0,
            limit,
            groups: vec![Vec::new(); config.num_heads.div_ceil(HEAD_GROUP)],
        }
    }
}

/// How many of the first positions of a `context` attended with `adt`
/// [`KeptKeys`] may hold: all of them if their rows fit in `budget` bytes,
/// else as many whole blocks as fit.
pub(crate) fn kept_positions(
    config: &ModelConfig,
    context: usize,
    adt: Dtype,
    budget: usize,
) -> usize {
    let d = config.v_head_dim + config.qk_head_dim();
    let per_block = BLOCK * config.num_heads * d * adt.size();
    context.min(budget / per_block * BLOCK)
}

/// Merges attention results over two disjoint sets of keys: `acc` with
/// log-sum-exp `acc_lse` and `part` with `part_lse`, into `acc`/`acc_lse`.
/// A side that saw no key has lse = +inf (FlashMLA's value) and adds
/// nothing; `acc` is then not read.
fn merge_by_lse(acc: &mut [f32], acc_lse: &mut f32, part: &[f32], part_lse: f32) {
    if !part_lse.is_finite() {
        return;
    }
    if !acc_lse.is_finite() {
        acc.copy_from_slice(part);
        *acc_lse = part_lse;
        return;
    }
    let m = acc_lse.max(part_lse);
    let (a, b) = ((*acc_lse - m).exp(), (part_lse - m).exp());
    let total = a + b;
    for (x, &y) in acc.iter_mut().zip(part) {
        *x = (a * *x + b * y) / total;
    }
    *acc_lse = m + total.ln();
}

#[cfg(test)]
mod tests {
    use crate::engine::{Engine, EngineOptions};
    use crate::format::{Dtype, KvFormat};
    use crate::kv::{KvPool, PoolOptions};
    use crate::model::gen::{generate, uniform, GenOptions, Preset, WeightDtype};
    use crate::model::{LoadOptions, Model};
    use std::sync::Arc;

    /// A tiny one-layer bf16 model (`seed`, YaRN or not) on a default engine.
    fn tiny_model(name: &str, seed: u64, yarn: bool) -> Model {
        let engine = Arc::new(Engine::new(&EngineOptions::default()).unwrap());
        let dir = std::env::temp_dir().join(format!("mlart-{name}-{}", std::process::id()));
        let gen = GenOptions {
            preset: Preset::Tiny,
            dtype: WeightDtype::Bf16,
            layers: 1,
            seed,
            shards: 1,
            yarn,
        };
        generate(&dir, &gen).unwrap();
        let model = Model::load(engine, &dir, LoadOptions::default()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        model
    }

    /// A one-layer pool for `model` with sequences `seqs`.
    fn pool_for(model: &Model, format: KvFormat, blocks: (usize, usize), seqs: &[u64]) -> KvPool {
        let pool = KvPool::new(
            model.engine.clone(),
            PoolOptions {
                format,
                d_qk: model.config.d_qk(),
                num_layers: 1,
                block_size: blocks.0,
                num_blocks: blocks.1,
                index_dim: 0,
            },
        )
        .unwrap();
        for &s in seqs {
            pool.create_seq(s).unwrap();
        }
        pool
    }

    /// `‖got − want‖ / ‖want‖`.
    fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
        let (mut d, mut m) = (0f64, 0f64);
        for (a, b) in got.iter().zip(want) {
            d += ((a - b) as f64).powi(2);
            m += (*b as f64).powi(2);
        }
        (d / m).sqrt()
    }

    /// Keys in chunks (merged by log-sum-exp) give what one chunk gives:
    /// chunk lengths that divide the context, that do not, and that equal
    /// the new tokens; over F32 and BF16 pools.
    #[test]
    fn key_chunks_merge_to_one_pass() {
        let model = tiny_model("key-chunks", 5, true);
        let c = &model.config;
        let (h, qk, v) = (c.num_heads, c.qk_head_dim(), c.v_head_dim);
        let (ctx, n) = (60usize, 20usize);
        for (format, adt, tol) in [
            (KvFormat::F32, Dtype::F32, 1e-5),
            // Each chunk's output is rounded to bf16 before the merge.
            (KvFormat::Bf16, Dtype::Bf16, 1e-2),
        ] {
            let pool = pool_for(&model, format, (16, 8), &[1]);
            let x = uniform(ctx * c.hidden_size, 9);
            model.forward(&pool, 0, &[1], &[ctx], &x).unwrap();
            let q = uniform(n * h * qk, 10);
            let pos: Vec<usize> = (ctx - n..ctx).collect();
            let run = |key_chunk: usize| {
                let mut o = vec![f32::NAN; n * h * v];
                model
                    .expanded_attention(
                        model.layers[0].absorbed.kv_b(),
                        &pool,
                        0,
                        1,
                        (&q, &pos),
                        adt,
                        &mut o,
                        key_chunk,
                        None,
                    )
                    .map(|()| o)
            };
            let whole = run(super::KEY_CHUNK).unwrap();
            assert!(whole.iter().all(|x| x.is_finite()));
            for key_chunk in [20usize, 23, 59] {
                let e = rel_l2(&run(key_chunk).unwrap(), &whole);
                assert!(e <= tol, "{format:?} chunks of {key_chunk}: rel L2 {e:.2e}");
            }
            // Fewer keys per chunk than new tokens is refused, not wrong.
            assert!(run(n - 1).is_err());
        }
    }

    /// A forward of several passes gives the same result whether each
    /// pass up-projects only its own positions (keys kept), the positions
    /// past the first 640 (part kept) or its whole context (none kept),
    /// in chunks, in passes that grow: one sequence after an earlier
    /// context and one from empty, F32 and BF16 pools. The kept path is checked against the float64 reference in
    /// the model suite (`long_forward_runs_in_passes`).
    #[test]
    fn kept_keys_give_what_passes_without_them_give() {
        let mut model = tiny_model("kept-keys", 6, false);
        let c = model.config.clone();
        let hid = c.hidden_size;
        let (early, n) = ([300usize, 0], [1500usize, 1100]);
        // V3 keeps a context of 8192 positions, not one of 16384.
        let v3 = super::ModelConfig {
            num_heads: 128,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            ..c.clone()
        };
        let v3_kept = |ctx| super::kept_positions(&v3, ctx, Dtype::Bf16, super::KEPT_KEYS_BYTES);
        assert_eq!(v3_kept(8192), 8192);
        assert_eq!(v3_kept(16384), 13056);
        for (format, tol) in [(KvFormat::F32, 1e-5), (KvFormat::Bf16, 2e-2)] {
            // The output, and the positions the second call up-projected.
            let mut run = |budget: usize| {
                model.kept_keys_bytes = budget;
                let pool = pool_for(&model, format, (64, 64), &[1, 2]);
                let x0 = uniform(early[0] * hid, 11);
                model.forward(&pool, 0, &[1], &[early[0]], &x0).unwrap();
                let x = uniform((n[0] + n[1]) * hid, 12);
                let count = || {
                    model
                        .up_projected
                        .load(std::sync::atomic::Ordering::Relaxed)
                };
                let before = count();
                let y = model.forward(&pool, 0, &[1, 2], &n, &x).unwrap();
                (y, count() - before)
            };
            let (kept, once) = run(super::KEPT_KEYS_BYTES);
            // Every position up-projected once at most: the 300 earlier
            // ones in the first pass, each new one in its own (but those of
            // sequence 2's last pass, 76 tokens, which attends in the
            // absorbed form).
            assert_eq!(once, early[0] + n[0] + n[1] - 76, "{format:?}: all kept");
            assert!(kept.iter().all(|x| x.is_finite()));
            // 640 positions kept: both sequences keep part of theirs.
            let adt = super::super::forward::attention_dtype(format);
            let per_block = super::BLOCK * c.num_heads * (c.v_head_dim + c.qk_head_dim());
            for (budget, what) in [(0, "none"), (10 * per_block * adt.size(), "640 positions")] {
                let (y, count) = run(budget);
                assert!(
                    count > once,
                    "{format:?}: {what} kept, yet {count} positions up-projected"
                );
                let e = rel_l2(&y, &kept);
                assert!(
                    e <= tol,
                    "{format:?}: {what} kept against all, rel L2 {e:.2e}"
                );
            }
        }
    }
}
