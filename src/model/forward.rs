//! The MLA layer forward in DeepSeek-V3's absorbed form
//! (`inference/model.py`, class `MLA`, `attn_impl = "absorb"`), except
//! that prefill chunks on the CPU attend in the expanded form
//! (`super::prefill`):
//! `q = q_b(RMSNorm(q_a(x)))` (or `q_proj(x)`), `kv = kv_a(x)`,
//! `c = RMSNorm(kv[:lora])`, `k_pe = RoPE(kv[lora:])`, append `[c | k_pe]`,
//! `q_lat = q_nope · W_UK`, attention over the cache (causal inside the
//! chunk), `o = W_UV · o_lat`, `o_proj`. A DeepSeek-V3.2 layer also runs
//! its indexer (`super::indexer`): the new tokens' indexer keys go into the
//! pool with their rows, and a token with more than `index_topk` earlier
//! positions attends (sparse) to the ones the indexer picks.

use super::device::{self, DeviceLayer, ProjWeight};
use super::linear::{rms_norm, Linear};
use super::prefill::{kept_positions, KeptKeys};
use super::{Model, QProj};
use crate::backend::cuda::linear::LinearCall;
use crate::decode::desc::DecodeOutput;
use crate::decode::DecodeShape;
use crate::error::{Error, Result};
use crate::format::{load_slice, store_slice, Dtype, KvFormat};
use crate::kv::KvPool;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Tokens per pass of a forward: longer calls run in passes of at most this
/// many tokens of one sequence (see `forward_in_passes`). With keys kept
/// between passes, an 8192-token prefill of one V3 layer took 22.9–23.9 s
/// in passes of 256, 384 or 512 tokens, 25.0–25.6 s in 1024 and
/// 26.3–27.3 s in 2048 (peak RSS 1.59, 1.63, 1.68, 1.83–1.86, 2.17 GB).
pub(crate) const PASS_TOKENS: usize = 512;

/// The most tokens of a pass that grows with its context.
const MAX_PASS_TOKENS: usize = 2048;

/// The operand dtype of the attention over a pool of `format`: over a
/// cache whose values are bf16 (BF16, FP8 with power-of-two scales) the
/// queries and outputs are bf16, as DeepSeek's reference and FlashMLA's
/// kernels take them, so Q·Kᵀ and P·V run on the bf16 dot-product units;
/// an F32/F16 cache keeps f32.
pub(super) fn attention_dtype(format: KvFormat) -> Dtype {
    match format {
        KvFormat::Bf16 | KvFormat::Fp8V32 | KvFormat::Fp8Model1 => Dtype::Bf16,
        _ => Dtype::F32,
    }
}

/// Tokens of a pass after `context` earlier ones. Passes in the expanded
/// form whose context is past what their kept keys hold (`kept`: Some of
/// the positions kept) up-project the rest of their context again, so
/// they take half that rest (from [`PASS_TOKENS`] up to
/// [`MAX_PASS_TOKENS`]). Measured on one V3 layer, before keys were kept:
/// an 8192-token prefill took 40–41.5 s in 512-token passes and 33.9 s in
/// 2048-token ones (peak RSS 1.19 against 1.61 GB), a 2048-token prefill
/// 4.7 s in 512-token passes and 5.1 s in one.
fn pass_tokens(context: usize, kept: Option<usize>) -> usize {
    match kept {
        Some(kept) => (context.saturating_sub(kept) / 2).clamp(PASS_TOKENS, MAX_PASS_TOKENS),
        None => PASS_TOKENS,
    }
}

impl Model {
    /// Runs layer `layer` (absolute index) for sequences `seqs`, each with
    /// `n_tokens[i] >= 1` new tokens whose hidden states are consecutive
    /// rows of `x [total, hidden]`. Token positions continue each
    /// sequence's length in pool layer `layer - first_layer`; the new
    /// `[c | k_pe]` rows are appended there. Returns `[total, hidden]`.
    /// On error the pool is left as it was.
    pub fn forward(
        &self,
        pool: &KvPool,
        layer: i64,
        seqs: &[u64],
        n_tokens: &[usize],
        x: &[f32],
    ) -> Result<Vec<f32>> {
        self.forward_with(pool, layer, seqs, n_tokens, x, None)
    }

    /// [`Self::forward`]; for a DeepSeek-V3.2 model `index_out`, if given,
    /// receives per new token the positions it attended to
    /// `[total, index_topk]` (ascending, -1 after the last).
    pub fn forward_with(
        &self,
        pool: &KvPool,
        layer: i64,
        seqs: &[u64],
        n_tokens: &[usize],
        x: &[f32],
        index_out: Option<&mut [i32]>,
    ) -> Result<Vec<f32>> {
        let plan = self.plan(pool, layer, seqs, n_tokens, index_out.as_deref())?;
        if x.len() < plan.total * self.config.hidden_size {
            return Err(Error::internal("x is smaller than [total_tokens, hidden]"));
        }
        if plan.total > PASS_TOKENS {
            return self.forward_in_passes(pool, layer, &plan, x, index_out);
        }
        self.forward_pass(pool, &plan, x, index_out, None)
    }

    /// One pass of a forward: all of `plan`'s tokens at once. `kept`: the
    /// up-projected keys of a sequence's earlier passes, if kept.
    fn forward_pass(
        &self,
        pool: &KvPool,
        plan: &Plan,
        x: &[f32],
        index_out: Option<&mut [i32]>,
        kept: Option<&mut KeptKeys>,
    ) -> Result<Vec<f32>> {
        // The layer's projection weights on the GPU, if they are there.
        let dl = self.device.get(plan.pl as usize);
        if let Some((cuda, d)) = self.resident_on(dl, pool) {
            let x = super::resident::Hidden::Host(x);
            return self.forward_resident(cuda, d, pool, plan, x, index_out);
        }
        let lw = &self.layers[plan.pl as usize];
        self.forward_staged(lw, dl, pool, plan, x, index_out, kept)
    }

    /// Checks a forward's pool, layer, sequences and `index_out` against
    /// the model, and lays out its tokens.
    pub(super) fn plan<'a>(
        &self,
        pool: &KvPool,
        layer: i64,
        seqs: &'a [u64],
        n_tokens: &'a [usize],
        index_out: Option<&[i32]>,
    ) -> Result<Plan<'a>> {
        self.layer(layer)?;
        let c = &self.config;
        let pl = layer - self.first_layer as i64;
        let po = pool.options();
        let want_dim = c.indexer.map_or(0, |ix| ix.head_dim);
        if po.index_dim != want_dim {
            return Err(Error::invalid(match c.indexer {
                Some(_) => format!(
                    "pool index_head_dim = {} but this DeepSeek-V3.2 model's indexer keys have index_head_dim = {want_dim}: create the pool with that index_head_dim",
                    po.index_dim
                ),
                None => format!(
                    "pool index_head_dim = {} but this model ({}) has no sparse-attention indexer: create the pool with index_head_dim = 0",
                    po.index_dim, c.model_type
                ),
            }));
        }
        if po.d_qk != c.d_qk() {
            return Err(Error::invalid(format!(
                "pool d_qk = {} but this model's cache rows are kv_lora_rank + qk_rope_head_dim = {}",
                po.d_qk,
                c.d_qk()
            )));
        }
        if pl as usize >= po.num_layers {
            return Err(Error::invalid(format!(
                "layer = {layer} is pool layer {pl} (layer - first_layer {}), but the pool has {} layer(s)",
                self.first_layer, po.num_layers
            )));
        }
        for (i, &id) in seqs.iter().enumerate() {
            if seqs[..i].contains(&id) {
                return Err(Error::invalid(format!(
                    "seq_ids[{i}] = {id} appears twice in one forward"
                )));
            }
            if n_tokens[i] == 0 {
                return Err(Error::invalid(format!("n_tokens[{i}] = 0 must be >= 1")));
            }
        }
        let total: usize = n_tokens.iter().sum();
        if let Some(io) = index_out {
            let topk = c.indexer.map_or(0, |ix| ix.topk);
            if c.indexer.is_none() || io.len() < total * topk {
                return Err(Error::internal(
                    "index_out is not [total_tokens, index_topk]",
                ));
            }
        }
        let start: Vec<usize> = seqs
            .iter()
            .map(|&s| pool.len(s, pl))
            .collect::<Result<_>>()?;
        let mut first_tok = Vec::with_capacity(seqs.len());
        let mut acc = 0;
        for &n in n_tokens {
            first_tok.push(acc);
            acc += n;
        }
        let pos: Vec<usize> = (0..seqs.len())
            .flat_map(|b| (0..n_tokens[b]).map(move |k| (b, k)))
            .map(|(b, k)| start[b] + k)
            .collect();
        Ok(Plan {
            pl,
            seqs,
            n_tokens,
            start,
            first_tok,
            pos,
            total,
        })
    }

    /// The forward on the CPU, or with each GPU projection staged.
    #[allow(clippy::too_many_arguments)]
    fn forward_staged(
        &self,
        lw: &super::LayerWeights,
        dl: Option<&DeviceLayer>,
        pool: &KvPool,
        plan: &Plan,
        x: &[f32],
        mut index_out: Option<&mut [i32]>,
        mut kept: Option<&mut KeptKeys>,
    ) -> Result<Vec<f32>> {
        let cuda = self.engine.backend().cuda();
        let (pl, seqs, n_tokens, total) = (plan.pl, plan.seqs, plan.n_tokens, plan.total);
        let (start, first_tok, pos) = (&plan.start[..], &plan.first_tok[..], &plan.pos[..]);
        let c = &self.config;
        let po = pool.options();
        let want_dim = c.indexer.map_or(0, |ix| ix.head_dim);
        let hid = c.hidden_size;
        let (h, lora) = (c.num_heads, c.kv_lora_rank);
        let (nope, v, qk) = (c.qk_nope_head_dim, c.v_head_dim, c.qk_head_dim());
        let d_qk = c.d_qk();
        let eps = c.rms_norm_eps as f32;
        // Prefill chunks on the CPU attend in the expanded form
        // (`super::prefill`), decided per sequence: a call that mixes
        // prefill chunks and decode steps runs both forms.
        let can_expand = self.can_expand(pl as usize);
        let expanded: Vec<bool> = n_tokens
            .iter()
            .zip(start)
            .map(|(&n, &p)| can_expand && (n >= super::prefill::EXPANDED_MIN_TOKENS || p <= n))
            .collect();
        let all_expanded = expanded.iter().all(|&e| e);
        let any_expanded = expanded.iter().any(|&e| e);

        // Every buffer below is written in full before it is read.
        let sc = &self.scratch;
        // The projections run on the engine's workers, and the pool calls
        // (append, attention, the indexer's keys) on this thread: a worker
        // must never wait for a pool lock. A pool call that holds its lock
        // while the workers compute (a decode) would otherwise deadlock
        // with a worker that, between two pieces of that computation,
        // picked up another forward's append and waited for the lock.
        let (q, ix, kv, qf) = self.engine.install(|| -> Result<_> {
            // Queries, and the indexer's (V3.2), which start from the
            // same normed q_a output.
            let mut q = sc.overwritten::<f32>(total * h * qk);
            let mut ix = None;
            match &lw.q {
                QProj::Lora { a, norm, b } => {
                    let mut qa = sc.overwritten::<f32>(total * a.out);
                    self.project(a, dl.and_then(DeviceLayer::q_a), x, total, &mut qa)?;
                    rms_norm(&mut qa, norm, eps);
                    self.project(b, dl.and_then(DeviceLayer::q_b), &qa, total, &mut q)?;
                    if let Some(idx) = &lw.indexer {
                        ix = Some(idx.prepare(&x[..total * hid], &qa, pos, &self.rope, sc));
                    }
                }
                QProj::Direct(w) => {
                    self.project(w, dl.and_then(DeviceLayer::q_direct), x, total, &mut q)?
                }
            }
            // Latent KV and its rope part.
            let mut kv = sc.overwritten::<f32>(total * d_qk);
            self.project(&lw.kv_a, dl.map(|d| &d.kv_a), x, total, &mut kv)?;
            kv.par_chunks_mut(d_qk)
                .zip(pos.par_iter())
                .for_each(|(row, &p)| {
                    rms_norm(&mut row[..lora], &lw.kv_norm, eps);
                    self.rope.apply(&mut row[lora..], p);
                });
            // Absorbed queries [total, H, lora + rope]: q_lat = q_nope · W_UK,
            // rope'd q_pe. The expanded form takes `q` as it is.
            let mut qf = sc.overwritten::<f32>(if all_expanded { 0 } else { total * h * d_qk });
            if !all_expanded {
                match dl {
                    Some(d) => d.latent_queries(cuda, &q, qk, total, &mut qf, d_qk, sc)?,
                    None => lw.absorbed.latent_queries(&q, qk, total, &mut qf, d_qk, sc),
                }
                qf.par_chunks_mut(d_qk).enumerate().for_each(|(th, dst)| {
                    let t = th / h;
                    dst[lora..].copy_from_slice(&q[th * qk + nope..][..qk - nope]);
                    self.rope.apply(&mut dst[lora..], pos[t]);
                });
            }
            Ok((q, ix, kv, qf))
        })?;
        // Append [c | k_pe] for every sequence at once (all or nothing);
        // undo the appends if anything later fails.
        let kv_bytes: &[u8] = bytemuck::cast_slice(&kv);
        let items: Vec<(u64, usize, &[u8])> = seqs
            .iter()
            .enumerate()
            .map(|(b, &id)| {
                (
                    id,
                    n_tokens[b],
                    &kv_bytes[first_tok[b] * d_qk * 4..(first_tok[b] + n_tokens[b]) * d_qk * 4],
                )
            })
            .collect();
        match &ix {
            None => pool.append_batch(pl, &items, Dtype::F32)?,
            Some(t) => {
                let irow = crate::kv::index_row_bytes(want_dim);
                let rows: Vec<&[u8]> = (0..seqs.len())
                    .map(|b| &t.keys[first_tok[b] * irow..(first_tok[b] + n_tokens[b]) * irow])
                    .collect();
                pool.append_batch_indexed(pl, &items, Dtype::F32, Some(&rows))?;
            }
        }
        let mut result = (|| -> Result<Vec<f32>> {
            // Attention in the cache's precision.
            let adt = attention_dtype(po.format);
            // The expanded sequences' rows of `o [total, H, v]`.
            let mut expanded_rows = |o: &mut [f32]| -> Result<()> {
                for (b, &id) in seqs.iter().enumerate().filter(|(b, _)| expanded[*b]) {
                    let (t0, n) = (first_tok[b], n_tokens[b]);
                    self.expanded_attention(
                        lw.absorbed.kv_b(),
                        pool,
                        pl,
                        id,
                        (&q[t0 * h * qk..][..n * h * qk], &pos[t0..t0 + n]),
                        adt,
                        &mut o[t0 * h * v..][..n * h * v],
                        super::prefill::KEY_CHUNK,
                        kept.as_deref_mut(),
                    )?;
                }
                Ok(())
            };
            if all_expanded {
                let mut o = sc.overwritten::<f32>(total * h * v);
                expanded_rows(&mut o)?;
                let mut y = vec![0f32; total * hid];
                self.project(&lw.o_proj, None, &o, total, &mut y)?;
                return Ok(y);
            }
            let es = adt.size();
            // f32 attention reads qf and writes o_lat as they are.
            let mut o_lat = sc.overwritten::<f32>(total * h * lora);
            // bf16 copies of the queries and outputs; empty for f32.
            let conv_len = |n: usize| if adt == Dtype::F32 { 0 } else { n * es };
            let mut q_conv = sc.overwritten::<u8>(conv_len(qf.len()));
            let mut o_conv = sc.overwritten::<u8>(conv_len(o_lat.len()));
            let q_att: &[u8] = match adt {
                Dtype::F32 => bytemuck::cast_slice(&qf),
                _ => {
                    store_slice(adt, &qf, &mut q_conv);
                    &q_conv
                }
            };
            let o_att: &mut [u8] = match adt {
                Dtype::F32 => bytemuck::cast_slice_mut(&mut o_lat),
                _ => &mut o_conv,
            };
            // One batched call per distinct chunk length.
            let selected = self.choices(pool, plan, ix.as_ref(), index_out.is_some())?;
            for mut g in self.attention_calls(plan, Some(&selected))? {
                // Expanded sequences attend below, after W_UV (which
                // also runs over their rows' unused latent outputs).
                if any_expanded {
                    g.retain(|b| !expanded[b]);
                    if g.members.is_empty() {
                        continue;
                    }
                }
                let AttnCall {
                    n,
                    members,
                    ids,
                    shape,
                    ..
                } = &g;
                let (n, shape) = (*n, *shape);
                let sp = g.sparse();
                // Bytes of one sequence's queries and outputs.
                let (qe, oe) = (n * h * d_qk * es, n * h * lora * es);
                let tok = |b: usize| first_tok[b] * h;
                // Members with consecutive indices have consecutive
                // tokens: decode straight from q_att into o_att.
                // Otherwise gather them.
                if g.consecutive() {
                    let t0 = tok(members[0]);
                    let qb = &q_att[t0 * d_qk * es..][..members.len() * qe];
                    let ob = &mut o_att[t0 * lora * es..][..members.len() * oe];
                    let mut out = DecodeOutput::new(&shape, adt, ob, None)?;
                    pool.decode(pl, ids, shape, adt, qb, sp, None, &mut out)?;
                    continue;
                }
                let mut qg = Vec::with_capacity(members.len() * qe);
                for &b in members {
                    qg.extend_from_slice(&q_att[tok(b) * d_qk * es..][..qe]);
                }
                let mut og = vec![0u8; members.len() * oe];
                let mut out = DecodeOutput::new(&shape, adt, &mut og, None)?;
                pool.decode(pl, ids, shape, adt, &qg, sp, None, &mut out)?;
                for (g, &b) in members.iter().enumerate() {
                    o_att[tok(b) * lora * es..][..oe].copy_from_slice(&og[g * oe..][..oe]);
                }
            }
            if adt != Dtype::F32 {
                load_slice(adt, &o_conv, &mut o_lat);
            }
            // o = W_UV · o_lat per head, then o_proj.
            let mut o = sc.overwritten::<f32>(total * h * v);
            match dl {
                Some(d) => d.values(cuda, &o_lat, total, &mut o)?,
                None => self
                    .engine
                    .install(|| lw.absorbed.values(&o_lat, total, &mut o, sc)),
            }
            if any_expanded {
                expanded_rows(&mut o)?;
            }
            let mut y = vec![0f32; total * hid];
            self.project(&lw.o_proj, dl.map(|d| &d.o_proj), &o, total, &mut y)?;
            if let Some(io) = index_out.as_deref_mut() {
                io[..selected.len()].copy_from_slice(&selected);
            }
            Ok(y)
        })();
        if result.is_err() {
            for b in 0..seqs.len() {
                if let Err(e) = pool.truncate_layer(seqs[b], pl, start[b]) {
                    result = Err(Error::internal(format!("rollback failed: {}", e.message)));
                }
            }
        }
        result
    }

    /// `y [tokens, w.out] = x · Wᵀ`: on the GPU when the layer's weights
    /// are there (`dev`), else on the CPU.
    fn project(
        &self,
        w: &Linear,
        dev: Option<&ProjWeight>,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
    ) -> Result<()> {
        match dev {
            Some(d) => device::project(
                self.engine.backend().cuda(),
                d,
                &LinearCall::plain(tokens, w.out),
                &x[..tokens * w.inp],
                w.activations(),
                &mut y[..tokens * w.out],
            ),
            None => {
                // On the engine's workers (inline when already there).
                self.engine
                    .install(|| w.matmul_with(x, tokens, y, &self.scratch));
                Ok(())
            }
        }
    }

    /// [`Self::forward`] for a call of more than [`PASS_TOKENS`] tokens:
    /// each sequence in chunks of [`pass_tokens`], one pass each. A pass
    /// appends its rows before it attends, so causal attention sees exactly
    /// the earlier tokens, as in one pass; the per-token buffers (about
    /// 1.1 MB a token for V3 in the absorbed form) stay bounded whatever
    /// the prompt length. A sequence's passes in the expanded form keep
    /// its up-projected keys ([`KeptKeys`]), as many as their budget
    /// allows: when that is its whole context, each pass up-projects only
    /// its own positions and passes keep [`PASS_TOKENS`]; otherwise the
    /// positions past the kept ones are up-projected in every pass, and
    /// passes grow. On error every sequence is cut back to its length
    /// before the call.
    fn forward_in_passes(
        &self,
        pool: &KvPool,
        layer: i64,
        plan: &Plan,
        x: &[f32],
        mut index_out: Option<&mut [i32]>,
    ) -> Result<Vec<f32>> {
        let hid = self.config.hidden_size;
        let topk = self.config.indexer.map_or(0, |ix| ix.topk);
        let mut y = vec![0f32; plan.total * hid];
        let expand = self.can_expand(plan.pl as usize);
        let adt = attention_dtype(pool.options().format);
        // Sequence b's whole context, and how much of it keys are kept for.
        let context = |b: usize| plan.start[b] + plan.n_tokens[b];
        let limit = |b: usize| {
            if expand {
                kept_positions(&self.config, context(b), adt, self.kept_keys_bytes)
            } else {
                0
            }
        };
        // Passes in the expanded form that up-project part of their
        // context again grow with that part (`pass_tokens`).
        let grow = |b: usize| (expand && limit(b) < context(b)).then(|| limit(b));
        let mut kept: Option<KeptKeys> = None;
        self.in_passes(pool, plan, &grow, |b, row, m| {
            let id = plan.seqs[b];
            if kept.as_ref().is_none_or(|k| k.seq() != id) {
                let limit = limit(b);
                kept = (limit > 0).then(|| KeptKeys::new(&self.config, id, limit, adt));
            }
            let rows = row * hid..(row + m) * hid;
            let io = index_out
                .as_deref_mut()
                .map(|io| &mut io[row * topk..(row + m) * topk]);
            let (ids, ns) = ([id], [m]);
            let pass = self.plan(pool, layer, &ids, &ns, io.as_deref())?;
            let yc = self.forward_pass(pool, &pass, &x[rows.clone()], io, kept.as_mut())?;
            y[rows].copy_from_slice(&yc);
            Ok(())
        })?;
        Ok(y)
    }

    /// Runs `pass(b, first_row, tokens)` for each sequence `b`'s tokens in
    /// chunks of [`pass_tokens`] (`grow(b)` its `kept`), in order; on an
    /// error, cuts every sequence back to its length before the call.
    pub(super) fn in_passes(
        &self,
        pool: &KvPool,
        plan: &Plan,
        grow: &dyn Fn(usize) -> Option<usize>,
        mut pass: impl FnMut(usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let mut row = 0;
        let mut result = Ok(());
        'seqs: for (b, (&n, &start)) in plan.n_tokens.iter().zip(&plan.start).enumerate() {
            let kept = grow(b);
            let mut c0 = 0;
            while c0 < n {
                let m = pass_tokens(start + c0, kept).min(n - c0);
                if let Err(e) = pass(b, row + c0, m) {
                    result = Err(e);
                    break 'seqs;
                }
                c0 += m;
            }
            row += n;
        }
        if let Err(e) = result {
            for (&id, &len) in plan.seqs.iter().zip(&plan.start) {
                if let Err(r) = pool.truncate_layer(id, plan.pl, len) {
                    return Err(Error::internal(format!("rollback failed: {}", r.message)));
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// V3.2: the positions each new token attends to `[total, topk]`,
    /// where the indexer narrows them (a sequence past `topk` tokens) or
    /// the caller asked for them (`wanted`); else empty.
    pub(super) fn choices(
        &self,
        pool: &KvPool,
        plan: &Plan,
        ix: Option<&super::indexer::IndexerTokens>,
        wanted: bool,
    ) -> Result<Vec<i32>> {
        let mut selected: Vec<i32> = Vec::new();
        let (Some(t), Some(ic)) = (ix, self.config.indexer) else {
            return Ok(selected);
        };
        if wanted || plan.narrowed(ic.topk) {
            let n = crate::error::checked_size("indexer choices", &[plan.total, ic.topk])?;
            crate::backend::try_grow(&mut selected, "indexer choices", n)?;
            // Filled in full (every row is written).
            self.select(pool, plan, t, ic.topk, &mut selected)?;
        }
        Ok(selected)
    }

    /// The attention calls of a forward: one per distinct chunk length, in
    /// order of length, sparse (over `selected`'s positions) when the
    /// indexer keeps fewer than all earlier tokens for any of its queries.
    /// `selected` None: the choice is in GPU memory (no host indices).
    pub(super) fn attention_calls(
        &self,
        plan: &Plan,
        selected: Option<&[i32]>,
    ) -> Result<Vec<AttnCall>> {
        let (seqs, start, first_tok) = (plan.seqs, &plan.start, &plan.first_tok);
        let c = &self.config;
        let topk = c.indexer.map_or(0, |ix| ix.topk);
        let mut calls = Vec::new();
        for (n, members) in chunk_groups(plan.n_tokens) {
            let ids: Vec<u64> = members.iter().map(|&b| seqs[b]).collect();
            let sparse = c.indexer.is_some() && members.iter().any(|&b| start[b] + n > topk);
            let shape = DecodeShape::new(
                ids.len() as i32,
                n as i32,
                c.num_heads as i32,
                c.d_qk() as i32,
                c.kv_lora_rank as i32,
                c.softmax_scale() as f32,
                !sparse,
            )?;
            let indices = selected.filter(|_| sparse).map(|selected| {
                let mut v = Vec::with_capacity(members.len() * n * topk);
                for &b in &members {
                    v.extend_from_slice(&selected[first_tok[b] * topk..(first_tok[b] + n) * topk]);
                }
                v
            });
            calls.push(AttnCall {
                n,
                members,
                ids,
                shape,
                sparse,
                indices,
                topk,
            });
        }
        Ok(calls)
    }

    /// The indexer's choice for every new token (see
    /// [`super::indexer::select`]) into `out [total, topk]`.
    fn select(
        &self,
        pool: &KvPool,
        plan: &Plan,
        t: &super::indexer::IndexerTokens,
        topk: usize,
        out: &mut [i32],
    ) -> Result<()> {
        let (first_tok, pos) = (&plan.first_tok, &plan.pos);
        let ic = self
            .config
            .indexer
            .ok_or_else(|| Error::internal("no indexer"))?;
        let (ih, idim) = (ic.heads, ic.head_dim);
        if pool.index_on_device() {
            // The keys stay on the GPU; so does the scoring.
            let out = &mut out[..plan.total * topk];
            let (seqs, n_tokens) = (plan.seqs, plan.n_tokens);
            return pool.select_on_device(plan.pl, seqs, n_tokens, pos, &t.q, &t.w, ih, out, 0);
        }
        for (b, &seq) in plan.seqs.iter().enumerate() {
            let toks = first_tok[b]..first_tok[b] + plan.n_tokens[b];
            // The keys' lock is taken on this thread; the scoring runs on
            // the workers (see forward_staged).
            pool.with_index_keys(seq, plan.pl, |keys| {
                self.engine.install(|| {
                    out[toks.start * topk..toks.end * topk]
                        .par_chunks_mut(topk)
                        .zip(toks.clone().into_par_iter())
                        .for_each(|(row, tok)| {
                            super::indexer::select(
                                &keys,
                                &t.q[tok * ih * idim..(tok + 1) * ih * idim],
                                &t.w[tok * ih..(tok + 1) * ih],
                                pos[tok],
                                row,
                                self.level,
                            )
                        })
                })
            })?;
        }
        Ok(())
    }
}

/// A forward's tokens, laid out (see [`Model::plan`]).
pub(super) struct Plan<'a> {
    /// The pool layer.
    pub pl: i64,
    /// The sequences and their new tokens, as the caller gave them.
    pub seqs: &'a [u64],
    pub n_tokens: &'a [usize],
    /// Each sequence's length before the call.
    pub start: Vec<usize>,
    /// Each sequence's first row of the call's tokens.
    pub first_tok: Vec<usize>,
    /// Each token's position.
    pub pos: Vec<usize>,
    pub total: usize,
}

impl Plan<'_> {
    /// Whether the indexer (keeping `topk`) narrows the attention of any
    /// of the call's tokens.
    pub fn narrowed(&self, topk: usize) -> bool {
        (0..self.seqs.len()).any(|b| self.start[b] + self.n_tokens[b] > topk)
    }
}

/// The sequences of a forward grouped by chunk length (ascending), each
/// group in batch order.
pub(super) fn chunk_groups(n_tokens: &[usize]) -> BTreeMap<usize, Vec<usize>> {
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (b, &n) in n_tokens.iter().enumerate() {
        groups.entry(n).or_default().push(b);
    }
    groups
}

/// One batched attention call of a forward (see [`Model::attention_calls`]).
pub(super) struct AttnCall {
    /// Tokens of each member's chunk.
    pub n: usize,
    /// The members' indices in the batch, ascending.
    pub members: Vec<usize>,
    pub ids: Vec<u64>,
    pub shape: DecodeShape,
    /// Whether the indexer narrows the attention.
    pub sparse: bool,
    /// Sparse, with the choice in host memory: each member token's
    /// positions `[members, n, topk]`.
    pub indices: Option<Vec<i32>>,
    pub topk: usize,
}

impl AttnCall {
    /// The pool's sparse argument, when sparse.
    pub fn sparse(&self) -> Option<crate::kv::PoolSparse<'_>> {
        self.indices.as_ref().map(|v| crate::kv::PoolSparse {
            indices: v,
            topk: self.topk,
            topk_length: None,
        })
    }

    /// Keeps the members for which `keep(member)` holds (with their ids,
    /// indices and the shape's batch).
    pub fn retain(&mut self, keep: impl Fn(usize) -> bool) {
        let per = self.n * self.topk;
        let kept: Vec<usize> = (0..self.members.len())
            .filter(|&i| keep(self.members[i]))
            .collect();
        if let Some(ind) = &self.indices {
            self.indices = Some(
                kept.iter()
                    .flat_map(|&i| &ind[i * per..(i + 1) * per])
                    .copied()
                    .collect(),
            );
        }
        self.ids = kept.iter().map(|&i| self.ids[i]).collect();
        self.members = kept.iter().map(|&i| self.members[i]).collect();
        self.shape.batch = self.members.len();
    }

    /// Whether the members are neighbours in the batch, so their tokens
    /// are consecutive rows and need no gathering.
    pub fn consecutive(&self) -> bool {
        self.members.windows(2).all(|w| w[1] == w[0] + 1)
    }
}
