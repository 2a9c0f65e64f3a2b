//! The model's projections on the GPU (`kernels/mla_linear.cuh`): weights
//! as the kernels read them, and the launch plan of one product. Pure, so
//! every machine tests it; `device.rs` uploads and launches.

use super::lowering::int;
use super::params::LinearParams;
use crate::error::{Error, Result};

/// Output columns per block (`MLA_LINEAR_COLS`).
pub const LINEAR_COLS: usize = 32;
/// Threads per block (`MLA_LINEAR_THREADS`).
pub const LINEAR_THREADS: u32 = 128;
/// K ranges are multiples of it (`MLA_LINEAR_STEP`).
pub const LINEAR_STEP: usize = 128;
/// Keys whose FP8 products share one scale multiply in the kernels: a
/// weight's scale must not change inside such a run.
pub const SCALE_KEYS: usize = 64;
/// Threads per block of `mla_linear_reduce` (`MLA_REDUCE_THREADS`).
pub const REDUCE_THREADS: u32 = 256;
pub const REDUCE_KERNEL: &str = "mla_linear_reduce";
/// Entry points: [bf16, FP8] x [16 tokens per pass, 64].
pub const LINEAR_KERNELS: [[&str; 2]; 2] = [
    ["mla_linear_bf16_m1", "mla_linear_bf16_m4"],
    ["mla_linear_fp8_m1", "mla_linear_fp8_m4"],
];
/// DeepSeek-V3's FP8 weight-scale block side.
const FP8_BLOCK: usize = 128;
/// Blocks per SM a product aims for (4 warps each; the decode kernels are
/// built for 8 per SM, at most 64 registers a thread): with up to four
/// 16-byte weight loads per lane in flight that is 64 KiB per SM, above
/// the ~36 KiB an H200's bandwidth-latency product asks.
const BLOCKS_PER_SM: usize = 8;
/// At most this many K ranges (bounds the partials' memory).
const MAX_SPLIT: usize = 32;

/// A weight's shape as the kernels read it: `[rows, k]` of bf16, or of
/// e4m3 codes with f32 scales (a multiplier) per `scale_rdiv` rows and
/// `scale_kdiv` keys, `scale_cols` per scale row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightShape {
    pub fp8: bool,
    pub rows: usize,
    pub k: usize,
    pub scale_rdiv: usize,
    pub scale_kdiv: usize,
    pub scale_cols: usize,
}

/// A weight's bytes as they go to the device.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightImage {
    pub shape: WeightShape,
    /// `[rows, k]`: bf16 (little-endian pairs of bytes) or e4m3 codes.
    pub bytes: Vec<u8>,
    /// FP8 only: `[ceil(rows / scale_rdiv), scale_cols]`.
    pub scales: Vec<f32>,
}

impl WeightImage {
    /// A bf16 weight `[rows, k]`.
    pub fn bf16(bytes: &[u8], rows: usize, k: usize) -> Result<Self> {
        if bytes.len() != rows * k * 2 {
            return Err(Error::internal("bf16 weight is not [rows, k]"));
        }
        let img = WeightImage {
            shape: WeightShape {
                fp8: false,
                rows,
                k,
                scale_rdiv: 1,
                scale_kdiv: 1,
                scale_cols: 0,
            },
            bytes: bytes.to_vec(),
            scales: Vec::new(),
        };
        img.check_k()?;
        Ok(img)
    }

    /// An FP8 weight `[rows, k]` with DeepSeek-V3's scales
    /// `[ceil(rows / 128), ceil(k / 128)]`.
    pub fn fp8(codes: &[u8], scales: &[f32], rows: usize, k: usize) -> Result<Self> {
        let cols = k.div_ceil(FP8_BLOCK);
        if codes.len() != rows * k || scales.len() != rows.div_ceil(FP8_BLOCK) * cols {
            return Err(Error::internal(
                "FP8 weight is not [rows, k] with 128x128 scales",
            ));
        }
        let img = WeightImage {
            shape: WeightShape {
                fp8: true,
                rows,
                k,
                scale_rdiv: FP8_BLOCK,
                scale_kdiv: FP8_BLOCK,
                scale_cols: cols,
            },
            bytes: codes.to_vec(),
            scales: scales.to_vec(),
        };
        img.check_k()?;
        Ok(img)
    }

    /// The kernels load 16 bytes of a row at a time, whole or not at all.
    fn check_k(&self) -> Result<()> {
        let WeightShape { fp8, k, .. } = self.shape;
        let unit = if fp8 { 16 } else { 8 };
        if k == 0 || !k.is_multiple_of(unit) {
            return Err(Error::unsupported(format!(
                "a {} weight's input size {k} is not a multiple of {unit}, which the GPU projections need",
                if fp8 { "FP8" } else { "bf16" },
            )));
        }
        Ok(())
    }

    /// Element `[row, col]` as the kernels multiply it (for tests).
    #[cfg(test)]
    pub(crate) fn value(&self, row: usize, col: usize) -> f64 {
        let sh = self.shape;
        if sh.fp8 {
            let s = self.scales[(row / sh.scale_rdiv) * sh.scale_cols + col / sh.scale_kdiv];
            crate::format::fp8::e4m3_to_f32(self.bytes[row * sh.k + col]) as f64 * s as f64
        } else {
            let i = 2 * (row * sh.k + col);
            half::bf16::from_le_bytes([self.bytes[i], self.bytes[i + 1]]).to_f64()
        }
    }

    /// Bytes in device memory.
    pub fn device_bytes(&self) -> usize {
        self.bytes.len() + 4 * self.scales.len()
    }

    /// Per group of `group_rows` rows, the first `take` rows transposed:
    /// `[groups * k, take]`, row `g * k + j` holding `W[g * group_rows + i][j]`
    /// over `i`. This is W_UK (`kv_b_proj`'s first `nope` rows of each head)
    /// as the kernels multiply it: `lat = q_nope · W_UK` reduces over those
    /// rows. FP8 scales become one per row and 64 keys, which needs
    /// `group_rows` to be a multiple of 64 so no 64 rows straddle two of the
    /// original 128-row blocks.
    pub fn transposed_groups(&self, groups: usize, group_rows: usize, take: usize) -> Result<Self> {
        let sh = self.shape;
        if take == 0 || take > group_rows || groups * group_rows > sh.rows {
            return Err(Error::internal("transposed_groups outside the weight"));
        }
        let (k, es) = (sh.k, if sh.fp8 { 1 } else { 2 });
        let mut bytes = vec![0u8; groups * k * take * es];
        for g in 0..groups {
            for i in 0..take {
                let src = &self.bytes[(g * group_rows + i) * k * es..][..k * es];
                for j in 0..k {
                    let dst = ((g * k + j) * take + i) * es;
                    bytes[dst..dst + es].copy_from_slice(&src[j * es..][..es]);
                }
            }
        }
        let mut shape = WeightShape {
            rows: groups * k,
            k: take,
            ..sh
        };
        let mut scales = Vec::new();
        if sh.fp8 {
            if !group_rows.is_multiple_of(SCALE_KEYS) {
                return Err(Error::unsupported(format!(
                    "FP8 kv_b_proj with qk_nope_head_dim + v_head_dim = {group_rows} (not a multiple of 64) cannot be transposed for the GPU"
                )));
            }
            let cols = take.div_ceil(SCALE_KEYS);
            scales = vec![0f32; groups * k * cols];
            for g in 0..groups {
                for j in 0..k {
                    for c in 0..cols {
                        let row = g * group_rows + c * SCALE_KEYS;
                        scales[(g * k + j) * cols + c] =
                            self.scales[(row / sh.scale_rdiv) * sh.scale_cols + j / sh.scale_kdiv];
                    }
                }
            }
            shape.scale_rdiv = 1;
            shape.scale_kdiv = SCALE_KEYS;
            shape.scale_cols = cols;
        }
        let img = WeightImage {
            shape,
            bytes,
            scales,
        };
        img.check_k()?;
        Ok(img)
    }
}

/// One product: `y [tokens, groups, n_out] = x [tokens, groups, k] · Wᵀ`
/// per group, group g reading weight rows `w_row0 + g * w_group_rows ..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearCall {
    pub tokens: usize,
    pub n_out: usize,
    pub groups: usize,
    pub w_row0: usize,
    pub w_group_rows: usize,
}

impl LinearCall {
    /// A plain projection: one group, all rows.
    pub fn plain(tokens: usize, n_out: usize) -> Self {
        LinearCall {
            tokens,
            n_out,
            groups: 1,
            w_row0: 0,
            w_group_rows: 0,
        }
    }
}

/// How one product launches; `params` lacks only the pointers.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearPlan {
    pub kernel: &'static str,
    pub grid: (u32, u32, u32),
    pub params: LinearParams,
    /// Floats of partial sums (`k_split > 1`), else 0.
    pub partial_len: usize,
    /// Blocks of `mla_linear_reduce` (`k_split > 1`), else 0.
    pub reduce_blocks: u32,
}

/// The launch of `call` on `w` for a GPU of `sm_count` SMs: 16 tokens per
/// pass over the weights for decode (at most 16), else 64; K split into
/// ranges when the columns alone give fewer than eight blocks per SM.
pub fn plan(w: &WeightShape, call: &LinearCall, sm_count: usize) -> Result<LinearPlan> {
    let LinearCall {
        tokens,
        n_out,
        groups,
        w_row0,
        w_group_rows,
    } = *call;
    if tokens == 0 || n_out == 0 || groups == 0 {
        return Err(Error::internal("empty GPU projection"));
    }
    if w_row0 + (groups - 1) * w_group_rows + n_out > w.rows {
        return Err(Error::internal(
            "GPU projection reads past the weight's rows",
        ));
    }
    if w.fp8 && w.rows.div_ceil(w.scale_rdiv) * w.scale_cols > i32::MAX as usize {
        return Err(Error::unsupported("FP8 weight with more than 2^31 scales"));
    }
    let mf = if tokens <= 16 { 1 } else { 4 };
    let m_tiles = tokens.div_ceil(16 * mf);
    let blocks = n_out.div_ceil(LINEAR_COLS) * m_tiles * groups;
    let target = BLOCKS_PER_SM * sm_count.max(1);
    let most = w.k.div_ceil(LINEAR_STEP).clamp(1, MAX_SPLIT);
    let want = if blocks >= target {
        1
    } else {
        target.div_ceil(blocks).min(most)
    };
    let k_chunk = w.k.div_ceil(want).div_ceil(LINEAR_STEP) * LINEAR_STEP;
    let k_split = w.k.div_ceil(k_chunk); // no empty range
    let tgn = tokens * groups * n_out;
    let params = LinearParams {
        tokens: int("tokens", tokens)?,
        n_out: int("n_out", n_out)?,
        k_in: int("k", w.k)?,
        groups: int("groups", groups)?,
        k_split: int("k_split", k_split)?,
        k_chunk: int("k_chunk", k_chunk)?,
        m_tiles: int("m_tiles", m_tiles)?,
        scale_rdiv: int("scale_rdiv", w.scale_rdiv)?,
        scale_kdiv: int("scale_kdiv", w.scale_kdiv)?,
        scale_cols: int("scale_cols", w.scale_cols)?,
        w_group_rows: w_group_rows as i64,
        w_row0: w_row0 as i64,
        ..LinearParams::default()
    };
    let grid_y = m_tiles * k_split;
    if grid_y > 65535 || groups > 65535 {
        return Err(Error::invalid(format!(
            "a GPU projection of {tokens} tokens needs a grid of {grid_y} x {groups}, more than CUDA allows: use fewer tokens per call"
        )));
    }
    Ok(LinearPlan {
        kernel: LINEAR_KERNELS[w.fp8 as usize][(mf == 4) as usize],
        grid: (
            n_out.div_ceil(LINEAR_COLS) as u32,
            grid_y as u32,
            groups as u32,
        ),
        params,
        partial_len: if k_split > 1 { k_split * tgn } else { 0 },
        reduce_blocks: if k_split > 1 {
            tgn.div_ceil(REDUCE_THREADS as usize) as u32
        } else {
            0
        },
    })
}

/// `x` as the kernels take it: bf16 `hi` (nearest even) and, unless the
/// activations are rounded to bf16, `lo = bf16(x - hi)`, the split the
/// CPU's bf16 units use.
pub fn split_bf16(x: &[f32], with_lo: bool, hi: &mut Vec<u16>, lo: &mut Vec<u16>) {
    hi.clear();
    lo.clear();
    hi.extend(x.iter().map(|&v| half::bf16::from_f32(v).to_bits()));
    if with_lo {
        lo.extend(
            x.iter().zip(hi.iter()).map(|(&v, &h)| {
                half::bf16::from_f32(v - half::bf16::from_bits(h).to_f32()).to_bits()
            }),
        );
    }
}

/// What the kernels compute, on the host in f64 (then f32): for the unit
/// tests of the code around them.
#[cfg(test)]
pub fn host_linear(w: &WeightImage, call: &LinearCall, x_hi: &[u16], x_lo: &[u16], y: &mut [f32]) {
    let (k, g_n) = (w.shape.k, call.groups);
    let bf = |b: u16| half::bf16::from_bits(b).to_f64();
    for t in 0..call.tokens {
        for g in 0..g_n {
            let xi = (t * g_n + g) * k;
            for n in 0..call.n_out {
                let row = call.w_row0 + g * call.w_group_rows + n;
                let mut acc = 0f64;
                for c in 0..k {
                    let x = bf(x_hi[xi + c]) + x_lo.get(xi + c).map_or(0.0, |&b| bf(b));
                    acc += x * w.value(row, c);
                }
                y[(t * g_n + g) * call.n_out + n] = acc as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    fn value(w: &WeightImage, row: usize, col: usize) -> f64 {
        w.value(row, col)
    }

    fn random_fp8(rows: usize, k: usize, seed: &mut u64) -> WeightImage {
        let codes: Vec<u8> = (0..rows * k)
            .map(|_| (rng(seed) % 255) as u8 & 0xfe) // never 0x7f / 0xff (NaN)
            .collect();
        let scales: Vec<f32> = (0..rows.div_ceil(128) * k.div_ceil(128))
            .map(|_| 1.0 + (rng(seed) % 1000) as f32 / 37.0)
            .collect();
        WeightImage::fp8(&codes, &scales, rows, k).unwrap()
    }

    #[test]
    fn transposed_groups_hold_the_same_weights() {
        let mut seed = 0x9e3779b97f4a7c15;
        // kv_b of 3 heads with nope 64 and v 64 (group rows 128) and of
        // 4 heads with nope 32 and v 32 (64: two heads per scale block).
        for (heads, nope, v, lora) in [(3, 64, 64, 256), (4, 32, 32, 64), (2, 128, 128, 512)] {
            let gr = nope + v;
            let fp8 = random_fp8(heads * gr, lora, &mut seed);
            let bytes: Vec<u8> = (0..heads * gr * lora * 2)
                .map(|_| rng(&mut seed) as u8 & 0x3f)
                .collect();
            let bf16 = WeightImage::bf16(&bytes, heads * gr, lora).unwrap();
            for w in [fp8, bf16] {
                let t = w.transposed_groups(heads, gr, nope).unwrap();
                assert_eq!((t.shape.rows, t.shape.k), (heads * lora, nope));
                for h in 0..heads {
                    for i in 0..nope {
                        for j in 0..lora {
                            assert_eq!(
                                value(&t, h * lora + j, i),
                                value(&w, h * gr + i, j),
                                "head {h} i {i} j {j} fp8 {}",
                                w.shape.fp8
                            );
                        }
                    }
                }
            }
        }
        // FP8 heads of 96 rows would mix two 128-row scale blocks in one
        // 64-key slice: refused, so the model keeps them on the CPU.
        let w = random_fp8(2 * 96, 128, &mut seed);
        let e = w.transposed_groups(2, 96, 48).unwrap_err();
        assert!(e.message.contains("96"), "{}", e.message);
    }

    #[test]
    fn the_plan_covers_every_key_once() {
        let mut seed = 7;
        let w = random_fp8(1536, 7168, &mut seed);
        for (tokens, sms) in [(1, 132), (4, 132), (16, 108), (17, 132), (300, 132), (1, 1)] {
            let p = plan(&w.shape, &LinearCall::plain(tokens, 1536), sms).unwrap();
            let lp = &p.params;
            let ks = lp.k_split as usize;
            let chunk = lp.k_chunk as usize;
            assert!(chunk.is_multiple_of(LINEAR_STEP));
            assert!(ks * chunk >= 7168 && (ks - 1) * chunk < 7168, "{lp:?}");
            let mf = if tokens <= 16 { 1 } else { 4 };
            assert_eq!(lp.m_tiles as usize, tokens.div_ceil(16 * mf));
            assert_eq!(p.kernel, LINEAR_KERNELS[1][(mf == 4) as usize]);
            assert_eq!(p.grid, (48, (lp.m_tiles as usize * ks) as u32, 1));
            let blocks = 48 * lp.m_tiles as usize * ks;
            if ks > 1 {
                // Split only as far as the GPU needs, never beyond it.
                assert!(48 * (lp.m_tiles as usize) < BLOCKS_PER_SM * sms);
                // ... and near it (ranges are whole 128-key steps).
                assert!(
                    2 * blocks >= BLOCKS_PER_SM * sms || ks == MAX_SPLIT || chunk == LINEAR_STEP,
                    "{blocks} blocks for {sms} SMs"
                );
                assert_eq!(p.partial_len, ks * tokens * 1536);
                assert_eq!(p.reduce_blocks as usize, (tokens * 1536).div_ceil(256));
            } else {
                assert_eq!((p.partial_len, p.reduce_blocks), (0, 0));
            }
        }
        // Decode at batch 1 on an H200 (132 SMs) splits o_proj's 16384 keys.
        let o = random_fp8(7168, 16384, &mut seed);
        let p = plan(&o.shape, &LinearCall::plain(1, 7168), 132).unwrap();
        assert_eq!(p.params.k_split, 5);
    }

    #[test]
    fn bad_calls_are_refused() {
        let mut seed = 3;
        let w = random_fp8(256, 128, &mut seed);
        let call = LinearCall {
            tokens: 1,
            n_out: 64,
            groups: 3,
            w_row0: 32,
            w_group_rows: 96,
        };
        assert!(plan(&w.shape, &call, 10).is_err()); // 32 + 2 * 96 + 64 > 256
        assert!(plan(&w.shape, &LinearCall::plain(0, 8), 10).is_err());
        assert!(WeightImage::bf16(&[0u8; 2 * 12], 1, 12).is_err()); // k % 8
        assert!(WeightImage::fp8(&[0u8; 24], &[1.0], 1, 24).is_err()); // k % 16
    }

    #[test]
    fn constants_match_the_kernel_source() {
        let src = include_str!("../../../kernels/mla_linear.cuh");
        assert!(src.contains("#define MLA_LINEAR_COLS (8 * MLA_LINEAR_WARPS)"));
        assert!(src.contains("#define MLA_LINEAR_WARPS 4"));
        assert_eq!((LINEAR_COLS, LINEAR_THREADS), (8 * 4, 32 * 4));
        assert!(src.contains(&format!("#define MLA_LINEAR_STEP {LINEAR_STEP}")));
        assert!(src.contains(&format!("#define MLA_REDUCE_THREADS {REDUCE_THREADS}")));
        assert!(src.contains(&format!(
            "{REDUCE_KERNEL}(const __grid_constant__ MlaLinearParams p)"
        )));
        let entries = include_str!("../../../kernels/mlart_kernels.cu");
        for (fp8, names) in LINEAR_KERNELS.iter().enumerate() {
            for (m4, name) in names.iter().enumerate() {
                let mf = if m4 == 1 { 4 } else { 1 };
                let want = format!("MLA_LINEAR_ENTRY({name}, {mf}, {})", fp8 == 1);
                assert!(entries.contains(&want), "{want}");
            }
        }
    }

    #[test]
    fn the_split_keeps_sixteen_bits() {
        let x = [1.0f32 + 1.0 / 1024.0 + 1.0 / 65536.0, -3.25e-3, 7.0e4, 0.0];
        let (mut hi, mut lo) = (Vec::new(), Vec::new());
        split_bf16(&x, true, &mut hi, &mut lo);
        for (i, &v) in x.iter().enumerate() {
            let back =
                half::bf16::from_bits(hi[i]).to_f32() + half::bf16::from_bits(lo[i]).to_f32();
            assert!(
                ((back - v) / v.abs().max(1e-30)).abs() < 1.0 / 32768.0,
                "{v} -> {back}"
            );
        }
        split_bf16(&x, false, &mut hi, &mut lo);
        assert!(lo.is_empty() && hi.len() == 4);
    }
}
