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
//! `[0 | q_nope | q_pe]`, so `Q·Kᵀ` is `q_nope·K_nope + q_pe·k_pe` and the
//! zero part adds `2·v` FLOPs per key: 896 FLOPs per head, query and key
//! for V3 instead of 2176, the queries' absorption (`W_UK`) and the
//! outputs' (`W_UV`) disappear, and the keys of a call's tokens see exactly
//! the causal prefix they see in the absorbed form.

use super::linear::Linear;
use super::Model;
use crate::decode::desc::DecodeOutput;
use crate::decode::{Decode, DecodeShape, KvCache};
use crate::error::Result;
use crate::format::{load_slice, store_slice, Dtype, KvFormat, KvLayout};
use crate::kv::KvPool;
use rayon::prelude::*;

/// New tokens of a sequence from which a forward takes the expanded form
/// whatever the sequence's earlier context; a shorter chunk takes it when
/// its context is no longer than the chunk. Every sequence of a call must
/// qualify. Measured on one V3 layer (BENCHMARKS.md, "expanded prefill"):
/// after 2048 cached tokens, chunks of 32–128 tokens take the same time in
/// both forms; from an empty cache the expanded form is faster at every
/// length tried (8 to 2048 tokens).
pub const EXPANDED_MIN_TOKENS: usize = 128;

/// Heads per attention call: the temporary cache holds this many heads'
/// rows (`ctx · (v + nope + rope)` values each).
const HEAD_GROUP: usize = 16;

/// Block size of the temporary cache.
const BLOCK: usize = 64;

impl Model {
    /// The attention output `o [n, H, v]` (f32) of sequence `seq`'s `n`
    /// newest tokens in pool layer `pl`, whose rows are already appended,
    /// in the expanded form. `q [n, H, qk]` holds each token's queries
    /// as projected (`q_pe` not yet rotated), `pos` their positions;
    /// `adt` is the attention's operand dtype (bf16 over a bf16-valued
    /// cache, else f32), as in the absorbed form.
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
    ) -> Result<()> {
        let c = &self.config;
        let sc = &self.scratch;
        let (h, lora, rope) = (c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim);
        let (nope, v, qk) = (c.qk_nope_head_dim, c.v_head_dim, c.qk_head_dim());
        let (n, d_lat) = (pos.len(), c.d_qk());
        let ctx = pool.len(seq, pl)?;
        // Every cached row, then the latent parts packed for kv_b.
        let mut lat = sc.overwritten::<f32>(ctx * d_lat);
        pool.read_rows(seq, pl, &mut lat)?;
        let mut cl = sc.overwritten::<f32>(ctx * lora);
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
        let nb = ctx.div_ceil(BLOCK);
        let per_head = nope + v;
        for g0 in (0..h).step_by(HEAD_GROUP) {
            let gc = HEAD_GROUP.min(h - g0);
            // K_nope and V of these heads for every position.
            let mut kvh = sc.overwritten::<f32>(ctx * gc * per_head);
            kv_b.matmul_rows_with(g0 * per_head, gc * per_head, &cl, ctx, &mut kvh, sc);
            // Rows [V | K_nope | k_pe], head j's in blocks j·nb ..; slots
            // past ctx in a head's last block are never read.
            let mut cache = sc.overwritten::<u8>(gc * nb * BLOCK * d * es);
            cache
                .par_chunks_mut(BLOCK * d * es)
                .enumerate()
                .for_each(|(jb, blk)| {
                    let (j, b) = (jb / nb, jb % nb);
                    let mut row = vec![0f32; d];
                    for (slot, dst) in blk.chunks_exact_mut(d * es).enumerate() {
                        let p = b * BLOCK + slot;
                        if p >= ctx {
                            break;
                        }
                        let src = &kvh[(p * gc + j) * per_head..][..per_head];
                        row[..v].copy_from_slice(&src[nope..]);
                        row[v..v + nope].copy_from_slice(&src[..nope]);
                        row[v + nope..].copy_from_slice(&lat[p * d_lat + lora..][..rope]);
                        store_slice(adt, &row, dst);
                    }
                });
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
            let table: Vec<i32> = (0..(gc * nb) as i32).collect();
            let seqlens = vec![ctx as i32; gc];
            let shape = DecodeShape::new(
                gc as i32,
                n as i32,
                1,
                d as i32,
                v as i32,
                c.softmax_scale() as f32,
                true,
            )?;
            let kv = KvCache::new(layout, &cache, gc * nb)?;
            let dec = Decode::dense(shape, adt, &qb, kv, &table, nb, &seqlens)?;
            let mut ob = sc.overwritten::<u8>(gc * n * v * es);
            let mut out = DecodeOutput::new(&shape, adt, &mut ob, None)?;
            self.engine.decode(&dec, &mut out)?;
            // [head, token, v] into o [token, H, v].
            o[..n * h * v]
                .par_chunks_mut(h * v)
                .enumerate()
                .for_each(|(t, ot)| {
                    for j in 0..gc {
                        let src = &ob[(j * n + t) * v * es..][..v * es];
                        load_slice(adt, src, &mut ot[(g0 + j) * v..][..v]);
                    }
                });
        }
        Ok(())
    }
}
