//! Projection weights `[out, in]` kept in their stored precision (f32, bf16,
//! f16, or FP8 e4m3 with DeepSeek's 128x128 block scales) and multiplied by
//! f32 activations; each weight row is converted once per call and used for
//! every token.

use super::level::Level;
use super::scratch::Scratch;
use super::weights::{StoredDtype, Tensor};
use super::{f32_proj, fp8_bf16, gemm, vecops};
use crate::error::{Error, Result, Status};
use crate::format::fp8;
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

/// A weight's memory as [`Linear::stored`] shows it.
pub enum Stored<'a> {
    /// `[out, in]` bf16, little-endian.
    Bf16(&'a [u8]),
    /// `[out, in]` e4m3 codes and `[ceil(out/128), ceil(in/128)]` scales.
    Fp8 {
        codes: &'a [u8],
        scales: &'a [f32],
    },
    Other(Dtype),
}

/// A linear layer's weight.
#[derive(Clone, Debug)]
pub struct Linear {
    pub out: usize,
    pub inp: usize,
    data: Data,
    activations: Activations,
    /// The vector code its products run.
    level: Level,
}

/// How a projection takes its f32 activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activations {
    /// As f32. Where bf16 units do the products, each activation is split
    /// into two bf16 (`hi + lo`), which keeps about 16 of its bits.
    #[default]
    Precise,
    /// Rounded to bf16 (nearest even) first, as DeepSeek's reference
    /// implementation runs its projections: half the products of the split.
    Bf16,
}

/// Whether `tokens` fill more than half of a GEMM's token block. With
/// fewer, the padded products cost more than streaming each group of four
/// weight rows once for every token. Measured per V3 layer (decode steps,
/// ms, GEMM against streamed; FP8 weights unless noted): a 16-token AVX2
/// f32 block at 16 tokens 63 against 115, at 8 tokens 58 against 61; a
/// 32-token AVX-512 f32 block at 16 tokens 106 against 82 (bf16 weights);
/// a 16-token bf16 tile at 8 tokens 52 against 47 (57 against 46 for bf16
/// weights), at 16 tokens 59 against 74.
pub(super) fn fills(tokens: usize, block: usize) -> bool {
    2 * tokens > block
}

/// [`fills`] for FP8 weights in the f32 GEMM ([`f32_proj`]) at `lvl`: the
/// streamed path converts each FP8 vector once per four tokens, and the
/// GEMM's conversion of whole chunks costs more than bf16's widening, so
/// the GEMM pays only from 7/8 of AVX-512's 32-token block and 5/8 of
/// AVX2's 16 (where the streamed path holds two rows at a time); portable
/// code streams token by token, so it keeps 3/8. Measured
/// per V3 layer (decode steps, ms, GEMM against streamed): AVX-512 at 24
/// tokens 80–85 against 73–75, at 32 tokens 85 against 95–97; AVX2 at 8
/// tokens 39–42 against 38–46, at 12 tokens 49 against 54–57.
fn fp8_fills(lvl: Level, tokens: usize, block: usize) -> bool {
    let eighths = match lvl {
        Level::Portable => 3, // the streamed path goes token by token
        Level::Avx2 => 5,
        _ => 7,
    };
    8 * tokens > eighths * block
}

/// Rows `rows` of bf16 weights with `n` columns, as bytes.
fn bf16_rows(b: &[u8], n: usize, rows: [usize; 4]) -> [&[u8]; 4] {
    rows.map(|o| &b[o * n * 2..][..n * 2])
}

/// Rows `rows` of FP8 weights with `n` columns, and each row's block scales.
fn fp8_rows<'w>(
    codes: &'w [u8],
    scales: &'w [f32],
    n: usize,
    rows: [usize; 4],
) -> ([&'w [u8]; 4], [&'w [f32]; 4]) {
    let per_row = n.div_ceil(FP8_BLOCK);
    (
        rows.map(|o| &codes[o * n..][..n]),
        rows.map(|o| &scales[(o / FP8_BLOCK) * per_row..][..per_row]),
    )
}

/// Whether every value is a bf16 value (low 16 bits zero), so that
/// rounding to bf16 changes nothing.
fn all_bf16(x: &[f32]) -> bool {
    x.iter().all(|v| v.to_bits() & 0xffff == 0)
}

/// `x` rounded to bf16 (nearest even), as f32.
fn rounded_to_bf16(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect()
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
        let mut lin = Linear {
            out,
            inp,
            data,
            activations: Activations::Precise,
            level: Level::best(),
        };
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

    /// Sets how products take their activations.
    pub fn with_activations(self, activations: Activations) -> Self {
        Linear {
            activations,
            ..self
        }
    }

    /// How products take their activations.
    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// Runs its products at `level` (at most [`Level::best`]).
    pub fn with_level(self, level: Level) -> Self {
        Linear {
            level: level.min(Level::best()),
            ..self
        }
    }

    /// The vector code its products run.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::Plain(_, b) => b.len(),
            Data::Fp8 { codes, scales } => codes.len() + 4 * scales.len(),
        }
    }

    /// The weight as held: bf16 bytes, FP8 codes with their scales, or
    /// neither (f32, f16).
    pub fn stored(&self) -> Stored<'_> {
        match &self.data {
            Data::Plain(Dtype::Bf16, b) => Stored::Bf16(b),
            Data::Fp8 { codes, scales } => Stored::Fp8 { codes, scales },
            Data::Plain(d, _) => Stored::Other(*d),
        }
    }

    /// Rows `first..first + count` as the operand of the `vdpbf16ps` GEMM
    /// ([`gemm::matmul`]), when this weight runs there: the bf16 level, and
    /// bf16 rows or FP8 rows that start on a scale block.
    pub fn gemm_rows(&self, first: usize, count: usize) -> Option<gemm::Weights<'_>> {
        let n = self.inp;
        if self.level != Level::Avx512Bf16 || first + count > self.out {
            return None;
        }
        match &self.data {
            Data::Plain(Dtype::Bf16, b) => Some(gemm::Weights::Bf16(
                &b[first * n * 2..(first + count) * n * 2],
            )),
            Data::Fp8 { codes, scales } if first.is_multiple_of(FP8_BLOCK) => {
                Some(gemm::Weights::Fp8 {
                    codes: &codes[first * n..(first + count) * n],
                    scales: &scales[(first / FP8_BLOCK) * n.div_ceil(FP8_BLOCK)..],
                })
            }
            _ => None,
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
        self.row_range(o, 0, &mut dst[..self.inp]);
    }

    /// Columns `c0 .. c0 + dst.len()` of row `o` as f32 (FP8 dequantized);
    /// `c0` must be a multiple of the FP8 block (128) for FP8 weights.
    pub fn row_range(&self, o: usize, c0: usize, dst: &mut [f32]) {
        let (n, len) = (self.inp, dst.len());
        debug_assert!(c0 + len <= n);
        match &self.data {
            Data::Plain(Dtype::Bf16, b) => {
                // Converted in vectors, the row's chunk after next
                // prefetched: a batched step converts every weight once, 256
                // columns of 48 rows at a time (f32_proj), and one chunk
                // ahead measured too late.
                let at = (o * n + c0) * 2;
                vecops::widen_bf16(self.level, &b[at..at + len * 2], dst, 4 * len)
            }
            Data::Plain(d, b) => {
                let at = (o * n + c0) * d.size();
                load_slice(*d, &b[at..at + len * d.size()], dst)
            }
            Data::Fp8 { codes, scales } => {
                debug_assert!(c0.is_multiple_of(FP8_BLOCK));
                let srow = &scales[(o / FP8_BLOCK) * n.div_ceil(FP8_BLOCK) + c0 / FP8_BLOCK..];
                let blocks = codes[o * n + c0..o * n + c0 + len]
                    .chunks(FP8_BLOCK)
                    .zip(dst.chunks_mut(FP8_BLOCK));
                for ((src, d), &scale) in blocks.zip(srow) {
                    // All are exact: the same values whichever runs.
                    match self.level {
                        Level::Avx512 | Level::Avx512Bf16 => fp8::dequantize_tile(src, scale, d),
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: the level is capped by the CPU: AVX2 and F16C.
                        Level::Avx2 => unsafe { fp8::simd::dequantize_tile_avx2(src, scale, d) },
                        _ => fp8::dequantize_tile_portable(src, scale, d),
                    }
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
                    acc += vecops::dot(self.level, &buf[..m], &x[c * 256..c * 256 + m]);
                }
                acc
            }
            Data::Plain(Dtype::F16, b) => {
                vecops::dot_f16(self.level, &b[o * n * 2..(o + 1) * n * 2], &x[..n])
            }
            Data::Plain(_, b) => {
                vecops::dot_bf16(self.level, &b[o * n * 2..(o + 1) * n * 2], &x[..n])
            }
            Data::Fp8 { codes, scales } => {
                let per_row = n.div_ceil(FP8_BLOCK);
                let srow = &scales[(o / FP8_BLOCK) * per_row..][..per_row];
                vecops::dot_fp8(
                    self.level,
                    &codes[o * n..(o + 1) * n],
                    srow,
                    FP8_BLOCK,
                    &x[..n],
                )
            }
        }
    }

    /// `x` prepared for [`Linear::dot4`]: the bf16 split that the FP8
    /// `vdpbf16ps` path reads, when this weight is FP8 and the CPU has it.
    pub fn prepare(&self, x: &[f32]) -> Option<fp8_bf16::SplitX> {
        match self.data {
            Data::Fp8 { .. } if self.level == Level::Avx512Bf16 => {
                Some(fp8_bf16::SplitX::new(&x[..self.inp]))
            }
            _ => None,
        }
    }

    /// Rows `rows` times `x` (repeat an index to use fewer than four),
    /// converted in registers; `split` is `self.prepare(x)`. Each call
    /// prefetches the four rows that follow, which is where a row-ordered
    /// sweep goes next.
    pub fn dot4(&self, rows: [usize; 4], x: &[f32], split: Option<&fp8_bf16::SplitX>) -> [f32; 4] {
        let n = self.inp;
        match &self.data {
            Data::Plain(Dtype::Bf16, b) => {
                vecops::dot_bf16_x4(self.level, bf16_rows(b, n, rows), &x[..n], 8 * n)
            }
            Data::Fp8 { codes, scales } => {
                let (r, sc) = fp8_rows(codes, scales, n, rows);
                match split {
                    Some(xs) => fp8_bf16::dot_fp8_x4(r, sc, FP8_BLOCK, xs, &x[..n], 4 * n),
                    None => vecops::dot_fp8_x4(self.level, r, sc, FP8_BLOCK, &x[..n], 4 * n),
                }
            }
            _ => rows.map(|o| self.dot_row(o, x)),
        }
    }

    /// [`Self::dot4`] for the tokens `xs` (at most
    /// [`fp8_bf16::DOT_TOKENS`]), `splits[t]` being `self.prepare(xs[t])`:
    /// with two or more, FP8 and bf16 rows are converted once for several
    /// tokens. `[t][k]` is row `rows[k]` times token `t`.
    ///
    /// # Panics
    /// When `xs` and `splits` differ in length or hold more than
    /// [`fp8_bf16::DOT_TOKENS`] (a bug in the caller).
    pub fn dot4_tokens(
        &self,
        rows: [usize; 4],
        xs: &[&[f32]],
        splits: &[Option<&fp8_bf16::SplitX>],
    ) -> [[f32; 4]; fp8_bf16::DOT_TOKENS] {
        let (n, m) = (self.inp, xs.len());
        assert!(splits.len() == m && m <= fp8_bf16::DOT_TOKENS);
        let mut out = [[0f32; 4]; fp8_bf16::DOT_TOKENS];
        // One token keeps the single-token dot, whose eight sums per row
        // group hide the product latency (the batch-1 weight stream).
        if m > 1 {
            match &self.data {
                Data::Fp8 { codes, scales } => {
                    // Every token split (the bf16 level), as `&SplitX`.
                    let all: Option<[&fp8_bf16::SplitX; fp8_bf16::DOT_TOKENS]> = (|| {
                        let mut sp = [splits[0]?; fp8_bf16::DOT_TOKENS];
                        for (d, s) in sp.iter_mut().zip(splits) {
                            *d = (*s)?;
                        }
                        Some(sp)
                    })(
                    );
                    let (r, sc) = fp8_rows(codes, scales, n, rows);
                    if let Some(sp) = all {
                        return fp8_bf16::dot_fp8_x4_tokens(r, sc, FP8_BLOCK, &sp[..m], xs, 4 * n);
                    }
                    // The f32 levels (no split): converted to f32 once for
                    // several tokens.
                    if splits.iter().all(Option::is_none) {
                        let xs: [&[f32]; fp8_bf16::DOT_TOKENS] =
                            std::array::from_fn(|t| xs.get(t).map_or(&[][..], |x| &x[..n]));
                        vecops::dot_fp8_x4_tokens(
                            self.level,
                            r,
                            sc,
                            FP8_BLOCK,
                            &xs[..m],
                            4 * n,
                            &mut out[..m],
                        );
                        return out;
                    }
                }
                Data::Plain(Dtype::Bf16, b) => {
                    let r = bf16_rows(b, n, rows);
                    vecops::dot_bf16_x4_tokens(self.level, r, xs, 8 * n, &mut out[..m]);
                    return out;
                }
                _ => {}
            }
        }
        for (o, (x, s)) in out.iter_mut().zip(xs.iter().zip(splits)) {
            *o = self.dot4(rows, x, *s);
        }
        out
    }

    /// `y += Σ a[k] · row(rows[k])`, converted in registers (repeat an index
    /// with a zero coefficient to use fewer than four rows).
    pub fn axpy4(&self, rows: [usize; 4], a: [f32; 4], y: &mut [f32]) {
        let n = self.inp;
        match &self.data {
            Data::Plain(Dtype::Bf16, b) => {
                vecops::axpy_bf16_x4(self.level, bf16_rows(b, n, rows), a, &mut y[..n], 8 * n)
            }
            Data::Fp8 { codes, scales } => {
                let (r, sc) = fp8_rows(codes, scales, n, rows);
                vecops::axpy_fp8_x4(self.level, r, sc, FP8_BLOCK, a, &mut y[..n], 4 * n)
            }
            Data::Plain(d, b) => {
                // f32 and f16 rows: convert 256 elements at a time on the stack.
                let size = d.size();
                let mut buf = [0f32; 256];
                for (&o, &ak) in rows.iter().zip(&a) {
                    for (c, yc) in y[..n].chunks_mut(256).enumerate() {
                        let m = yc.len();
                        load_slice(
                            *d,
                            &b[(o * n + c * 256) * size..][..m * size],
                            &mut buf[..m],
                        );
                        vecops::axpy(self.level, yc, ak, &buf[..m]);
                    }
                }
            }
        }
    }

    /// `y [t, out] = x [t, inp] · Wᵀ`, on the current rayon pool, with `x`
    /// taken as [`Self::activations`] says. Few tokens (decode): a pure
    /// weight stream, rows converted in registers, four rows per pass over
    /// `x`. Many tokens (prefill): bf16 and FP8 weights go through the
    /// register-tiled GEMM of [`gemm`] at the bf16 level (AVX512-BF16 and
    /// VBMI); otherwise rows are converted to f32 a chunk at a time and go
    /// through the f32 GEMM of [`f32_proj`].
    pub fn matmul(&self, x: &[f32], tokens: usize, y: &mut [f32]) {
        self.matmul_with(x, tokens, y, &Scratch::default())
    }

    /// [`Self::matmul`] with its large temporaries from `scratch`.
    pub fn matmul_with(&self, x: &[f32], tokens: usize, y: &mut [f32], scratch: &Scratch) {
        self.matmul_rows_with(0, self.out, x, tokens, y, scratch)
    }

    /// [`Self::matmul_with`] for the weight rows `first..first + out`
    /// alone: `y [tokens, out]`.
    pub fn matmul_rows_with(
        &self,
        first: usize,
        out: usize,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        scratch: &Scratch,
    ) {
        let inp = self.inp;
        debug_assert!(first + out <= self.out);
        debug_assert!(x.len() >= tokens * inp && y.len() >= tokens * out);
        let x = &x[..tokens * inp];
        if let Some(w) = self.gemm_rows(first, out) {
            // Activations that are bf16 values (bf16 hidden states) lose
            // nothing in the faster bf16 tile, when enough tokens fill it
            // (checked first: the scan reads every activation).
            let a = match self.activations {
                Activations::Precise if gemm::takes(Activations::Bf16, tokens) && all_bf16(x) => {
                    Activations::Bf16
                }
                a => a,
            };
            if gemm::takes(a, tokens) {
                return gemm::matmul(w, out, inp, x, tokens, y, a, scratch);
            }
        }
        let rounded;
        let x = match self.activations {
            Activations::Bf16 if !all_bf16(x) => {
                rounded = rounded_to_bf16(x);
                &rounded[..]
            }
            _ => x,
        };
        let block = f32_proj::block_tokens(self.level);
        let gemm = match self.data {
            Data::Fp8 { .. } => fp8_fills(self.level, tokens, block),
            Data::Plain(..) => fills(tokens, block),
        };
        if gemm {
            let row = |o: usize, c0: usize, dst: &mut [f32]| self.row_range(first + o, c0, dst);
            return f32_proj::matmul(self.level, x, tokens, inp, out, row, y, scratch);
        }
        const ROWS: usize = 16;
        // yt [out, tokens], so each task owns whole weight rows.
        let mut yt = scratch.overwritten::<f32>(out * tokens);
        let split: Vec<Option<fp8_bf16::SplitX>> =
            (0..tokens).map(|t| self.prepare(&x[t * inp..])).collect();
        yt.par_chunks_mut(tokens * ROWS)
            .enumerate()
            .for_each(|(c, chunk)| {
                let rows_here = chunk.len() / tokens;
                // Four rows share each pass over x: o_proj's x is 64 KiB,
                // larger than L1.
                for r in (0..rows_here).step_by(4) {
                    let group = 4.min(rows_here - r);
                    let rows = [0, 1, 2, 3].map(|k| first + c * ROWS + r + k.min(group - 1));
                    // A few tokens at a time share each conversion of the rows.
                    for t0 in (0..tokens).step_by(fp8_bf16::DOT_TOKENS) {
                        let t1 = tokens.min(t0 + fp8_bf16::DOT_TOKENS);
                        let mut xs: [&[f32]; fp8_bf16::DOT_TOKENS] = [&[]; fp8_bf16::DOT_TOKENS];
                        let mut splits = [None; fp8_bf16::DOT_TOKENS];
                        for (t, (xd, sd)) in (t0..t1).zip(xs.iter_mut().zip(&mut splits)) {
                            *xd = &x[t * inp..(t + 1) * inp];
                            *sd = split[t].as_ref();
                        }
                        let m = t1 - t0;
                        let v = self.dot4_tokens(rows, &xs[..m], &splits[..m]);
                        for (t, vt) in (t0..t1).zip(&v) {
                            for (k, &val) in vt.iter().enumerate().take(group) {
                                chunk[(r + k) * tokens + t] = val;
                            }
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

/// Weights of every stored dtype for the model's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::format::fp8::f32_to_e4m3;

    fn tensor(dtype: StoredDtype, shape: &[usize], bytes: Vec<u8>) -> Tensor {
        Tensor {
            name: "w".into(),
            dtype,
            shape: shape.to_vec(),
            bytes,
        }
    }

    pub use crate::model::gen::uniform as values;

    /// One random `[out, inp]` weight as bf16, f16, f32 and FP8 (scales
    /// that differ per 128x128 block).
    pub fn every_dtype(out: usize, inp: usize, seed: u64) -> Vec<Linear> {
        let w = values(out * inp, seed);
        let bytes = |f: fn(f32) -> [u8; 2]| w.iter().flat_map(|v| f(*v)).collect::<Vec<u8>>();
        let (sr, sc) = (out.div_ceil(FP8_BLOCK), inp.div_ceil(FP8_BLOCK));
        let scales: Vec<f32> = (0..sr * sc).map(|k| 0.01 * (1 + k) as f32).collect();
        let codes: Vec<u8> = (0..out * inp)
            .map(|i| f32_to_e4m3(w[i] / scales[(i / inp / FP8_BLOCK) * sc + (i % inp) / FP8_BLOCK]))
            .collect();
        let sbytes: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
        let plain = |dtype, b| {
            Linear::new(
                tensor(dtype, &[out, inp], b),
                None,
                out,
                inp,
                WeightCompute::AsStored,
            )
        };
        vec![
            plain(
                StoredDtype::Bf16,
                bytes(|v| half::bf16::from_f32(v).to_bits().to_le_bytes()),
            ),
            plain(
                StoredDtype::F16,
                bytes(|v| half::f16::from_f32(v).to_bits().to_le_bytes()),
            ),
            plain(
                StoredDtype::F32,
                w.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Linear::new(
                tensor(StoredDtype::Fp8E4m3, &[out, inp], codes),
                Some(tensor(StoredDtype::F32, &[sr, sc], sbytes)),
                out,
                inp,
                WeightCompute::AsStored,
            ),
        ]
        .into_iter()
        .map(|l| l.expect("valid test weight"))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{every_dtype, values};
    use super::*;

    fn close(got: f32, want: f64) -> bool {
        (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs())
    }

    /// Every matmul path (decode row-groups of 4 with partial groups, the
    /// prefill path) equals `row()` dotted in f64 with `x`, or with `x`
    /// rounded to bf16 for bf16 activations; and activations that are bf16
    /// values already (which take the bf16 paths in precise mode) too.
    /// (The tolerance is far below bf16's rounding error, so taking the
    /// activations the wrong way fails.)
    #[test]
    fn matmul_matches_rows_for_every_dtype_and_shape() {
        // (40, 1100): two blocks of rows and three column chunks of the f32
        // GEMM, the last ones partial.
        for (out, inp) in [(7usize, 37usize), (18, 130), (33, 300), (40, 1100)] {
            let linears = every_dtype(out, inp, (out * inp) as u64);
            for lin in Level::available()
                .into_iter()
                .flat_map(|l| linears.iter().map(move |lin| lin.clone().with_level(l)))
            {
                for tokens in [1usize, 3, 4, 5, 9, 12, 13, 16, 17, 33, 40] {
                    let x = values(tokens * inp, tokens as u64);
                    let x_bf16 = rounded_to_bf16(&x);
                    for (a, x, want_x, what) in [
                        (Activations::Precise, &x, &x, "precise"),
                        (Activations::Bf16, &x, &x_bf16, "bf16"),
                        (Activations::Precise, &x_bf16, &x_bf16, "precise, bf16 x"),
                    ] {
                        let lin = lin.clone().with_activations(a);
                        let mut y = vec![f32::NAN; tokens * out];
                        lin.matmul(x, tokens, &mut y);
                        let mut row = vec![0f32; inp];
                        for o in 0..out {
                            lin.row(o, &mut row);
                            for t in 0..tokens {
                                let want: f64 = row
                                    .iter()
                                    .zip(&want_x[t * inp..])
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum();
                                let got = y[t * out + o];
                                assert!(
                                    close(got, want),
                                    "{:?} {:?} {what} {out}x{inp} t{tokens} [{t},{o}]: {got} vs {want}",
                                    lin.level(),
                                    lin.dtype()
                                );
                            }
                        }
                        // A range of rows alone gives the same values.
                        let (first, count) = (out / 3, out - out / 3 - 1);
                        let mut yr = vec![f32::NAN; tokens * count];
                        lin.matmul_rows_with(first, count, x, tokens, &mut yr, &Scratch::default());
                        for t in 0..tokens {
                            for o in 0..count {
                                let (got, want) = (yr[t * count + o], y[t * out + first + o]);
                                assert!(
                                    close(got, want as f64),
                                    "{:?} {:?} {what} rows {first}+{count} t{tokens} [{t},{o}]: {got} vs {want}",
                                    lin.level(),
                                    lin.dtype()
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// `dot4_tokens` for one to four tokens (the multi-token FP8 and bf16
    /// dots, and the single-token one), against `row()` in f64.
    #[test]
    fn dot4_tokens_matches_rows() {
        // 700 columns: five full FP8 blocks, a partial one and a tail chunk.
        let (out, inp) = (300usize, 700usize);
        let linears = every_dtype(out, inp, 6);
        for lin in Level::available()
            .into_iter()
            .flat_map(|l| linears.iter().map(move |lin| lin.clone().with_level(l)))
        {
            // Token 2 is bf16 values (no `lo` half), the others are not.
            let xs: Vec<Vec<f32>> = (0..fp8_bf16::DOT_TOKENS)
                .map(|t| {
                    let x = values(inp, 20 + t as u64);
                    if t == 2 {
                        rounded_to_bf16(&x)
                    } else {
                        x
                    }
                })
                .collect();
            let splits: Vec<_> = xs.iter().map(|x| lin.prepare(x)).collect();
            let mut row = vec![0f32; inp];
            for rows in [[0usize, 1, 2, 3], [299, 130, 7, 7]] {
                for m in 1..=fp8_bf16::DOT_TOKENS {
                    let x: Vec<&[f32]> = xs[..m].iter().map(|x| &x[..]).collect();
                    let s: Vec<_> = splits[..m].iter().map(Option::as_ref).collect();
                    let got = lin.dot4_tokens(rows, &x, &s);
                    for (t, x) in x.iter().enumerate() {
                        for (k, &o) in rows.iter().enumerate() {
                            lin.row(o, &mut row);
                            let want: f64 =
                                row.iter().zip(*x).map(|(a, b)| *a as f64 * *b as f64).sum();
                            assert!(
                                close(got[t][k], want),
                                "{:?} {:?} {m} tokens [{t}][{k}]: {} vs {want}",
                                lin.level(),
                                lin.dtype(),
                                got[t][k]
                            );
                        }
                    }
                    assert!(got[m..].iter().all(|v| *v == [0.0; 4]), "past the tokens");
                }
            }
        }
    }

    /// `dot4` (with and without the FP8 bf16 split) and `axpy4` on rows in
    /// any order, repeated rows included, against `row()` in f64.
    #[test]
    fn dot4_and_axpy4_match_rows() {
        let (out, inp) = (300usize, 700usize);
        let linears = every_dtype(out, inp, 5);
        for lin in Level::available()
            .into_iter()
            .flat_map(|l| linears.iter().map(move |lin| lin.clone().with_level(l)))
        {
            let x = values(inp, 9);
            let split = lin.prepare(&x);
            assert_eq!(
                split.is_some(),
                lin.dtype() == Dtype::Fp8E4m3 && lin.level() == Level::Avx512Bf16
            );
            let mut row = vec![0f32; inp];
            for rows in [[0usize, 1, 2, 3], [299, 130, 7, 7], [128, 127, 256, 255]] {
                let a = [0.5f32, -2.0, 1.25, 0.0];
                let mut y = values(inp, 11);
                let y0 = y.clone();
                lin.axpy4(rows, a, &mut y);
                let mut want_y: Vec<f64> = y0.iter().map(|v| *v as f64).collect();
                for (k, &o) in rows.iter().enumerate() {
                    lin.row(o, &mut row);
                    let want: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    for (s, label) in [(split.as_ref(), "split"), (None, "f32")] {
                        let got = lin.dot4(rows, &x, s)[k];
                        assert!(
                            close(got, want),
                            "{:?} {:?} dot4 {label} {rows:?}[{k}]: {got} vs {want}",
                            lin.level(),
                            lin.dtype()
                        );
                    }
                    for (w, r) in want_y.iter_mut().zip(&row) {
                        *w += a[k] as f64 * *r as f64;
                    }
                }
                for (c, (&got, &want)) in y.iter().zip(&want_y).enumerate() {
                    assert!(
                        close(got, want),
                        "{:?} {:?} axpy4 {rows:?} [{c}]: {got} vs {want}",
                        lin.level(),
                        lin.dtype()
                    );
                }
            }
        }
    }
}
