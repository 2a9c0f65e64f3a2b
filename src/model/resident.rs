//! A layer forward kept on the GPU: when a CUDA engine holds the layer's
//! projection weights (`device`) and the pool, every step between the
//! hidden states going in and the output coming back runs on the engine's
//! stream, in device memory, with no host round trip: the projections
//! (`mla_linear`), RMSNorm, RoPE, the bf16 splits and the queries' assembly
//! (`mla_rows`), the cache append (`mla_append`) and the attention. The
//! host uploads the hidden states (split into bf16 parts) and a cos/sin
//! table, and waits once, for the output.
//!
//! The steps and their precision are those of the CPU path in `forward`
//! (same split, same norms, same bf16 queries for bf16-valued caches), so
//! the two agree to rounding. A DeepSeek-V3.2 layer's indexer runs here
//! too when its weights are on the GPU: its projections, then its per-row
//! steps (`mla_index_rows`: LayerNorm, half-split RoPE, Hadamard, E4M3
//! codes); its keys go into the pool from device memory, and the pool
//! scores them there (`mla_index_score`, `mla_index_topk`), so the host
//! only waits for the choice. Without them it runs on the CPU from the
//! normed q_a rows (one more wait).

use super::device::{DeviceLayer, DeviceQ, ProjWeight};
use super::forward::{chunk_groups, Plan, PASS_TOKENS};
use super::linear::{Activations, Linear};
use super::{Model, QProj};
use crate::backend::cuda::indexer::SelectOut;
use crate::backend::cuda::linear::{split_bf16, LinearCall};
use crate::backend::cuda::lowering::{code, int};
use crate::backend::cuda::params::{IndexRowsParams, RowsParams};
use crate::backend::cuda::projection::DeviceWeight;
use crate::backend::cuda::staging::{Carve, DataRef};
use crate::backend::cuda::CudaBackend;
use crate::error::{Error, Result};
use crate::format::{Dtype, KvFormat};
use crate::kv::{KeyRows, KvPool, SparseIn};

/// A resident forward's hidden states and output.
#[derive(Clone, Copy, Debug)]
pub enum Hidden<'a> {
    /// f32 rows in host memory; the output comes back as f32 rows.
    Host(&'a [f32]),
    /// `x` and `out` `[tokens, hidden]` in the engine's GPU memory, of
    /// their dtypes (F32, BF16 or F16). The forward is enqueued on the
    /// engine's stream and joined to the CUstream `stream` both ways
    /// (`stream` 0: the call waits for it).
    Device {
        x: u64,
        x_dtype: Dtype,
        out: u64,
        out_dtype: Dtype,
        stream: u64,
    },
}

/// The device weight of a projection, when it is in GPU memory.
fn gpu(w: &ProjWeight) -> Option<&DeviceWeight> {
    match w {
        ProjWeight::Gpu(d) => Some(d),
        #[cfg(test)]
        ProjWeight::Host(_) => None,
    }
}

/// A layer's weights, all in GPU memory.
struct Weights<'a> {
    q: QWeights<'a>,
    kv_a: &'a DeviceWeight,
    uk: &'a DeviceWeight,
    kv_b: &'a DeviceWeight,
    o_proj: &'a DeviceWeight,
    /// A V3.2 layer's indexer, when its weights are on the GPU too.
    indexer: Option<IndexerWeights<'a>>,
}

struct IndexerWeights<'a> {
    wq_b: &'a DeviceWeight,
    wk: &'a DeviceWeight,
    weights_proj: &'a DeviceWeight,
    /// The key's LayerNorm weight, then bias (`DeviceIndexer::norm`).
    norm: u64,
}

enum QWeights<'a> {
    Lora {
        a: &'a DeviceWeight,
        b: &'a DeviceWeight,
    },
    Direct(&'a DeviceWeight),
}

impl<'a> Weights<'a> {
    fn of(dl: &'a DeviceLayer) -> Option<Self> {
        Some(Weights {
            q: match &dl.q {
                DeviceQ::Lora { a, b } => QWeights::Lora {
                    a: gpu(a)?,
                    b: gpu(b)?,
                },
                DeviceQ::Direct(w) => QWeights::Direct(gpu(w)?),
            },
            kv_a: gpu(&dl.kv_a)?,
            uk: gpu(&dl.uk)?,
            kv_b: gpu(&dl.kv_b)?,
            o_proj: gpu(&dl.o_proj)?,
            indexer: match &dl.indexer {
                Some(d) => Some(IndexerWeights {
                    wq_b: gpu(&d.wq_b)?,
                    wk: gpu(&d.wk)?,
                    weights_proj: gpu(&d.weights_proj)?,
                    norm: d.norm,
                }),
                None => None,
            },
        })
    }
}

/// A row step reading `rows x cols` f32 at `src` (row stride `src_stride`).
fn row_step(src: u64, rows: usize, cols: usize, src_stride: usize) -> Result<RowsParams> {
    Ok(RowsParams {
        rows: int("rows", rows)?,
        cols: int("cols", cols)?,
        src_stride: int("src_stride", src_stride)?,
        dst_dtype: code(Dtype::F32.raw()),
        src_dtype: code(Dtype::F32.raw()),
        rows_per_token: 1,
        src,
        ..RowsParams::default()
    })
}

impl Model {
    /// Whether layer `dl`'s forward over `pool` can stay on the GPU.
    pub(super) fn resident_on<'a>(
        &self,
        dl: Option<&'a DeviceLayer>,
        pool: &KvPool,
    ) -> Option<(&CudaBackend, &'a DeviceLayer)> {
        let cuda = self.engine.backend().cuda()?;
        let dl = dl?;
        let same_gpu = pool
            .engine()
            .backend()
            .cuda()
            .is_some_and(|c| std::ptr::eq(c, cuda));
        (same_gpu && dl.norms != 0 && Weights::of(dl).is_some()).then_some((cuda, dl))
    }

    /// [`Self::forward_with`] with the hidden states `x` and the output
    /// `out` (`[total_tokens, hidden]` of their dtypes: F32, BF16 or F16)
    /// in the engine's GPU memory, for a model whose projections are on
    /// the GPU over a pool of the same engine. Enqueued on the engine's
    /// stream and joined to the CUstream `stream` both ways (0: returns
    /// when the output is written). `index_out` is host memory. `x` and
    /// `out` must lie inside allocations of that GPU and be 16-byte aligned
    /// (checked). On error the pool is left as it was; a call of more than
    /// 512 (`PASS_TOKENS`) tokens of a sequence runs in passes, and `out` then
    /// holds the rows of the passes before the failing one.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_device(
        &self,
        pool: &KvPool,
        layer: i64,
        seqs: &[u64],
        n_tokens: &[usize],
        x: u64,
        x_dtype: Dtype,
        out: u64,
        out_dtype: Dtype,
        stream: u64,
        mut index_out: Option<&mut [i32]>,
    ) -> Result<()> {
        let plan = self.plan(pool, layer, seqs, n_tokens, index_out.as_deref())?;
        let dl = self.device.get(plan.pl as usize);
        let Some((cuda, dl)) = self.resident_on(dl, pool) else {
            let why = match self.engine.backend().cuda() {
                None => "the model's engine is a CPU engine".to_string(),
                Some(_) if !self.projections_on_gpu() => {
                    format!("this model's projections run on the {}", self.projections)
                }
                Some(_) => "the pool belongs to another engine than the model".to_string(),
            };
            return Err(Error::invalid(format!(
                "memory = MLART_MEMORY_DEVICE needs the whole layer on one GPU, but {why}"
            )));
        };
        x_dtype.check_activation("x_dtype")?;
        out_dtype.check_activation("out_dtype")?;
        let hid = self.config.hidden_size;
        let x_len = crate::error::checked_size("x", &[plan.total, hid, x_dtype.size()])?;
        let out_len = crate::error::checked_size("out", &[plan.total, hid, out_dtype.size()])?;
        cuda.check_range("x", x, x_len)?;
        cuda.check_range("out", out, out_len)?;
        // The projections read x (bf16 x as it is) 16 bytes at a time; a
        // misaligned access would end the GPU context for everyone.
        for (name, p) in [("x", x), ("out", out)] {
            if !p.is_multiple_of(16) {
                return Err(Error::invalid(format!(
                    "{name} = {p:#x} must be 16-byte aligned (memory = MLART_MEMORY_DEVICE)"
                )));
            }
        }
        if x < out + out_len as u64 && out < x + x_len as u64 {
            return Err(Error::invalid(format!(
                "out = {out:#x} ({out_len} bytes) overlaps x = {x:#x} ({x_len} bytes)"
            )));
        }
        if plan.total <= PASS_TOKENS {
            let h = Hidden::Device {
                x,
                x_dtype,
                out,
                out_dtype,
                stream,
            };
            let r = self.forward_resident(cuda, dl, pool, &plan, h, index_out);
            if r.is_err() {
                // Work that reads x may be enqueued: the caller's stream
                // (or the caller, with none) must still wait for it.
                let _ = cuda.join_to(stream);
            }
            return r.map(|_| ());
        }
        // Longer calls in passes, as `forward_in_passes` does.
        let topk = self.config.indexer.map_or(0, |ix| ix.topk);
        self.in_passes(pool, &plan, &|_| None, |b, row, m| {
            let id = plan.seqs[b];
            let io = index_out
                .as_deref_mut()
                .map(|io| &mut io[row * topk..(row + m) * topk]);
            let (xo, oo) = (
                (row * hid * x_dtype.size()) as u64,
                (row * hid * out_dtype.size()) as u64,
            );
            self.forward_device(
                pool,
                layer,
                &[id],
                &[m],
                x + xo,
                x_dtype,
                out + oo,
                out_dtype,
                stream,
                io,
            )
        })
    }

    /// The layer forward on the GPU (see the module docs), of a call
    /// `plan` checked and laid out. On error the pool is left as it was.
    pub(super) fn forward_resident(
        &self,
        cuda: &CudaBackend,
        dl: &DeviceLayer,
        pool: &KvPool,
        plan: &Plan,
        x: Hidden<'_>,
        index_out: Option<&mut [i32]>,
    ) -> Result<Vec<f32>> {
        // `plan.pl` indexes the loaded layers (it is layer - first_layer).
        let lw = &self.layers[plan.pl as usize];
        let w = Weights::of(dl).ok_or_else(|| Error::internal("layer weights not on the GPU"))?;
        let (pl, seqs, n_tokens, t) = (plan.pl, plan.seqs, plan.n_tokens, plan.total);
        let (start, first_tok, pos) = (&plan.start[..], &plan.first_tok[..], &plan.pos[..]);
        let c = &self.config;
        let (hid, h, lora) = (c.hidden_size, c.num_heads, c.kv_lora_rank);
        let (nope, rope, v) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim);
        let (qk, d_qk) = (c.qk_head_dim(), c.d_qk());
        let eps = c.rms_norm_eps as f32;
        // The attention's queries and outputs: bf16 over a bf16-valued
        // cache, else f32 (as in `forward`).
        let adt = match pool.options().format {
            KvFormat::Bf16 | KvFormat::Fp8V32 | KvFormat::Fp8Model1 => Dtype::Bf16,
            _ => Dtype::F32,
        };
        let es = adt.size();
        let precise = |l: &Linear| l.activations() == Activations::Precise;

        // Host inputs: x as bf16 parts (no low part when x is bf16-valued,
        // as `device::project` does), the norms' weights, RoPE's cos/sin.
        let (q_in, q_norm) = match &lw.q {
            QProj::Lora { a, norm, .. } => (a, Some(norm)),
            QProj::Direct(wq) => (wq, None),
        };
        // The indexer on the GPU: its weights and the CPU-side config.
        let gpu_ix = w.indexer.as_ref().zip(lw.indexer.as_ref());
        let x_precise = precise(q_in)
            || precise(&lw.kv_a)
            || gpu_ix.is_some_and(|(_, ix)| precise(&ix.wk) || precise(&ix.weights_proj));
        let (mut x_hi, mut x_lo) = (Vec::new(), Vec::new());
        if let Hidden::Host(x) = x {
            split_bf16(&x[..t * hid], x_precise, &mut x_hi, &mut x_lo);
            if x_lo.iter().all(|&b| b & 0x7fff == 0) {
                x_lo.clear();
            }
        }
        // Device x: split on the device, unless it is bf16 already (then it
        // is its own high part and has no low part).
        let split_x = match x {
            Hidden::Device { x_dtype, .. } => x_dtype != Dtype::Bf16,
            Hidden::Host(_) => false,
        };
        let x_parts = if split_x { 2 * t * hid } else { 0 };
        let half = rope / 2;
        let mut cs = vec![0f32; t * 2 * half];
        for (row, &p) in cs.chunks_mut(2 * half).zip(pos) {
            self.rope.cos_sin(p, row);
        }

        // Device buffers, one after another in the model's arena.
        let mut cv = Carve::default();
        // First the host's inputs, in one upload: RoPE's table, then x's
        // parts (made here from host x, on the device from device x).
        let b_cs = cv.take(4 * cs.len());
        let b_x_hi = cv.take(2 * x_hi.len() + x_parts);
        let b_x_lo = cv.take(2 * x_lo.len() + if x_precise { x_parts } else { 0 });
        let q_lora = q_norm.map_or(0, |n| n.len());
        let b_qa = cv.take(4 * t * q_lora);
        let b_qa_hi = cv.take(2 * t * q_lora);
        let b_qa_lo = cv.take(2 * t * q_lora);
        let b_q = cv.take(4 * t * h * qk);
        let b_kv = cv.take(4 * t * d_qk);
        let b_qn_hi = cv.take(2 * t * h * nope);
        let b_qn_lo = cv.take(2 * t * h * nope);
        let b_lat = cv.take(4 * t * h * lora);
        let b_qf = cv.take(es * t * h * d_qk);
        let b_ol = cv.take(es * t * h * lora);
        let split_ol = adt == Dtype::F32;
        let ol_parts = if split_ol { 2 * t * h * lora } else { 0 };
        let b_ol_hi = cv.take(ol_parts);
        let b_ol_lo = cv.take(ol_parts);
        let b_o = cv.take(4 * t * h * v);
        let b_o_hi = cv.take(2 * t * h * v);
        let b_o_lo = cv.take(2 * t * h * v);
        let b_y = cv.take(4 * t * hid);
        // The indexer's queries [t, heads, dim], head weights [t, heads]
        // and key rows [t, dim + 4]; its key's projection [t, dim].
        let (ih, idim) = gpu_ix.map_or((0, 0), |(_, ix)| (ix.cfg.heads, ix.cfg.head_dim));
        let b_iq = cv.take(4 * t * ih * idim);
        let b_iw = cv.take(4 * t * ih);
        let b_ik = cv.take(4 * t * idim);
        let b_keys = cv.take(t * crate::kv::index_row_bytes(idim));
        // Its choice [t, topk] on the device: pool slots for the sparse
        // attention (gathered for calls of non-neighbours), and positions
        // when the caller asks for them.
        let itopk = if gpu_ix.is_some() {
            c.indexer.map_or(0, |ix| ix.topk)
        } else {
            0
        };
        let b_sel = cv.take(4 * t * itopk);
        let b_pos = cv.take(if index_out.is_some() {
            4 * t * itopk
        } else {
            0
        });
        // The products, in order, with the partial sums they need.
        let heads = |n_out, w_row0, w_group_rows| LinearCall {
            tokens: t,
            n_out,
            groups: h,
            w_row0,
            w_group_rows,
        };
        let call_uk = heads(lora, 0, lora);
        let call_uv = heads(v, nope, nope + v);
        let mut calls = vec![
            (w.kv_a, LinearCall::plain(t, d_qk)),
            (w.uk, call_uk),
            (w.kv_b, call_uv),
            (w.o_proj, LinearCall::plain(t, hid)),
        ];
        match w.q {
            QWeights::Lora { a, b } => {
                calls.push((a, LinearCall::plain(t, q_lora)));
                calls.push((b, LinearCall::plain(t, h * qk)));
            }
            QWeights::Direct(wq) => calls.push((wq, LinearCall::plain(t, h * qk))),
        }
        if let Some((iw, _)) = gpu_ix {
            calls.push((iw.wq_b, LinearCall::plain(t, ih * idim)));
            calls.push((iw.wk, LinearCall::plain(t, idim)));
            calls.push((iw.weights_proj, LinearCall::plain(t, ih)));
        }
        let mut partial = 0;
        for (wt, call) in &calls {
            partial = partial.max(cuda.linear_partial_len(wt, call)?);
        }
        let b_partial = cv.take(4 * partial);
        // Attention calls whose members are not neighbours in the batch
        // gather their queries and outputs into these.
        let gather = chunk_groups(n_tokens)
            .values()
            .any(|m| !m.windows(2).all(|p| p[1] == p[0] + 1));
        let b_qg = cv.take(if gather { es * t * h * d_qk } else { 0 });
        let b_og = cv.take(if gather { es * t * h * lora } else { 0 });
        let b_selg = cv.take(if gather { 4 * t * itopk } else { 0 });

        let mut arena = self.arena.lock();
        let base = cuda.arena(&mut arena, cv.bytes())?;
        let at = |off: usize| base + off as u64;
        let opt = |on: bool, off: usize| if on { at(off) } else { 0 };
        // A caller's stream: the engine's stream starts after its work.
        if let Hidden::Device { stream, .. } = x {
            cuda.join_from(stream)?;
        }
        // One copy: each costs the driver microseconds, about what a
        // decode step's small kernels take.
        let mut inputs = vec![0u8; b_x_hi + 2 * x_hi.len()];
        inputs[b_cs..b_cs + 4 * cs.len()].copy_from_slice(bytemuck::cast_slice(&cs));
        if !x_hi.is_empty() {
            inputs.resize(b_x_lo + 2 * x_lo.len(), 0);
            inputs[b_x_hi..b_x_hi + 2 * x_hi.len()].copy_from_slice(bytemuck::cast_slice(&x_hi));
            inputs[b_x_lo..].copy_from_slice(bytemuck::cast_slice(&x_lo));
        }
        cuda.upload_async(base, &inputs)?;
        // The norms' weights, uploaded at load.
        let kv_norm_at = dl.norms;
        let q_norm_at = dl.norms + 4 * lora as u64;
        // x's bf16 parts (a device pointer; 0 for no low part).
        let (x_hi_at, x_lo_at) = match x {
            Hidden::Host(_) => (at(b_x_hi), opt(!x_lo.is_empty(), b_x_lo)),
            Hidden::Device { x, .. } if !split_x => (x, 0),
            Hidden::Device { x, x_dtype, .. } => {
                let mut s = row_step(x, t, hid, hid)?;
                s.src_dtype = code(x_dtype.raw());
                s.hi = at(b_x_hi);
                s.lo = opt(x_precise, b_x_lo);
                // SAFETY: `x` is `[t, hidden]` of one allocation of this GPU
                // (`forward_device` checked it); the parts are carved above
                // for exactly that.
                unsafe { cuda.enqueue_rows(&s) }?;
                (s.hi, s.lo)
            }
        };
        let x_lo_for = |l: &Linear| if precise(l) { x_lo_at } else { 0 };
        let p_at = at(b_partial);

        // SAFETY (every enqueue below): each buffer is a piece of the arena
        // carved above for exactly the rows and columns the step reads or
        // writes, or the caller's x and out (checked by `forward_device`).
        // Every user of the arena enqueues on the engine's one stream, so
        // steps of this call and of later calls run in order, and the
        // arena is only freed or grown after that stream is synchronized.
        unsafe {
            // Queries: q_b(RMSNorm(q_a(x))) or q_proj(x), [t, H, qk].
            match (&w.q, &lw.q) {
                (QWeights::Lora { a, b }, QProj::Lora { a: la, b: lb, .. }) => {
                    let call = LinearCall::plain(t, q_lora);
                    cuda.enqueue_linear_device(a, &call, x_hi_at, x_lo_for(la), at(b_qa), p_at)?;
                    let mut s = row_step(at(b_qa), t, q_lora, q_lora)?;
                    s.norm = q_norm_at;
                    s.eps = eps;
                    if lw.indexer.is_some() && gpu_ix.is_none() {
                        // The indexer (CPU) reads the normed rows.
                        s.dst = s.src;
                        s.dst_stride = s.src_stride;
                    }
                    // The indexer's wq_b reads them too (as bf16 parts).
                    let ix_lo = gpu_ix.is_some_and(|(_, ix)| precise(&ix.wq_b));
                    s.hi = at(b_qa_hi);
                    s.lo = opt(precise(lb) || ix_lo, b_qa_lo);
                    cuda.enqueue_rows(&s)?;
                    let call = LinearCall::plain(t, h * qk);
                    let lo = opt(precise(lb), b_qa_lo);
                    cuda.enqueue_linear_device(b, &call, at(b_qa_hi), lo, at(b_q), p_at)?;
                }
                (QWeights::Direct(wq), QProj::Direct(lq)) => {
                    let call = LinearCall::plain(t, h * qk);
                    cuda.enqueue_linear_device(wq, &call, x_hi_at, x_lo_for(lq), at(b_q), p_at)?;
                }
                _ => return Err(Error::internal("device and host query weights disagree")),
            }
            // Latent KV [t, lora + rope]: RMSNorm(c), RoPE(k_pe), in place.
            let call = LinearCall::plain(t, d_qk);
            let kv_lo = x_lo_for(&lw.kv_a);
            cuda.enqueue_linear_device(w.kv_a, &call, x_hi_at, kv_lo, at(b_kv), p_at)?;
            let mut s = row_step(at(b_kv), t, lora, d_qk)?;
            s.norm = kv_norm_at;
            s.eps = eps;
            s.dst = at(b_kv);
            s.dst_stride = int("d_qk", d_qk)?;
            cuda.enqueue_rows(&s)?;
            let mut s = row_step(at(b_kv) + 4 * lora as u64, t, rope, d_qk)?;
            s.rope = 1;
            s.cos_sin = at(b_cs);
            s.dst = s.src;
            s.dst_stride = int("d_qk", d_qk)?;
            cuda.enqueue_rows(&s)?;
            // Absorbed queries [t, H, lora + rope] in the attention's dtype:
            // q_nope · W_UK, then RoPE(q_pe).
            let mut s = row_step(at(b_q), t * h, nope, qk)?;
            s.hi = at(b_qn_hi);
            s.lo = at(b_qn_lo);
            cuda.enqueue_rows(&s)?;
            cuda.enqueue_linear_device(w.uk, &call_uk, s.hi, s.lo, at(b_lat), p_at)?;
            let mut s = row_step(at(b_lat), t * h, lora, lora)?;
            s.dst = at(b_qf);
            s.dst_stride = int("d_qk", d_qk)?;
            s.dst_dtype = code(adt.raw());
            cuda.enqueue_rows(&s)?;
            let mut s = row_step(at(b_q) + 4 * nope as u64, t * h, rope, qk)?;
            s.rope = 1;
            s.rows_per_token = int("heads", h)?;
            s.cos_sin = at(b_cs);
            s.dst = at(b_qf) + (lora * es) as u64;
            s.dst_stride = int("d_qk", d_qk)?;
            s.dst_dtype = code(adt.raw());
            cuda.enqueue_rows(&s)?;
        }

        // V3.2 on the GPU: the indexer's projections and per-row steps.
        if let Some((iw, idx)) = gpu_ix {
            let ic = idx.cfg;
            let (rope_dims, dim_f) = (c.qk_rope_head_dim, idim as f32);
            // SAFETY: as above; the norm is `[2 * dim]` uploaded at load.
            unsafe {
                let call = LinearCall::plain(t, ih * idim);
                let qa_lo = opt(precise(&idx.wq_b), b_qa_lo);
                cuda.enqueue_linear_device(iw.wq_b, &call, at(b_qa_hi), qa_lo, at(b_iq), p_at)?;
                let call = LinearCall::plain(t, idim);
                let k_lo = x_lo_for(&idx.wk);
                cuda.enqueue_linear_device(iw.wk, &call, x_hi_at, k_lo, at(b_ik), p_at)?;
                let call = LinearCall::plain(t, ih);
                let wp_lo = x_lo_for(&idx.weights_proj);
                cuda.enqueue_linear_device(iw.weights_proj, &call, x_hi_at, wp_lo, at(b_iw), p_at)?;
                let rows = IndexRowsParams {
                    rows: int("tokens * index_n_heads", t * ih)?,
                    dim: int("index_head_dim", idim)?,
                    src_stride: int("index_head_dim", idim)?,
                    rows_per_token: int("index_n_heads", ih)?,
                    rope: int("qk_rope_head_dim", rope_dims)?,
                    cs_stride: int("qk_rope_head_dim", 2 * half)?,
                    pow2_scales: ic.pow2_scales as i32,
                    eps: 1e-6,
                    // As `indexer::prepare` computes them.
                    hadamard_scale: dim_f.powf(-0.5),
                    w_scale: (ih as f32).powf(-0.5) * dim_f.powf(-0.5),
                    src: at(b_iq),
                    cos_sin: at(b_cs),
                    values: at(b_iq),
                    w: at(b_iw),
                    ..IndexRowsParams::default()
                };
                cuda.enqueue_index_rows(&rows)?;
                let keys = IndexRowsParams {
                    rows: int("tokens", t)?,
                    rows_per_token: 1,
                    src: at(b_ik),
                    norm_w: iw.norm,
                    norm_b: iw.norm + 4 * idim as u64,
                    values: 0,
                    w: 0,
                    key_rows: at(b_keys),
                    ..rows
                };
                cuda.enqueue_index_rows(&keys)?;
            }
        }

        // V3.2 otherwise: the indexer's queries, weights and keys, on the
        // CPU from the normed q_a rows.
        let ix = match &lw.indexer {
            Some(_) if gpu_ix.is_some() => None,
            Some(idx) => {
                let mut qa = vec![0f32; t * q_lora];
                cuda.download(bytemuck::cast_slice_mut(&mut qa), at(b_qa))?;
                let mut x_dev = Vec::new();
                let xf: &[f32] = match x {
                    Hidden::Host(x) => &x[..t * hid],
                    Hidden::Device { x, x_dtype, .. } => {
                        let mut raw = vec![0u8; t * hid * x_dtype.size()];
                        cuda.download(&mut raw, x)?;
                        x_dev.resize(t * hid, 0f32);
                        crate::format::load_slice(x_dtype, &raw, &mut x_dev);
                        &x_dev
                    }
                };
                Some(idx.prepare(xf, &qa, pos, &self.rope, &self.scratch))
            }
            None => None,
        };

        // Append [c | k_pe] (and the indexer keys) all or nothing, then
        // attend; undo the appends if anything later fails.
        let items: Vec<(u64, usize)> = seqs.iter().copied().zip(n_tokens.iter().copied()).collect();
        let index_rows: Option<Vec<&[u8]>> = ix.as_ref().map(|it| {
            let irow = crate::kv::index_row_bytes(pool.options().index_dim);
            (0..seqs.len())
                .map(|b| &it.keys[first_tok[b] * irow..(first_tok[b] + n_tokens[b]) * irow])
                .collect()
        });
        let key_rows = match &index_rows {
            Some(rows) => Some(KeyRows::Host(rows)),
            None if gpu_ix.is_some() => Some(KeyRows::Device(at(b_keys))),
            None => None,
        };
        pool.append_batch_device(pl, &items, at(b_kv), Dtype::F32, key_rows)?;
        let result = (|| -> Result<Vec<f32>> {
            // The indexer's choice: on the GPU, as pool slots the sparse
            // attention reads in place (and positions, if asked for);
            // else in host memory.
            let wanted = index_out.is_some();
            let selected = if ix.is_none() && gpu_ix.is_some() {
                if wanted || plan.narrowed(itopk) {
                    let out = SelectOut::Device {
                        positions: opt(wanted, b_pos),
                        slots: at(b_sel),
                    };
                    let (q, w) = (DataRef::Device(at(b_iq)), DataRef::Device(at(b_iw)));
                    let sel = crate::kv::Selection {
                        heads: ih,
                        topk: itopk,
                        out,
                        score_budget: 0,
                    };
                    pool.select_with(pl, seqs, n_tokens, pos, q, w, sel)?;
                }
                None
            } else {
                Some(self.choices(pool, plan, ix.as_ref(), wanted)?)
            };
            for g in self.attention_calls(plan, selected.as_deref())? {
                let (n, members, ids, shape, sp) = (g.n, &g.members, &g.ids, g.shape, g.sparse());
                // Bytes of one token's queries, outputs and device choice.
                let (qe, oe) = ((h * d_qk * es) as u64, (h * lora * es) as u64);
                let se = (4 * itopk) as u64;
                let tok = |b: usize| first_tok[b] as u64;
                let slots = g.sparse && selected.is_none();
                let decode = |q: u64, sl: u64, o: u64| {
                    let sparse = if slots {
                        Some(SparseIn::Slots {
                            ptr: sl,
                            topk: itopk,
                        })
                    } else {
                        sp.map(SparseIn::Logical)
                    };
                    pool.decode_on_device(pl, ids, shape, adt, q, sparse, o, adt)
                };
                if g.consecutive() {
                    let t0 = tok(members[0]);
                    let (q, o) = (at(b_qf) + t0 * qe, at(b_ol) + t0 * oe);
                    decode(q, at(b_sel) + t0 * se, o)?;
                    continue;
                }
                let mut row = 0;
                for &b in members {
                    let len = n as u64;
                    let src = at(b_qf) + tok(b) * qe;
                    cuda.copy_async(at(b_qg) + row * qe, src, (len * qe) as usize)?;
                    if slots {
                        let src = at(b_sel) + tok(b) * se;
                        cuda.copy_async(at(b_selg) + row * se, src, (len * se) as usize)?;
                    }
                    row += len;
                }
                decode(at(b_qg), at(b_selg), at(b_og))?;
                let mut row = 0;
                for &b in members {
                    let len = n as u64;
                    let dst = at(b_ol) + tok(b) * oe;
                    cuda.copy_async(dst, at(b_og) + row * oe, (len * oe) as usize)?;
                    row += len;
                }
            }
            // SAFETY: as above.
            unsafe {
                // o = W_UV · o_lat per head (exact bf16 o_lat needs no low
                // part), then o_proj.
                let (ol_hi, ol_lo) = if split_ol {
                    let mut s = row_step(at(b_ol), t * h, lora, lora)?;
                    s.hi = at(b_ol_hi);
                    s.lo = at(b_ol_lo);
                    cuda.enqueue_rows(&s)?;
                    (s.hi, s.lo)
                } else {
                    (at(b_ol), 0)
                };
                cuda.enqueue_linear_device(w.kv_b, &call_uv, ol_hi, ol_lo, at(b_o), p_at)?;
                let mut s = row_step(at(b_o), t, h * v, h * v)?;
                s.hi = at(b_o_hi);
                s.lo = opt(precise(&lw.o_proj), b_o_lo);
                cuda.enqueue_rows(&s)?;
                let call = LinearCall::plain(t, hid);
                cuda.enqueue_linear_device(w.o_proj, &call, s.hi, s.lo, at(b_y), p_at)?;
            }
            let y = match x {
                Hidden::Host(_) => {
                    let mut y = vec![0f32; t * hid];
                    cuda.download(bytemuck::cast_slice_mut(&mut y), at(b_y))?;
                    y
                }
                Hidden::Device {
                    out,
                    out_dtype,
                    stream,
                    ..
                } => {
                    let mut s = row_step(at(b_y), t, hid, hid)?;
                    s.dst = out;
                    s.dst_stride = int("hidden", hid)?;
                    s.dst_dtype = code(out_dtype.raw());
                    // SAFETY: `out` is `[t, hidden]` of one allocation of
                    // this GPU (checked by `forward_device`); `y` carved above.
                    unsafe { cuda.enqueue_rows(&s) }?;
                    // The caller's stream continues after it, or the call waits.
                    cuda.join_to(stream)?;
                    Vec::new()
                }
            };
            match (index_out, &selected) {
                (Some(io), Some(sel)) => io[..sel.len()].copy_from_slice(sel),
                (Some(io), None) => {
                    let io = &mut io[..t * itopk];
                    cuda.download(bytemuck::cast_slice_mut(io), at(b_pos))?;
                }
                (None, _) => {}
            }
            Ok(y)
        })();
        drop(arena);
        if result.is_err() {
            for (&id, &len) in seqs.iter().zip(start) {
                if let Err(e) = pool.truncate_layer(id, pl, len) {
                    return Err(Error::internal(format!("rollback failed: {}", e.message)));
                }
            }
        }
        result
    }
}
