//! Byte layouts of a paged KV cache `[num_blocks, block]`, one per format,
//! byte-compatible with DeepSeek's FlashMLA.
//!
//! ```text
//! BF16/F16/F32   block = block_size rows of d_qk elements
//! FP8_V32        d_qk 576, 656 bytes per token row:
//!                [512 x e4m3 (4 tiles of 128)][4 x f32 scale][64 x bf16 rope]
//! FP8_MODEL1     d_qk 512, 584 bytes per token, grouped per block:
//!                [block_size x (448 x e4m3 (7 tiles of 64) | 64 x bf16 rope)]
//!                [block_size x (7 x ue8m0 scale | 1 pad byte = 0)]
//!                [zero padding up to a multiple of 576 bytes]
//! ```

use super::fp8::{dequantize_tile, quantize_tile, ue8m0_decode, ue8m0_encode};
use super::{load_slice, store_slice, Dtype, KvFormat};
use crate::error::{checked_size, Error, Result};

/// V32: quantized latent dims, tile width, and the bf16 rope tail.
const V32_NOPE: usize = 512;
const V32_TILE: usize = 128;
const V32_TILES: usize = 4;
const V32_ROW: usize = V32_NOPE + 4 * V32_TILES + 2 * ROPE;
/// MODEL1: quantized dims, tile width, per-token data and scale bytes.
const M1_NOPE: usize = 448;
const M1_TILE: usize = 64;
const M1_TILES: usize = 7;
const M1_DATA: usize = M1_NOPE + 2 * ROPE;
const M1_SCALES: usize = 8;
const M1_BLOCK_ALIGN: usize = 576;
const ROPE: usize = 64;

/// Geometry of one cache format at one block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub format: KvFormat,
    pub d_qk: usize,
    pub block_size: usize,
    /// Bytes a token occupies (FP8: data + its share of scales, no padding).
    pub row_bytes: usize,
    /// Bytes of one block, padding included; blocks are contiguous.
    pub block_bytes: usize,
}

impl KvLayout {
    /// Checks that `format` can hold rows of `d_qk` and computes the layout.
    /// `arg` names the format argument in errors.
    pub fn new(format: KvFormat, d_qk: usize, block_size: usize, arg: &str) -> Result<Self> {
        let fixed = |want: usize| -> Result<()> {
            if d_qk != want {
                return Err(Error::invalid(format!(
                    "{arg} = {} stores rows of d_qk = {want}, but d_qk = {d_qk}",
                    format.name()
                )));
            }
            Ok(())
        };
        let (row_bytes, block_bytes) = match format {
            KvFormat::Bf16 | KvFormat::F16 | KvFormat::F32 => {
                let row = d_qk * format.plain_dtype().map_or(1, Dtype::size);
                (row, checked_size("kv block", &[row, block_size])?)
            }
            KvFormat::Fp8V32 => {
                fixed(576)?;
                (V32_ROW, checked_size("kv block", &[V32_ROW, block_size])?)
            }
            KvFormat::Fp8Model1 => {
                fixed(512)?;
                let raw = checked_size("kv block", &[M1_DATA + M1_SCALES, block_size])?;
                (
                    M1_DATA + M1_SCALES,
                    raw.div_ceil(M1_BLOCK_ALIGN) * M1_BLOCK_ALIGN,
                )
            }
        };
        Ok(KvLayout {
            format,
            d_qk,
            block_size,
            row_bytes,
            block_bytes,
        })
    }

    /// Bytes of `blocks` blocks.
    pub fn cache_bytes(&self, blocks: usize) -> Result<usize> {
        checked_size("kv", &[blocks, self.block_bytes])
    }

    /// Byte offset of the data of token `off` of block `block`.
    #[inline(always)]
    fn data_at(&self, block: usize, off: usize) -> usize {
        match self.format {
            KvFormat::Fp8Model1 => block * self.block_bytes + off * M1_DATA,
            _ => block * self.block_bytes + off * self.row_bytes,
        }
    }

    /// Byte offset of MODEL1's scales of token `off` of block `block`.
    #[inline(always)]
    fn model1_scales_at(&self, block: usize, off: usize) -> usize {
        block * self.block_bytes + self.block_size * M1_DATA + off * M1_SCALES
    }

    /// The stored bytes of tokens `off..off + n` of block `block` for the
    /// BF16 format (consecutive rows of `2 * d_qk` bytes, the values as
    /// they are); `None` for other formats or rows past the block.
    #[inline]
    pub fn bf16_rows<'c>(
        &self,
        cache: &'c [u8],
        block: usize,
        off: usize,
        n: usize,
    ) -> Option<&'c [u8]> {
        if self.format != KvFormat::Bf16 {
            return None;
        }
        self.rows_bytes(cache, block, off, n)
    }

    /// The bytes of tokens `off..off + n` of block `block` in the formats
    /// that store a token as one row (all but FP8_MODEL1, whose scales sit
    /// apart); `None` for rows past the block.
    #[inline]
    pub fn rows_bytes<'c>(
        &self,
        cache: &'c [u8],
        block: usize,
        off: usize,
        n: usize,
    ) -> Option<&'c [u8]> {
        if self.format == KvFormat::Fp8Model1 || off + n > self.block_size {
            return None;
        }
        let at = self.data_at(block, off);
        cache.get(at..at + n * self.row_bytes)
    }

    /// The stored bytes of token `off` of block `block`: its row, and for
    /// FP8_MODEL1 its scales, which sit apart (`None` past the cache).
    #[inline]
    pub fn token_bytes<'c>(
        &self,
        cache: &'c [u8],
        block: usize,
        off: usize,
    ) -> [Option<&'c [u8]>; 2] {
        if self.format == KvFormat::Fp8Model1 {
            let (d, s) = (self.data_at(block, off), self.model1_scales_at(block, off));
            return [cache.get(d..d + M1_DATA), cache.get(s..s + M1_SCALES)];
        }
        [self.rows_bytes(cache, block, off, 1), None]
    }

    /// Starts fetching tokens `off .. off + n` of block `block` into the
    /// cache: their rows (consecutive, so each line is fetched once), or
    /// for FP8_MODEL1 each token's data and scales. Tokens past the block
    /// are skipped (a prefetch never faults, but nothing is fetched for
    /// them).
    #[inline]
    pub fn prefetch_tokens(&self, cache: &[u8], block: usize, off: usize, n: usize) {
        let fetch = |bytes: Option<&[u8]>| {
            if let Some(b) = bytes {
                super::prefetch_bytes(b);
            }
        };
        let n = n.min(self.block_size.saturating_sub(off));
        if self.format == KvFormat::Fp8Model1 {
            for o in off..off + n {
                let (d, s) = (self.data_at(block, o), self.model1_scales_at(block, o));
                fetch(cache.get(d..d + M1_DATA));
                fetch(cache.get(s..s + M1_SCALES));
            }
        } else if n > 0 {
            fetch(self.rows_bytes(cache, block, off, n));
        }
    }

    /// Token `off` of block `block` as bf16 pairs (`out` holds `d_qk / 2`)
    /// without an f32 round trip: BF16 rows are copied, FP8_V32 rows are
    /// converted exactly (e4m3 times a power-of-two tile scale is a bf16
    /// value). False, `out` unspecified, for other formats, a tile scale
    /// that is not a power of two in range, or a CPU without the
    /// instructions; the caller then converts through f32.
    pub fn bf16_pairs_row(&self, cache: &[u8], block: usize, off: usize, out: &mut [u32]) -> bool {
        let at = self.data_at(block, off);
        match self.format {
            KvFormat::Bf16 if out.len() * 4 == self.row_bytes => {
                bytemuck::cast_slice_mut::<u32, u8>(out)
                    .copy_from_slice(&cache[at..at + self.row_bytes]);
                true
            }
            KvFormat::Fp8V32 if out.len() * 2 == 576 => {
                let row = &cache[at..at + V32_ROW];
                let mut ks = [0i32; V32_TILES];
                for (t, k) in ks.iter_mut().enumerate() {
                    let s = &row[V32_NOPE + 4 * t..V32_NOPE + 4 * t + 4];
                    let bits = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    // A positive normal power of two: 2^(exponent - 127).
                    let e = (bits >> 23) as i32;
                    if bits & 0x807f_ffff != 0 || e == 0 || e == 255 {
                        return false;
                    }
                    *k = e - 127;
                }
                // All four tiles in one call: the lookup tables load once.
                let (codes, pairs) = (&row[..V32_NOPE], &mut out[..V32_NOPE / 2]);
                if !super::fp8::e4m3_to_bf16_pairs(codes, V32_TILE, &ks, pairs) {
                    return false;
                }
                let rope = &row[V32_NOPE + 4 * V32_TILES..];
                bytemuck::cast_slice_mut::<u32, u8>(&mut out[V32_NOPE / 2..]).copy_from_slice(rope);
                true
            }
            _ => false,
        }
    }

    /// Dequantizes/converts token `off` of block `block` into `out[..d_qk]`.
    #[inline]
    pub fn load_row(&self, cache: &[u8], block: usize, off: usize, out: &mut [f32]) {
        let at = self.data_at(block, off);
        match self.format {
            KvFormat::Bf16 | KvFormat::F16 | KvFormat::F32 => {
                let dtype = self.format.plain_dtype().unwrap_or(Dtype::F32);
                load_slice(
                    dtype,
                    &cache[at..at + self.row_bytes],
                    &mut out[..self.d_qk],
                );
            }
            KvFormat::Fp8V32 => {
                let row = &cache[at..at + V32_ROW];
                for t in 0..V32_TILES {
                    let s = &row[V32_NOPE + 4 * t..V32_NOPE + 4 * t + 4];
                    let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    let r = t * V32_TILE..(t + 1) * V32_TILE;
                    dequantize_tile(&row[r.clone()], scale, &mut out[r]);
                }
                load_slice(
                    Dtype::Bf16,
                    &row[V32_NOPE + 4 * V32_TILES..],
                    &mut out[V32_NOPE..576],
                );
            }
            KvFormat::Fp8Model1 => {
                let row = &cache[at..at + M1_DATA];
                let sc = self.model1_scales_at(block, off);
                let scales = &cache[sc..sc + M1_TILES];
                for (t, &s) in scales.iter().enumerate() {
                    let r = t * M1_TILE..(t + 1) * M1_TILE;
                    dequantize_tile(&row[r.clone()], ue8m0_decode(s), &mut out[r]);
                }
                load_slice(Dtype::Bf16, &row[M1_NOPE..], &mut out[M1_NOPE..512]);
            }
        }
    }

    /// Converts/quantizes `src[..d_qk]` into token `off` of block `block`.
    pub fn store_row(&self, cache: &mut [u8], block: usize, off: usize, src: &[f32]) {
        let at = self.data_at(block, off);
        match self.format {
            KvFormat::Bf16 | KvFormat::F16 | KvFormat::F32 => {
                let dtype = self.format.plain_dtype().unwrap_or(Dtype::F32);
                store_slice(
                    dtype,
                    &src[..self.d_qk],
                    &mut cache[at..at + self.row_bytes],
                );
            }
            KvFormat::Fp8V32 => {
                let row = &mut cache[at..at + V32_ROW];
                for t in 0..V32_TILES {
                    let r = t * V32_TILE..(t + 1) * V32_TILE;
                    let scale = quantize_tile(&src[r.clone()], &mut row[r]);
                    row[V32_NOPE + 4 * t..V32_NOPE + 4 * t + 4]
                        .copy_from_slice(&scale.to_le_bytes());
                }
                store_slice(
                    Dtype::Bf16,
                    &src[V32_NOPE..576],
                    &mut row[V32_NOPE + 4 * V32_TILES..],
                );
            }
            KvFormat::Fp8Model1 => {
                let mut scales = [0u8; M1_SCALES];
                {
                    let row = &mut cache[at..at + M1_DATA];
                    for (t, s) in scales.iter_mut().take(M1_TILES).enumerate() {
                        let r = t * M1_TILE..(t + 1) * M1_TILE;
                        *s = ue8m0_encode(quantize_tile(&src[r.clone()], &mut row[r]));
                    }
                    store_slice(Dtype::Bf16, &src[M1_NOPE..512], &mut row[M1_NOPE..]);
                }
                let sc = self.model1_scales_at(block, off);
                cache[sc..sc + M1_SCALES].copy_from_slice(&scales);
            }
        }
    }

    /// Zeroes the padding at the end of each of `blocks` blocks (MODEL1).
    pub fn clear_padding(&self, cache: &mut [u8], blocks: usize) {
        let used = self.block_size * self.row_bytes;
        if self.format == KvFormat::Fp8Model1 {
            for b in 0..blocks {
                cache[b * self.block_bytes + used..(b + 1) * self.block_bytes].fill(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_flashmla() {
        let v32 = KvLayout::new(KvFormat::Fp8V32, 576, 64, "f").unwrap();
        assert_eq!((v32.row_bytes, v32.block_bytes), (656, 656 * 64));
        let m1 = KvLayout::new(KvFormat::Fp8Model1, 512, 64, "f").unwrap();
        // 64 * 584 = 37376 -> padded to 65 * 576.
        assert_eq!((m1.row_bytes, m1.block_bytes), (584, 37440));
        let m1 = KvLayout::new(KvFormat::Fp8Model1, 512, 1, "f").unwrap();
        assert_eq!(m1.block_bytes, 1152);
        let b = KvLayout::new(KvFormat::Bf16, 100, 3, "f").unwrap();
        assert_eq!((b.row_bytes, b.block_bytes), (200, 600));
        let e = KvLayout::new(KvFormat::Fp8V32, 512, 64, "kv_format").unwrap_err();
        assert_eq!(
            e.message,
            "kv_format = fp8_v32 stores rows of d_qk = 576, but d_qk = 512"
        );
    }

    #[test]
    fn fp8_rows_round_trip_within_a_tile_quantum() {
        for (format, d) in [(KvFormat::Fp8V32, 576), (KvFormat::Fp8Model1, 512)] {
            let l = KvLayout::new(format, d, 3, "f").unwrap();
            let mut cache = vec![0xAAu8; l.cache_bytes(2).unwrap()];
            let src: Vec<f32> = (0..d)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
                .collect();
            l.store_row(&mut cache, 1, 2, &src);
            let mut back = vec![0f32; d];
            l.load_row(&cache, 1, 2, &mut back);
            for (i, (a, b)) in src.iter().zip(&back).enumerate() {
                // e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the tile max.
                assert!(
                    (a - b).abs() <= 1.25 / 16.0 + 1e-6,
                    "{format:?} [{i}] {a} vs {b}"
                );
            }
        }
    }
}
