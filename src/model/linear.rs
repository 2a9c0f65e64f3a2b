//! Projection weights `[out, in]` kept in their stored precision (f32, bf16,
//! f16, or FP8 e4m3 with DeepSeek's 128x128 block scales) and multiplied by
//! f32 activations; each weight row is converted once per call and used for
//! every token.

use super::vecops;
use super::weights::{StoredDtype, Tensor};
use crate::error::{Error, Result, Status};
use crate::format::fp8::E4M3_TABLE;
use crate::format::{load_slice, store_slice, Dtype};
use rayon::prelude::*;

/// Side of DeepSeek-V3's FP8 weight-scale blocks.
pub const FP8_BLOCK: usize = 128;

#[derive(Clone, Debug)]
enum Data {
    Plain(Dtype, Vec<u8>),
    /// Codes `[out, in]` and `scale_inv [ceil(out/128), ceil(in/128)]`
    /// (a multiplier, despite its name).
    Fp8 {
        codes: Vec<u8>,
        scales: Vec<f32>,
    },
}

/// A linear layer's weight.
#[derive(Clone, Debug)]
pub struct Linear {
    pub out: usize,
    pub inp: usize,
    data: Data,
}

/// How to keep weights in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightCompute {
    /// As stored in the checkpoint.
    AsStored,
    /// Converted at load (FP8 dequantized) to this dtype.
    Convert(Dtype),
}

impl Linear {
    /// Builds a weight from its tensor (and FP8 scales), checking the shape.
    pub fn new(
        w: Tensor,
        scale_inv: Option<Tensor>,
        out: usize,
        inp: usize,
        compute: WeightCompute,
    ) -> Result<Self> {
        w.expect_shape(&[out, inp])?;
        let data = match (w.dtype, scale_inv) {
            (StoredDtype::Fp8E4m3, Some(s)) => {
                s.expect_shape(&[out.div_ceil(FP8_BLOCK), inp.div_ceil(FP8_BLOCK)])?;
                if s.dtype != StoredDtype::F32 {
                    return Err(Error::new(
                        Status::Unsupported,
                        format!("{}: dtype {:?}, expected F32", s.name, s.dtype),
                    ));
                }
                Data::Fp8 {
                    scales: s.to_f32(),
                    codes: w.bytes,
                }
            }
            (StoredDtype::Fp8E4m3, None) => {
                return Err(Error::not_found(format!(
                    "{}: FP8 weight without its {}_scale_inv tensor",
                    w.name, w.name
                )))
            }
            (StoredDtype::F32, _) => Data::Plain(Dtype::F32, w.bytes),
            (StoredDtype::Bf16, _) => Data::Plain(Dtype::Bf16, w.bytes),
            (StoredDtype::F16, _) => Data::Plain(Dtype::F16, w.bytes),
        };
        let mut lin = Linear { out, inp, data };
        if let WeightCompute::Convert(dtype) = compute {
            lin = lin.converted(dtype);
        }
        Ok(lin)
    }

    fn converted(self, dtype: Dtype) -> Self {
        if matches!(&self.data, Data::Plain(d, _) if *d == dtype) {
            return self;
        }
        let mut bytes = vec![0u8; self.out * self.inp * dtype.size()];
        let mut row = vec![0f32; self.inp];
        for o in 0..self.out {
            self.row(o, &mut row);
            let n = self.inp * dtype.size();
            store_slice(dtype, &row, &mut bytes[o * n..(o + 1) * n]);
        }
        Linear {
            data: Data::Plain(dtype, bytes),
            ..self
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::Plain(_, b) => b.len(),
            Data::Fp8 { codes, scales } => codes.len() + 4 * scales.len(),
        }
    }

    /// Dtype of the weight in memory (FP8 reported as such).
    pub fn dtype(&self) -> Dtype {
        match &self.data {
            Data::Plain(d, _) => *d,
            Data::Fp8 { .. } => Dtype::Fp8E4m3,
        }
    }

    /// Row `o` of the weight as f32 (FP8 dequantized).
    pub fn row(&self, o: usize, dst: &mut [f32]) {
        let n = self.inp;
        match &self.data {
            Data::Plain(d, b) => load_slice(
                *d,
                &b[o * n * d.size()..(o + 1) * n * d.size()],
                &mut dst[..n],
            ),
            Data::Fp8 { codes, scales } => {
                let srow = &scales[(o / FP8_BLOCK) * n.div_ceil(FP8_BLOCK)..];
                for (k, (d, &c)) in dst[..n]
                    .iter_mut()
                    .zip(&codes[o * n..(o + 1) * n])
                    .enumerate()
                {
                    *d = E4M3_TABLE[c as usize] * srow[k / FP8_BLOCK];
                }
            }
        }
    }

    /// Row `o` of the weight times `x`, converted in registers.
    pub fn dot_row(&self, o: usize, x: &[f32]) -> f32 {
        let n = self.inp;
        match &self.data {
            Data::Plain(Dtype::F32, b) => {
                let bytes = &b[o * n * 4..(o + 1) * n * 4];
                // f32 rows are stored as bytes; convert through a small stack buffer.
                let mut acc = 0f32;
                let mut buf = [0f32; 256];
                for (c, chunk) in bytes.chunks(1024).enumerate() {
                    let m = chunk.len() / 4;
                    load_slice(Dtype::F32, chunk, &mut buf[..m]);
                    acc += vecops::dot(&buf[..m], &x[c * 256..c * 256 + m]);
                }
                acc
            }
            Data::Plain(Dtype::F16, b) => vecops::dot_f16(&b[o * n * 2..(o + 1) * n * 2], &x[..n]),
            Data::Plain(_, b) => vecops::dot_bf16(&b[o * n * 2..(o + 1) * n * 2], &x[..n]),
            Data::Fp8 { codes, scales } => {
                let per_row = n.div_ceil(FP8_BLOCK);
                let srow = &scales[(o / FP8_BLOCK) * per_row..][..per_row];
                vecops::dot_fp8(&codes[o * n..(o + 1) * n], srow, FP8_BLOCK, &x[..n])
            }
        }
    }

    /// `y [t, out] = x [t, inp] · Wᵀ`, on the current rayon pool. Weight
    /// rows are read once per call: converted in registers for each token
    /// when there are few tokens (decode: a pure weight stream), converted
    /// once to f32 and reused when there are many (prefill).
    pub fn matmul(&self, x: &[f32], tokens: usize, y: &mut [f32]) {
        let (inp, out) = (self.inp, self.out);
        debug_assert!(x.len() >= tokens * inp && y.len() >= tokens * out);
        const ROWS: usize = 16;
        // yt [out, tokens], so each task owns whole weight rows.
        let mut yt = vec![0f32; out * tokens];
        yt.par_chunks_mut(tokens * ROWS)
            .enumerate()
            .for_each(|(c, chunk)| {
                // bf16 decode: four rows per pass over x (see dot_bf16_x4).
                if let (true, Data::Plain(Dtype::Bf16, b)) = (tokens <= 4, &self.data) {
                    let rows_here = chunk.len() / tokens;
                    let mut r = 0;
                    while r < rows_here {
                        let o = c * ROWS + r;
                        let group = 4.min(rows_here - r);
                        let row = |k: usize| &b[(o + k.min(group - 1)) * inp * 2..][..inp * 2];
                        for t in 0..tokens {
                            let v = vecops::dot_bf16_x4(
                                [row(0), row(1), row(2), row(3)],
                                &x[t * inp..(t + 1) * inp],
                            );
                            for (k, &val) in v.iter().enumerate().take(group) {
                                chunk[(r + k) * tokens + t] = val;
                            }
                        }
                        r += group;
                    }
                    return;
                }
                if let (true, Data::Fp8 { codes, scales }) = (tokens <= 4, &self.data) {
                    let rows_here = chunk.len() / tokens;
                    let per_row = inp.div_ceil(FP8_BLOCK);
                    let mut r = 0;
                    while r < rows_here {
                        let o = c * ROWS + r;
                        let group = 4.min(rows_here - r);
                        let at = |k: usize| o + k.min(group - 1);
                        let row = |k: usize| &codes[at(k) * inp..][..inp];
                        let sc = |k: usize| &scales[(at(k) / FP8_BLOCK) * per_row..][..per_row];
                        for t in 0..tokens {
                            let v = vecops::dot_fp8_x4(
                                [row(0), row(1), row(2), row(3)],
                                [sc(0), sc(1), sc(2), sc(3)],
                                FP8_BLOCK,
                                &x[t * inp..(t + 1) * inp],
                            );
                            for (k, &val) in v.iter().enumerate().take(group) {
                                chunk[(r + k) * tokens + t] = val;
                            }
                        }
                        r += group;
                    }
                    return;
                }
                let mut row = Vec::new();
                for (r, yrow) in chunk.chunks_mut(tokens).enumerate() {
                    let o = c * ROWS + r;
                    if tokens <= 4 {
                        for (t, yv) in yrow.iter_mut().enumerate() {
                            *yv = self.dot_row(o, &x[t * inp..(t + 1) * inp]);
                        }
                    } else {
                        row.resize(inp, 0.0);
                        self.row(o, &mut row);
                        for (t, yv) in yrow.iter_mut().enumerate() {
                            *yv = vecops::dot(&row, &x[t * inp..(t + 1) * inp]);
                        }
                    }
                }
            });
        for (o, yrow) in yt.chunks(tokens).enumerate() {
            for (t, &v) in yrow.iter().enumerate() {
                y[t * out + o] = v;
            }
        }
    }
}

pub use vecops::dot;

/// In-place RMSNorm of each `dim`-row of `x`: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let dim = w.len();
    for row in x.chunks_mut(dim) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, &g) in row.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::fp8::f32_to_e4m3;

    fn tensor(name: &str, dtype: StoredDtype, shape: &[usize], bytes: Vec<u8>) -> Tensor {
        Tensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            bytes,
        }
    }

    /// Every matmul path (decode row-groups of 4 with partial groups, the
    /// per-row path, the prefill path) equals `row()` dotted in f64.
    #[test]
    fn matmul_matches_rows_for_every_dtype_and_shape() {
        for (out, inp) in [(7usize, 37usize), (18, 130), (33, 300)] {
            let w: Vec<f32> = (0..out * inp)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 60.0)
                .collect();
            let bf: Vec<u8> = w
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect();
            let f32b: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            let (sr, sc) = (out.div_ceil(FP8_BLOCK), inp.div_ceil(FP8_BLOCK));
            let scales: Vec<f32> = (0..sr * sc).map(|k| 0.01 * (1 + k) as f32).collect();
            let codes: Vec<u8> = (0..out * inp)
                .map(|i| {
                    f32_to_e4m3(w[i] / scales[(i / inp / FP8_BLOCK) * sc + (i % inp) / FP8_BLOCK])
                })
                .collect();
            let sbytes: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
            let lins = [
                Linear::new(
                    tensor("w", StoredDtype::Bf16, &[out, inp], bf),
                    None,
                    out,
                    inp,
                    WeightCompute::AsStored,
                ),
                Linear::new(
                    tensor("w", StoredDtype::F32, &[out, inp], f32b),
                    None,
                    out,
                    inp,
                    WeightCompute::AsStored,
                ),
                Linear::new(
                    tensor("w", StoredDtype::Fp8E4m3, &[out, inp], codes),
                    Some(tensor("s", StoredDtype::F32, &[sr, sc], sbytes)),
                    out,
                    inp,
                    WeightCompute::AsStored,
                ),
            ];
            for lin in lins {
                let lin = lin.unwrap();
                for tokens in [1usize, 3, 4, 5] {
                    let x: Vec<f32> = (0..tokens * inp)
                        .map(|i| ((i * 13 % 29) as f32 - 14.0) / 10.0)
                        .collect();
                    let mut y = vec![f32::NAN; tokens * out];
                    lin.matmul(&x, tokens, &mut y);
                    let mut row = vec![0f32; inp];
                    for o in 0..out {
                        lin.row(o, &mut row);
                        for t in 0..tokens {
                            let want: f64 = row
                                .iter()
                                .zip(&x[t * inp..])
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum();
                            let got = y[t * out + o] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{:?} {out}x{inp} t{tokens} [{t},{o}]: {got} vs {want}",
                                lin.dtype()
                            );
                        }
                    }
                }
            }
        }
    }
}
