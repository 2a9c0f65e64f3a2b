//! A layer's projections on a CUDA engine's GPU: q_a and q_b (or q_proj),
//! kv_a, the absorbed W_UK and W_UV, and o_proj, with their weights held in
//! device memory in their stored precision (bf16, or FP8 with its block
//! scales; `backend::cuda::linear`). A layer over a pool of the same GPU
//! runs on the device (`super::resident`, with a V3.2 layer's indexer:
//! its projections here too); otherwise each projection here stages its
//! activations in and its output out, and the norms and RoPE stay on the
//! CPU.
//!
//! Opt-in until a GPU has verified the kernels: `MLART_CUDA_PROJECTIONS=1`
//! (or [`LoadOptions::gpu_projections`](super::LoadOptions)).

use super::linear::{Activations, Linear, Stored};
use super::scratch::Scratch;
use super::{LayerWeights, QProj};
use crate::backend::cuda::linear::{split_bf16, LinearCall, WeightImage};
use crate::backend::cuda::projection::DeviceWeight;
use crate::backend::cuda::CudaBackend;
use crate::error::{Error, Result, Status};

/// Whether a CUDA engine's models run their projections on the GPU when
/// nothing asks otherwise. The kernels pass the CPU emulation but have not
/// run on a GPU yet; `scripts/gpu-check.sh` verifies them (then `true`).
pub const GPU_PROJECTIONS_BY_DEFAULT: bool = false;

/// `MLART_CUDA_PROJECTIONS=1` or `=0` overrides [`GPU_PROJECTIONS_BY_DEFAULT`].
pub fn gpu_projections_requested() -> bool {
    match std::env::var("MLART_CUDA_PROJECTIONS")
        .as_deref()
        .map(str::trim)
    {
        Ok("1") => true,
        Ok("0") => false,
        _ => GPU_PROJECTIONS_BY_DEFAULT,
    }
}

/// A projection weight where the kernels read it.
pub enum ProjWeight {
    /// In GPU memory.
    Gpu(DeviceWeight),
    /// On the host, multiplied with the kernels' arithmetic: lets the unit
    /// tests run everything around the kernels (layouts, groups, packing)
    /// without a GPU.
    #[cfg(test)]
    Host(WeightImage),
}

impl ProjWeight {
    /// Gives GPU memory back.
    fn free(&self, cuda: &CudaBackend) {
        match self {
            ProjWeight::Gpu(d) => cuda.free_weight(d),
            #[cfg(test)]
            ProjWeight::Host(_) => {}
        }
    }

    fn bytes(&self) -> usize {
        match self {
            ProjWeight::Gpu(w) => w.bytes(),
            #[cfg(test)]
            ProjWeight::Host(img) => img.device_bytes(),
        }
    }
}

/// The query projection's device weights.
pub enum DeviceQ {
    Lora { a: ProjWeight, b: ProjWeight },
    Direct(ProjWeight),
}

/// The absorbed steps' per-head shape.
#[derive(Clone, Copy, Debug)]
pub struct HeadDims {
    pub heads: usize,
    pub nope: usize,
    pub v: usize,
    pub lora: usize,
}

impl HeadDims {
    pub fn of(c: &super::ModelConfig) -> Self {
        HeadDims {
            heads: c.num_heads,
            nope: c.qk_nope_head_dim,
            v: c.v_head_dim,
            lora: c.kv_lora_rank,
        }
    }
}

/// A V3.2 layer's indexer weights in device memory.
pub struct DeviceIndexer {
    /// `[heads * dim, q_lora_rank]`.
    pub wq_b: ProjWeight,
    /// `[dim, hidden]`.
    pub wk: ProjWeight,
    /// `[heads, hidden]`.
    pub weights_proj: ProjWeight,
    /// The key's LayerNorm, f32: weight `[dim]`, then bias `[dim]`; 0 when
    /// the weights are not on a GPU.
    pub norm: u64,
}

/// One layer's projection weights in device memory.
pub struct DeviceLayer {
    pub q: DeviceQ,
    pub kv_a: ProjWeight,
    /// W_UK transposed: `[H * kv_lora, nope]`.
    pub uk: ProjWeight,
    /// `kv_b_proj` as stored; W_UV is read in place.
    pub kv_b: ProjWeight,
    pub o_proj: ProjWeight,
    pub dims: HeadDims,
    /// The RMSNorm weights in device memory, f32: kv_norm `[kv_lora]`,
    /// then q_a's norm `[q_lora]` (low-rank queries); 0 when the weights
    /// are not on a GPU.
    pub norms: u64,
    /// A V3.2 layer's indexer, when its weights are ones the kernels take
    /// (else it runs on the CPU).
    pub indexer: Option<DeviceIndexer>,
}

impl DeviceLayer {
    /// q_a of a low-rank query projection.
    pub fn q_a(&self) -> Option<&ProjWeight> {
        match &self.q {
            DeviceQ::Lora { a, .. } => Some(a),
            DeviceQ::Direct(_) => None,
        }
    }

    /// q_b of a low-rank query projection.
    pub fn q_b(&self) -> Option<&ProjWeight> {
        match &self.q {
            DeviceQ::Lora { b, .. } => Some(b),
            DeviceQ::Direct(_) => None,
        }
    }

    /// q_proj of a direct query projection.
    pub fn q_direct(&self) -> Option<&ProjWeight> {
        match &self.q {
            DeviceQ::Direct(w) => Some(w),
            DeviceQ::Lora { .. } => None,
        }
    }

    /// [`Absorbed::latent_queries`](super::absorb::Absorbed::latent_queries)
    /// on the GPU: `lat[t, h] = q_nope[t, h] · W_UK[h]`, `q` `[tokens, H,
    /// q_stride]` with q_nope first in each head's row, written into the
    /// first `kv_lora` values of each `out_stride` row of `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn latent_queries(
        &self,
        cuda: Option<&CudaBackend>,
        q: &[f32],
        q_stride: usize,
        tokens: usize,
        out: &mut [f32],
        out_stride: usize,
        sc: &Scratch,
    ) -> Result<()> {
        let HeadDims {
            heads, nope, lora, ..
        } = self.dims;
        let mut qn = sc.overwritten::<f32>(tokens * heads * nope);
        for (dst, src) in qn.chunks_mut(nope).zip(q.chunks(q_stride)) {
            dst.copy_from_slice(&src[..nope]);
        }
        let mut lat = sc.overwritten::<f32>(tokens * heads * lora);
        let call = LinearCall {
            tokens,
            n_out: lora,
            groups: heads,
            w_row0: 0,
            w_group_rows: lora,
        };
        project(cuda, &self.uk, &call, &qn, Activations::Precise, &mut lat)?;
        for (dst, src) in out.chunks_mut(out_stride).zip(lat.chunks(lora)) {
            dst[..lora].copy_from_slice(src);
        }
        Ok(())
    }

    /// [`Absorbed::values`](super::absorb::Absorbed::values) on the GPU:
    /// `o[t, h] = W_UV[h] · lat[t, h]`, read in place from kv_b_proj's rows.
    pub fn values(
        &self,
        cuda: Option<&CudaBackend>,
        lat: &[f32],
        tokens: usize,
        o: &mut [f32],
    ) -> Result<()> {
        let HeadDims {
            heads,
            nope,
            v,
            lora,
        } = self.dims;
        let call = LinearCall {
            tokens,
            n_out: v,
            groups: heads,
            w_row0: nope,
            w_group_rows: nope + v,
        };
        let n = tokens * heads;
        project(
            cuda,
            &self.kv_b,
            &call,
            &lat[..n * lora],
            Activations::Precise,
            &mut o[..n * v],
        )
    }

    fn weights(&self) -> Vec<&ProjWeight> {
        let mut v = match &self.q {
            DeviceQ::Lora { a, b } => vec![a, b],
            DeviceQ::Direct(w) => vec![w],
        };
        v.extend([&self.kv_a, &self.uk, &self.kv_b, &self.o_proj]);
        if let Some(ix) = &self.indexer {
            v.extend([&ix.wq_b, &ix.wk, &ix.weights_proj]);
        }
        v
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.weights().iter().map(|w| w.bytes()).sum()
    }

    /// Gives the device memory back.
    pub fn free(&self, cuda: &CudaBackend) {
        for w in self.weights() {
            w.free(cuda);
        }
        if self.norms != 0 {
            let _ = cuda.mem_free(self.norms);
        }
        if let Some(ix) = self.indexer.as_ref().filter(|ix| ix.norm != 0) {
            let _ = cuda.mem_free(ix.norm);
        }
    }
}

/// A weight as the GPU kernels read it; `Unsupported` for f32/f16 weights.
fn image(l: &Linear) -> Result<WeightImage> {
    match l.stored() {
        Stored::Bf16(b) => WeightImage::bf16(b, l.out, l.inp),
        Stored::Fp8 { codes, scales } => WeightImage::fp8(codes, scales, l.out, l.inp),
        Stored::Other(d) => Err(Error::unsupported(format!(
            "{d:?} weights (the GPU projections take bf16 and FP8)"
        ))),
    }
}

/// One layer's weights as the kernels read them, in [`DeviceLayer`] order:
/// q (one or two), kv_a, W_UK transposed, kv_b, o_proj, then a V3.2
/// indexer's wq_b, wk and weights_proj (left out, so the indexer runs on
/// the CPU, when one of them is a dtype the kernels do not take); and
/// whether the query projection is low-rank.
fn layer_images(lw: &LayerWeights, d: HeadDims) -> Result<(Vec<WeightImage>, bool)> {
    let HeadDims { heads, nope, v, .. } = d;
    let mut imgs = match &lw.q {
        QProj::Lora { a, b, .. } => vec![image(a)?, image(b)?],
        QProj::Direct(w) => vec![image(w)?],
    };
    let lora = imgs.len() == 2;
    let kv_b = image(lw.absorbed.kv_b())?;
    let uk = kv_b.transposed_groups(heads, nope + v, nope)?;
    imgs.extend([image(&lw.kv_a)?, uk, kv_b, image(&lw.o_proj)?]);
    if let Some(ix) = &lw.indexer {
        let three = [&ix.wq_b, &ix.wk, &ix.weights_proj].map(image);
        if three.iter().all(|r| r.is_ok()) {
            imgs.extend(three.into_iter().flatten());
        } else if let Some(Err(e)) = three.into_iter().find(|r| !is_unsupported_result(r)) {
            return Err(e);
        }
    }
    Ok((imgs, lora))
}

/// Whether `r` is Ok or an `Unsupported` error.
fn is_unsupported_result<T>(r: &Result<T>) -> bool {
    r.as_ref().err().is_none_or(is_unsupported)
}

/// A [`DeviceLayer`] from its weights in [`layer_images`] order.
fn assemble(ws: Vec<ProjWeight>, lora: bool, dims: HeadDims) -> Result<DeviceLayer> {
    let indexer = ws.len() == if lora { 9 } else { 8 };
    let mut it = ws.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| Error::internal("device layer weights"))
    };
    let q = if lora {
        DeviceQ::Lora {
            a: next()?,
            b: next()?,
        }
    } else {
        DeviceQ::Direct(next()?)
    };
    let (kv_a, uk, kv_b, o_proj) = (next()?, next()?, next()?, next()?);
    let indexer = if indexer {
        Some(DeviceIndexer {
            wq_b: next()?,
            wk: next()?,
            weights_proj: next()?,
            norm: 0,
        })
    } else {
        None
    };
    Ok(DeviceLayer {
        q,
        kv_a,
        uk,
        kv_b,
        o_proj,
        dims,
        norms: 0,
        indexer,
    })
}

/// Builds every layer's device weights: all of them, or an `Unsupported`
/// error saying why not (the caller then keeps the projections on the CPU),
/// or another error (device memory) after freeing what was uploaded.
pub fn upload(
    cuda: &CudaBackend,
    layers: &[LayerWeights],
    dims: HeadDims,
) -> Result<Vec<DeviceLayer>> {
    // Every image first: an unsupported shape is found before any upload.
    let images = layers
        .iter()
        .map(|lw| layer_images(lw, dims))
        .collect::<Result<Vec<_>>>()?;
    let mut out: Vec<DeviceLayer> = Vec::with_capacity(layers.len());
    for (lw, (imgs, lora)) in layers.iter().zip(&images) {
        let mut held = Vec::with_capacity(imgs.len());
        let mut failed = None;
        for img in imgs {
            match cuda.upload_weight(img) {
                Ok(w) => held.push(ProjWeight::Gpu(w)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let r = match failed {
            None => assemble(held, *lora, dims).and_then(|mut l| {
                let norms = upload_norms(cuda, lw).and_then(|p| {
                    l.norms = p;
                    match (&mut l.indexer, &lw.indexer) {
                        (Some(d), Some(ix)) => {
                            let v = [&ix.k_norm_weight[..], &ix.k_norm_bias[..]].concat();
                            d.norm = upload_f32(cuda, &v)?;
                            Ok(())
                        }
                        _ => Ok(()),
                    }
                });
                if let Err(e) = norms {
                    l.free(cuda);
                    return Err(e);
                }
                Ok(l)
            }),
            Some(e) => {
                for w in &held {
                    w.free(cuda);
                }
                Err(e)
            }
        };
        match r {
            Ok(l) => out.push(l),
            Err(e) => {
                for l in &out {
                    l.free(cuda);
                }
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// A layer's RMSNorm weights in device memory (see [`DeviceLayer::norms`]).
fn upload_norms(cuda: &CudaBackend, lw: &LayerWeights) -> Result<u64> {
    let mut v = lw.kv_norm.clone();
    if let QProj::Lora { norm, .. } = &lw.q {
        v.extend_from_slice(norm);
    }
    upload_f32(cuda, &v)
}

/// `v` copied into new device memory.
fn upload_f32(cuda: &CudaBackend, v: &[f32]) -> Result<u64> {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    let p = cuda.mem_alloc(bytes.len())?;
    if let Err(e) = cuda.mem_copy(p, bytes.as_ptr() as u64, bytes.len()) {
        let _ = cuda.mem_free(p);
        return Err(e);
    }
    Ok(p)
}

/// Every layer's weights kept on the host with the kernels' arithmetic
/// (see [`ProjWeight::Host`]).
#[cfg(test)]
pub fn host_layers(layers: &[LayerWeights], dims: HeadDims) -> Result<Vec<DeviceLayer>> {
    layers
        .iter()
        .map(|lw| {
            let (imgs, lora) = layer_images(lw, dims)?;
            assemble(imgs.into_iter().map(ProjWeight::Host).collect(), lora, dims)
        })
        .collect()
}

/// Whether an upload error means "keep the projections on the CPU".
pub fn is_unsupported(e: &Error) -> bool {
    e.status == Status::Unsupported
}

/// `y [tokens, groups, n_out] = x · Wᵀ` where `w` is (see [`LinearCall`]),
/// `x [tokens, groups, k]` taken as `activations` says (split into bf16
/// `hi + lo`, or rounded).
pub fn project(
    cuda: Option<&CudaBackend>,
    w: &ProjWeight,
    call: &LinearCall,
    x: &[f32],
    activations: Activations,
    y: &mut [f32],
) -> Result<()> {
    let (mut hi, mut lo) = (Vec::new(), Vec::new());
    split_bf16(x, activations == Activations::Precise, &mut hi, &mut lo);
    // Activations that are bf16 values already (bf16 hidden states, the
    // attention's bf16 output) have no low part: half the products.
    if lo.iter().all(|&b| b & 0x7fff == 0) {
        lo.clear();
    }
    match w {
        ProjWeight::Gpu(d) => cuda
            .ok_or_else(|| Error::internal("GPU weights on an engine without a GPU"))?
            .linear(d, call, &hi, &lo, y),
        #[cfg(test)]
        ProjWeight::Host(img) => {
            crate::backend::cuda::linear::host_linear(img, call, &hi, &lo, y);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Dtype;

    /// The image the GPU gets multiplies like the weight the CPU holds;
    /// f32 and f16 weights stay on the CPU.
    #[test]
    fn device_images_hold_the_weights() {
        let (out, inp) = (200, 256);
        let x = crate::model::gen::uniform(inp, 5);
        let mut kinds = Vec::new();
        for l in crate::model::linear::testing::every_dtype(out, inp, 9) {
            match image(&l) {
                Ok(img) => {
                    kinds.push(l.dtype());
                    for row in [0, 1, 127, 128, 199] {
                        let gpu: f64 = (0..inp).map(|k| img.value(row, k) * x[k] as f64).sum();
                        let cpu = l.dot_row(row, &x) as f64;
                        let mag: f64 = (0..inp)
                            .map(|k| (img.value(row, k) * x[k] as f64).abs())
                            .sum();
                        assert!(
                            (gpu - cpu).abs() <= 1e-5 * mag,
                            "{:?} row {row}: {gpu} vs {cpu}",
                            l.dtype()
                        );
                    }
                }
                Err(e) => {
                    assert!(is_unsupported(&e), "{}", e.message);
                    assert!(
                        matches!(l.dtype(), Dtype::F32 | Dtype::F16),
                        "{:?}",
                        l.dtype()
                    );
                }
            }
        }
        assert_eq!(kinds, [Dtype::Bf16, Dtype::Fp8E4m3]);
    }

    /// Everything the GPU path does around the kernels (weight images, the
    /// W_UK transposition, each call's groups and rows, packing q_nope and
    /// unpacking the latents) with the kernels' arithmetic on the host
    /// (`ProjWeight::Host`): a layer's forward must match the CPU path's.
    /// Low-rank and direct queries, bf16 and FP8 weights, both activation
    /// modes, prefill chunks and decode steps, an F32 pool (so attention
    /// adds no bf16 rounding of its own). A wrong row offset, group stride or
    /// packing gives errors of order 1.
    #[test]
    fn the_gpu_path_around_the_kernels_matches_the_cpu() {
        use crate::engine::{Engine, EngineOptions};
        use crate::format::KvFormat;
        use crate::kv::{KvPool, PoolOptions};
        use crate::model::gen::{generate, GenOptions, Preset, WeightDtype};
        use crate::model::{LoadOptions, Model};
        use std::sync::Arc;
        let engine = Arc::new(Engine::new(&EngineOptions::default()).unwrap());
        let shapes = [
            (Preset::Tiny, WeightDtype::Bf16),
            (Preset::Tiny, WeightDtype::Fp8),
            (Preset::V2Lite, WeightDtype::Fp8),
            (Preset::TinyV32, WeightDtype::Fp8),
        ];
        for (preset, dtype) in shapes {
            let dir = std::env::temp_dir().join(format!(
                "mlart-device-glue-{}-{dtype:?}-{}",
                preset.name(),
                std::process::id()
            ));
            let gen = GenOptions {
                preset,
                dtype,
                layers: 1,
                seed: 21,
                shards: 1,
                yarn: true,
            };
            generate(&dir, &gen).unwrap();
            for activations in [Activations::Precise, Activations::Bf16] {
                let load = || {
                    let o = LoadOptions {
                        activations,
                        ..LoadOptions::default()
                    };
                    Model::load(engine.clone(), &dir, o).unwrap()
                };
                let cpu = load();
                let mut gpu = load();
                let c = &gpu.config;
                gpu.device = host_layers(&gpu.layers, HeadDims::of(c)).unwrap();
                assert!(gpu.projections_on_gpu());
                let hid = c.hidden_size;
                let popts = PoolOptions {
                    format: KvFormat::F32,
                    d_qk: c.d_qk(),
                    num_layers: 1,
                    block_size: 16,
                    num_blocks: 16,
                    index_dim: c.indexer.map_or(0, |ix| ix.head_dim),
                };
                let pools = [
                    KvPool::new(engine.clone(), popts).unwrap(),
                    KvPool::new(engine.clone(), popts).unwrap(),
                ];
                for p in &pools {
                    p.create_seq(1).unwrap();
                    p.create_seq(2).unwrap();
                }
                let steps: [&[usize]; 3] = [&[21, 6], &[1, 1], &[2, 1]];
                for (s, n_tokens) in steps.iter().enumerate() {
                    let total: usize = n_tokens.iter().sum();
                    let x = crate::model::gen::uniform(total * hid, 100 + s as u64);
                    // V3.2: the indexer (on the CPU in both) must choose the
                    // same positions from the GPU path's q_a output.
                    let topk = c.indexer.map_or(0, |ix| ix.topk);
                    let mut sel = [vec![0i32; total * topk], vec![0i32; total * topk]];
                    let [sel_cpu, sel_gpu] = &mut sel;
                    let want = cpu
                        .forward_with(
                            &pools[0],
                            0,
                            &[1, 2],
                            n_tokens,
                            &x,
                            (topk > 0).then_some(&mut sel_cpu[..]),
                        )
                        .unwrap();
                    let got = gpu
                        .forward_with(
                            &pools[1],
                            0,
                            &[1, 2],
                            n_tokens,
                            &x,
                            (topk > 0).then_some(&mut sel_gpu[..]),
                        )
                        .unwrap();
                    assert_eq!(
                        sel[0], sel[1],
                        "{preset:?} step {s}: the indexer's choices differ"
                    );
                    let (mut d, mut n) = (0f64, 0f64);
                    for (a, b) in got.iter().zip(&want) {
                        d += ((a - b) as f64).powi(2);
                        n += (*b as f64).powi(2);
                    }
                    let e = (d / n).sqrt();
                    // Rounding activations to bf16 turns the paths' last-bit
                    // differences into occasional one-ulp (2^-9) flips.
                    let tol = match activations {
                        Activations::Precise => 1e-4,
                        Activations::Bf16 => 2e-3,
                    };
                    assert!(
                        e <= tol,
                        "{preset:?} {dtype:?} {activations:?} step {s}: rel L2 {e:.2e}"
                    );
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
