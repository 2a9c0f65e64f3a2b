//! DeepSeek's rotary embedding: interleaved pairs `(x[2k], x[2k+1])`
//! rotated by `pos * freq[k]`, with YaRN frequency blending
//! (`inference/model.py`, `precompute_freqs_cis`).

use super::config::ModelConfig;
use std::f64::consts::PI;

/// Rotation frequencies and the cos/sin scale of one model.
#[derive(Clone, Debug)]
pub struct Rope {
    freqs: Vec<f64>,
    /// `yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)`.
    scale: f64,
}

fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

fn correction_dim(rotations: f64, dim: usize, base: f64, max_pos: f64) -> f64 {
    dim as f64 * (max_pos / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln())
}

impl Rope {
    pub fn new(c: &ModelConfig) -> Self {
        let dim = c.qk_rope_head_dim;
        let base = c.rope_theta;
        let mut freqs: Vec<f64> = (0..dim / 2)
            .map(|k| 1.0 / base.powf((2 * k) as f64 / dim as f64))
            .collect();
        let mut scale = 1.0;
        if let Some(y) = &c.yarn {
            let orig = y.original_max_position_embeddings as f64;
            let low = correction_dim(y.beta_fast, dim, base, orig)
                .floor()
                .max(0.0);
            let mut high = correction_dim(y.beta_slow, dim, base, orig)
                .ceil()
                .min(dim as f64 - 1.0);
            if low == high {
                high += 0.001;
            }
            for (k, f) in freqs.iter_mut().enumerate() {
                let ramp = ((k as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let smooth = 1.0 - ramp;
                *f = *f / y.factor * (1.0 - smooth) + *f * smooth;
            }
            scale = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim);
        }
        Rope { freqs, scale }
    }

    /// Rotates the rope part `x` (length `qk_rope_head_dim`) of a token at `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        for (k, pair) in x.chunks_exact_mut(2).enumerate() {
            let angle = pos as f64 * self.freqs[k];
            let (s, c) = angle.sin_cos();
            let (s, c) = (s * self.scale, c * self.scale);
            let (a, b) = (pair[0] as f64, pair[1] as f64);
            pair[0] = (a * c - b * s) as f32;
            pair[1] = (a * s + b * c) as f32;
        }
    }

    /// The (cos, sin) pairs [`Self::apply`] rotates by at `pos`, scaled,
    /// as f32 into `out` (`qk_rope_head_dim` values): the table the GPU's
    /// RoPE (`kernels/mla_rows.cuh`) reads.
    pub fn cos_sin(&self, pos: usize, out: &mut [f32]) {
        for (k, pair) in out.chunks_exact_mut(2).enumerate() {
            let (s, c) = (pos as f64 * self.freqs[k]).sin_cos();
            pair[0] = (c * self.scale) as f32;
            pair[1] = (s * self.scale) as f32;
        }
    }

    /// Rotates the first `qk_rope_head_dim` elements of `x` at `pos` in the
    /// half-split (NeoX) pairing `(x[k], x[k + rope/2])`, as DeepSeek-V3.2's
    /// indexer does; same frequencies and scale as [`Self::apply`].
    pub fn apply_half_split(&self, x: &mut [f32], pos: usize) {
        let half = self.freqs.len();
        let (lo, hi) = x[..2 * half].split_at_mut(half);
        for (k, (a, b)) in lo.iter_mut().zip(hi.iter_mut()).enumerate() {
            let angle = pos as f64 * self.freqs[k];
            let (s, c) = angle.sin_cos();
            let (s, c) = (s * self.scale, c * self.scale);
            let (x0, x1) = (*a as f64, *b as f64);
            *a = (x0 * c - x1 * s) as f32;
            *b = (x0 * s + x1 * c) as f32;
        }
    }
}
