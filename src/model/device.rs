//! A layer's projections on a CUDA engine's GPU: q_a and q_b (or q_proj),
//! kv_a, the absorbed W_UK and W_UV, and o_proj, with their weights held in
//! device memory in their stored precision (bf16, or FP8 with its block
//! scales; `backend::cuda::linear`). The norms, RoPE and the V3.2 indexer
//! stay on the CPU, and the attention runs on the GPU pool as before.
//!
//! Opt-in until a GPU has verified the kernels: `MLART_CUDA_PROJECTIONS=1`
//! (or [`LoadOptions::gpu_projections`](super::LoadOptions)).

use super::linear::{Activations, Linear, Stored};
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

/// The query projection's device weights.
pub enum DeviceQ {
    Lora { a: DeviceWeight, b: DeviceWeight },
    Direct(DeviceWeight),
}

/// One layer's projection weights in device memory.
pub struct DeviceLayer {
    pub q: DeviceQ,
    pub kv_a: DeviceWeight,
    /// W_UK transposed: `[H * kv_lora, nope]`.
    pub uk: DeviceWeight,
    /// `kv_b_proj` as stored; W_UV is read in place.
    pub kv_b: DeviceWeight,
    pub o_proj: DeviceWeight,
}

impl DeviceLayer {
    fn weights(&self) -> Vec<&DeviceWeight> {
        let mut v = match &self.q {
            DeviceQ::Lora { a, b } => vec![a, b],
            DeviceQ::Direct(w) => vec![w],
        };
        v.extend([&self.kv_a, &self.uk, &self.kv_b, &self.o_proj]);
        v
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.weights().iter().map(|w| w.bytes()).sum()
    }

    /// Gives the device memory back.
    pub fn free(&self, cuda: &CudaBackend) {
        for w in self.weights() {
            cuda.free_weight(w);
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

/// Builds every layer's device weights: all of them, or an `Unsupported`
/// error saying why not (the caller then keeps the projections on the CPU),
/// or another error (device memory) after freeing what was uploaded.
pub fn upload(
    cuda: &CudaBackend,
    layers: &[LayerWeights],
    heads: usize,
    nope: usize,
    v: usize,
) -> Result<Vec<DeviceLayer>> {
    // Every image first: an unsupported shape is found before any upload.
    let mut images = Vec::with_capacity(layers.len());
    for lw in layers {
        let q = match &lw.q {
            QProj::Lora { a, b, .. } => vec![image(a)?, image(b)?],
            QProj::Direct(w) => vec![image(w)?],
        };
        let kv_b = image(lw.absorbed.kv_b())?;
        let uk = kv_b.transposed_groups(heads, nope + v, nope)?;
        images.push((q, image(&lw.kv_a)?, uk, kv_b, image(&lw.o_proj)?));
    }
    let mut out: Vec<DeviceLayer> = Vec::with_capacity(layers.len());
    let mut held: Vec<DeviceWeight> = Vec::new();
    let r = (|| -> Result<()> {
        for (q, kv_a, uk, kv_b, o) in &images {
            for img in q.iter().chain([kv_a, uk, kv_b, o]) {
                held.push(cuda.upload_weight(img)?);
            }
            let mut it = held.drain(..);
            let mut next = || it.next().ok_or_else(|| Error::internal("device weights"));
            let dq = match q.len() {
                2 => DeviceQ::Lora {
                    a: next()?,
                    b: next()?,
                },
                _ => DeviceQ::Direct(next()?),
            };
            out.push(DeviceLayer {
                q: dq,
                kv_a: next()?,
                uk: next()?,
                kv_b: next()?,
                o_proj: next()?,
            });
        }
        Ok(())
    })();
    if let Err(e) = r {
        for w in &held {
            cuda.free_weight(w);
        }
        for l in &out {
            l.free(cuda);
        }
        return Err(e);
    }
    Ok(out)
}

/// Whether an upload error means "keep the projections on the CPU".
pub fn is_unsupported(e: &Error) -> bool {
    e.status == Status::Unsupported
}

/// `y [tokens, groups, n_out] = x · Wᵀ` on the GPU, `x [tokens, groups, k]`
/// taken as `activations` says (split into bf16 `hi + lo`, or rounded).
pub fn project(
    cuda: &CudaBackend,
    w: &DeviceWeight,
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
    cuda.linear(w, call, &hi, &lo, y)
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
}
