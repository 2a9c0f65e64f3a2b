//! The validated decode descriptor.
//!
//! Construction checks every size, every sequence length and every block id a
//! sequence will read, so a backend that receives a [`DenseDecode`] can index
//! the cache without further checks.

use crate::error::{check_range, checked_size, Error, Result};
use crate::format::{Dtype, KvFormat, RowLayout};

/// Largest supported head dimension.
pub const MAX_HEAD_DIM: usize = 1024;

/// Shape and scalar parameters of one decode call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeShape {
    pub batch: usize,
    pub s_q: usize,
    pub h_q: usize,
    pub d_qk: usize,
    pub d_v: usize,
    /// Resolved scale (the default `1/sqrt(d_qk)` already applied).
    pub softmax_scale: f32,
    pub causal: bool,
}

fn positive(name: &str, v: i32) -> Result<usize> {
    if v < 1 {
        return Err(Error::invalid(format!("{name} = {v} must be >= 1")));
    }
    Ok(v as usize)
}

impl DecodeShape {
    /// Validates the C-level integers. `softmax_scale == 0` means `1/sqrt(d_qk)`.
    pub fn new(
        batch: i32,
        s_q: i32,
        h_q: i32,
        d_qk: i32,
        d_v: i32,
        softmax_scale: f32,
        causal: bool,
    ) -> Result<Self> {
        let batch = positive("batch", batch)?;
        let s_q = positive("s_q", s_q)?;
        let h_q = positive("h_q", h_q)?;
        let d_qk_u = positive("d_qk", d_qk)?;
        let d_v_u = positive("d_v", d_v)?;
        if d_qk_u > MAX_HEAD_DIM {
            return Err(Error::invalid(format!(
                "d_qk = {d_qk} exceeds the supported maximum {MAX_HEAD_DIM}"
            )));
        }
        if d_v_u > d_qk_u {
            return Err(Error::invalid(format!(
                "d_v = {d_v} exceeds d_qk = {d_qk} (V is the first d_v dims of each cache row)"
            )));
        }
        if !softmax_scale.is_finite() {
            return Err(Error::invalid(format!(
                "softmax_scale = {softmax_scale} is not finite"
            )));
        }
        let softmax_scale = if softmax_scale == 0.0 {
            1.0 / (d_qk_u as f32).sqrt()
        } else {
            softmax_scale
        };
        let shape = DecodeShape {
            batch,
            s_q,
            h_q,
            d_qk: d_qk_u,
            d_v: d_v_u,
            softmax_scale,
            causal,
        };
        // Reject shapes whose tensors could not be addressed at all.
        checked_size("q", &[batch, s_q, h_q, d_qk_u, 4])?;
        Ok(shape)
    }

    /// Query rows per sequence: `s_q * h_q`, ordered `(i, h)`.
    pub fn rows(&self) -> usize {
        self.s_q * self.h_q
    }

    pub fn q_elems(&self) -> usize {
        self.batch * self.rows() * self.d_qk
    }

    pub fn out_elems(&self) -> usize {
        self.batch * self.rows() * self.d_v
    }

    pub fn lse_elems(&self) -> usize {
        self.batch * self.rows()
    }

    /// Number of keys query `i` of a sequence of `seqlen` tokens may see.
    pub fn visible(&self, seqlen: usize, i: usize) -> usize {
        if self.causal {
            (seqlen + i + 1).saturating_sub(self.s_q)
        } else {
            seqlen
        }
    }
}

/// A paged KV cache in host memory: `[num_blocks, block_size, row]`.
#[derive(Clone, Copy, Debug)]
pub struct KvCache<'a> {
    pub format: KvFormat,
    pub layout: RowLayout,
    pub data: &'a [u8],
    pub num_blocks: usize,
    pub block_size: usize,
}

impl<'a> KvCache<'a> {
    /// Validates the geometry; `data` must hold `num_blocks * block_size` rows.
    pub fn new(
        format: KvFormat,
        d_qk: usize,
        data: &'a [u8],
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        let layout = format.row_layout("kv_format", d_qk)?;
        let need = checked_size("kv", &[num_blocks, block_size, layout.row_bytes])?;
        if data.len() < need {
            return Err(Error::internal(format!(
                "kv buffer holds {} bytes, {need} needed",
                data.len()
            )));
        }
        Ok(KvCache {
            format,
            layout,
            data,
            num_blocks,
            block_size,
        })
    }

    /// Bytes of the whole cache for the given geometry.
    pub fn bytes_for(
        format: KvFormat,
        d_qk: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<usize> {
        let layout = format.row_layout("kv_format", d_qk)?;
        checked_size("kv", &[num_blocks, block_size, layout.row_bytes])
    }

    /// The bytes of row `offset` of block `block` (both already validated).
    #[inline(always)]
    pub fn row(&self, block: usize, offset: usize) -> &'a [u8] {
        let rb = self.layout.row_bytes;
        let start = (block * self.block_size + offset) * rb;
        &self.data[start..start + rb]
    }
}

/// A validated dense (block table + seqlens) decode over host memory.
#[derive(Clone, Copy, Debug)]
pub struct DenseDecode<'a> {
    pub shape: DecodeShape,
    pub q_dtype: Dtype,
    /// `[batch, s_q, h_q, d_qk]` of `q_dtype`.
    pub q: &'a [u8],
    pub kv: KvCache<'a>,
    /// `[batch, block_table_stride]`.
    pub block_table: &'a [i32],
    pub block_table_stride: usize,
    /// `[batch]`, each in `[0, block_table_stride * block_size]`.
    pub seqlens: &'a [i32],
}

impl<'a> DenseDecode<'a> {
    /// Checks lengths, sequence lengths and every block id a sequence reads.
    pub fn new(
        shape: DecodeShape,
        q_dtype: Dtype,
        q: &'a [u8],
        kv: KvCache<'a>,
        block_table: &'a [i32],
        block_table_stride: usize,
        seqlens: &'a [i32],
    ) -> Result<Self> {
        q_dtype.check_activation("q_dtype")?;
        let expect = |name: &str, have: usize, want: usize| -> Result<()> {
            if have < want {
                return Err(Error::internal(format!(
                    "{name} holds {have} elements, {want} needed"
                )));
            }
            Ok(())
        };
        expect("q", q.len(), shape.q_elems() * q_dtype.size())?;
        expect("seqlens", seqlens.len(), shape.batch)?;
        expect(
            "block_table",
            block_table.len(),
            shape.batch * block_table_stride,
        )?;
        let capacity = block_table_stride as i64 * kv.block_size as i64;
        for (b, &len) in seqlens[..shape.batch].iter().enumerate() {
            if len < 0 || len as i64 > capacity {
                return Err(Error::invalid(format!(
                    "seqlens[{b}] = {len} is outside [0, {capacity}] (block_table_stride {block_table_stride} x block_size {})",
                    kv.block_size
                )));
            }
            let used = (len as usize).div_ceil(kv.block_size);
            let row = &block_table[b * block_table_stride..][..used];
            for (j, &id) in row.iter().enumerate() {
                check_range(
                    &format!("block_table[{b}][{j}]"),
                    id as i64,
                    0,
                    kv.num_blocks as i64,
                )?;
            }
        }
        Ok(DenseDecode {
            shape,
            q_dtype,
            q,
            kv,
            block_table,
            block_table_stride,
            seqlens,
        })
    }

    pub fn seqlen(&self, b: usize) -> usize {
        self.seqlens[b] as usize
    }

    /// The block-table row of sequence `b`.
    pub fn blocks(&self, b: usize) -> &'a [i32] {
        &self.block_table[b * self.block_table_stride..][..self.block_table_stride]
    }

    /// FLOPs of the attention itself (for benchmarks).
    pub fn flops(&self) -> f64 {
        let s = &self.shape;
        let tokens: f64 = (0..s.batch)
            .map(|b| {
                (0..s.s_q)
                    .map(|i| s.visible(self.seqlen(b), i) as f64)
                    .sum::<f64>()
            })
            .sum();
        2.0 * tokens * s.h_q as f64 * (s.d_qk + s.d_v) as f64
    }

    /// Cache bytes read once (for benchmarks).
    pub fn kv_bytes(&self) -> f64 {
        let tokens: usize = (0..self.shape.batch).map(|b| self.seqlen(b)).sum();
        (tokens * self.kv.layout.row_bytes) as f64
    }
}

/// Where a decode writes: `out [batch, s_q, h_q, d_v]` and `lse [batch, h_q, s_q]`.
#[derive(Debug)]
pub struct DecodeOutput<'a> {
    pub dtype: Dtype,
    pub out: &'a mut [u8],
    pub lse: Option<&'a mut [f32]>,
}

impl<'a> DecodeOutput<'a> {
    pub fn new(
        shape: &DecodeShape,
        dtype: Dtype,
        out: &'a mut [u8],
        lse: Option<&'a mut [f32]>,
    ) -> Result<Self> {
        dtype.check_activation("out_dtype")?;
        if out.len() < shape.out_elems() * dtype.size() {
            return Err(Error::internal(
                "out buffer is smaller than [batch, s_q, h_q, d_v]",
            ));
        }
        if let Some(l) = &lse {
            if l.len() < shape.lse_elems() {
                return Err(Error::internal(
                    "lse buffer is smaller than [batch, h_q, s_q]",
                ));
            }
        }
        Ok(DecodeOutput { dtype, out, lse })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_rejects_bad_sizes_by_name() {
        let e = DecodeShape::new(0, 1, 1, 8, 8, 0.0, false).unwrap_err();
        assert_eq!(e.message, "batch = 0 must be >= 1");
        let e = DecodeShape::new(1, 1, 1, 8, 9, 0.0, false).unwrap_err();
        assert!(e.message.starts_with("d_v = 9 exceeds d_qk = 8"));
        let e = DecodeShape::new(1, 1, 1, 2000, 9, 0.0, false).unwrap_err();
        assert!(e.message.starts_with("d_qk = 2000"));
        let e = DecodeShape::new(1, 1, 1, 8, 8, f32::NAN, false).unwrap_err();
        assert!(e.message.starts_with("softmax_scale = NaN"));
        let s = DecodeShape::new(1, 1, 1, 16, 8, 0.0, false).unwrap();
        assert_eq!(s.softmax_scale, 0.25);
    }

    #[test]
    fn causal_visibility_is_bottom_right_aligned() {
        let s = DecodeShape::new(1, 3, 1, 8, 8, 1.0, true).unwrap();
        assert_eq!(
            [s.visible(10, 0), s.visible(10, 1), s.visible(10, 2)],
            [8, 9, 10]
        );
        assert_eq!(s.visible(1, 0), 0);
        let n = DecodeShape::new(1, 3, 1, 8, 8, 1.0, false).unwrap();
        assert_eq!(n.visible(10, 0), 10);
    }

    #[test]
    fn block_ids_are_checked_only_where_used() {
        let shape = DecodeShape::new(2, 1, 1, 4, 4, 1.0, false).unwrap();
        let kvdata = vec![0u8; 4 * 2 * 4 * 4];
        let kv = KvCache::new(KvFormat::F32, 4, &kvdata, 4, 2).unwrap();
        let q = vec![0u8; 2 * 4 * 4];
        // Sequence 0 uses one block; the padding entry 99 is never read.
        let table = [3, 99, 0, 2];
        assert!(DenseDecode::new(shape, Dtype::F32, &q, kv, &table, 2, &[2, 3]).is_ok());
        let e = DenseDecode::new(shape, Dtype::F32, &q, kv, &table, 2, &[3, 3]).unwrap_err();
        assert_eq!(e.message, "block_table[0][1] = 99 is outside [0, 4)");
        let e = DenseDecode::new(shape, Dtype::F32, &q, kv, &table, 2, &[2, 5]).unwrap_err();
        assert!(
            e.message.starts_with("seqlens[1] = 5 is outside [0, 4]"),
            "{}",
            e.message
        );
    }
}
