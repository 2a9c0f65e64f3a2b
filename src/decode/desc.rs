//! The validated decode descriptor.
//!
//! Construction checks every size, every sequence length and every block id a
//! sequence will read, so a backend that receives a [`Decode`] can index
//! the cache without further checks.

use crate::error::{check_range, checked_size, Error, Result};
use crate::format::{Dtype, KvLayout};

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

/// A paged KV cache in host memory: `num_blocks` blocks of `layout`.
#[derive(Clone, Copy, Debug)]
pub struct KvCache<'a> {
    pub layout: KvLayout,
    pub data: &'a [u8],
    pub num_blocks: usize,
}

impl<'a> KvCache<'a> {
    /// `data` must hold `num_blocks` blocks of `layout`.
    pub fn new(layout: KvLayout, data: &'a [u8], num_blocks: usize) -> Result<Self> {
        let need = layout.cache_bytes(num_blocks)?;
        if data.len() < need {
            return Err(Error::internal(format!(
                "kv buffer holds {} bytes, {need} needed",
                data.len()
            )));
        }
        Ok(KvCache {
            layout,
            data,
            num_blocks,
        })
    }

    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }

    /// Token slots in the cache (`num_blocks * block_size`).
    pub fn positions(&self) -> usize {
        self.num_blocks * self.layout.block_size
    }

    /// Converts token `off` of block `block` (both validated) to f32.
    #[inline(always)]
    pub fn load(&self, block: usize, off: usize, out: &mut [f32]) {
        self.layout.load_row(self.data, block, off, out);
    }
}

/// Dense keys: each sequence's first `seqlens[b]` tokens, paged through
/// its block-table row.
#[derive(Clone, Copy, Debug)]
pub struct DenseKeys<'a> {
    pub kv: KvCache<'a>,
    /// `[batch, block_table_stride]`.
    pub block_table: &'a [i32],
    pub block_table_stride: usize,
    /// `[batch]`, each in `[0, block_table_stride * block_size]`.
    pub seqlens: &'a [i32],
}

/// One cache and its per-query index lists (sparse attention).
#[derive(Clone, Copy, Debug)]
pub struct IndexedKeys<'a> {
    pub kv: KvCache<'a>,
    /// `[batch, s_q, topk]` flat positions `block * block_size + offset`, -1 = none.
    pub indices: &'a [i32],
    pub topk: usize,
    /// Optional `[batch]`: only the first `topk_length[b]` entries are used.
    pub topk_length: Option<&'a [i32]>,
}

impl IndexedKeys<'_> {
    /// Entries of the index list of sequence `b` that are used.
    pub fn used(&self, b: usize) -> usize {
        self.topk_length.map_or(self.topk, |l| l[b] as usize)
    }

    /// The used entries for query token `i` of sequence `b`.
    pub fn list(&self, s_q: usize, b: usize, i: usize) -> &[i32] {
        &self.indices[(b * s_q + i) * self.topk..][..self.used(b)]
    }

    /// Checks `topk_length[b]` is in `[0, topk]` for every sequence.
    pub fn check_lengths(&self, batch: usize, what: &str) -> Result<()> {
        if let Some(l) = self.topk_length {
            for (b, &n) in l[..batch].iter().enumerate() {
                if n < 0 || n as usize > self.topk {
                    return Err(Error::invalid(format!(
                        "{what}topk_length[{b}] = {n} is outside [0, {}]",
                        self.topk
                    )));
                }
            }
        }
        Ok(())
    }

    /// Validates lengths and every used index; `what` prefixes names ("" or "extra_").
    fn validate(&self, shape: &DecodeShape, what: &str) -> Result<()> {
        let batch = shape.batch;
        if self.indices.len() < batch * shape.s_q * self.topk {
            return Err(Error::internal(format!(
                "{what}indices is smaller than [batch, s_q, topk]"
            )));
        }
        self.check_lengths(batch, what)?;
        let limit = self.kv.positions() as i64;
        for b in 0..batch {
            for i in 0..shape.s_q {
                for (k, &p) in self.list(shape.s_q, b, i).iter().enumerate() {
                    if p != -1 && (p < 0 || p as i64 >= limit) {
                        return Err(Error::invalid(format!(
                            "{what}indices[{b}][{i}][{k}] = {p} is outside [-1, {limit}) (-1 = no key; the cache has {} blocks x {} tokens)",
                            self.kv.num_blocks,
                            self.kv.block_size()
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Sparse keys: per query token, a list of positions in a main cache and
/// optionally in an extra cache, all in one softmax.
#[derive(Clone, Copy, Debug)]
pub struct SparseKeys<'a> {
    pub main: IndexedKeys<'a>,
    pub extra: Option<IndexedKeys<'a>>,
}

/// Which keys each query attends to.
#[derive(Clone, Copy, Debug)]
pub enum Keys<'a> {
    Dense(DenseKeys<'a>),
    Sparse(SparseKeys<'a>),
}

/// A validated decode over host memory.
#[derive(Clone, Copy, Debug)]
pub struct Decode<'a> {
    pub shape: DecodeShape,
    pub q_dtype: Dtype,
    /// `[batch, s_q, h_q, d_qk]` of `q_dtype`.
    pub q: &'a [u8],
    pub keys: Keys<'a>,
    /// Optional `[h_q]`: output scaled by `1 / (1 + exp(sink[h] - lse))`.
    pub attn_sink: Option<&'a [f32]>,
    /// Leading columns of every query row that are zero
    /// ([`Decode::with_zero_query_prefix`]): a kernel may leave them out
    /// of `Q·Kᵀ`. 0 for every call through the C API.
    pub q_zero_prefix: usize,
}

fn check_q(shape: &DecodeShape, q_dtype: Dtype, q: &[u8], d_qk_cache: usize) -> Result<()> {
    q_dtype.check_activation("q_dtype")?;
    if q.len() < shape.q_elems() * q_dtype.size() {
        return Err(Error::internal("q is smaller than [batch, s_q, h_q, d_qk]"));
    }
    if d_qk_cache != shape.d_qk {
        return Err(Error::internal("cache layout and shape disagree on d_qk"));
    }
    Ok(())
}

impl<'a> Decode<'a> {
    /// Dense decode: checks lengths, sequence lengths and every block id a
    /// sequence reads.
    pub fn dense(
        shape: DecodeShape,
        q_dtype: Dtype,
        q: &'a [u8],
        kv: KvCache<'a>,
        block_table: &'a [i32],
        block_table_stride: usize,
        seqlens: &'a [i32],
    ) -> Result<Self> {
        check_q(&shape, q_dtype, q, kv.layout.d_qk)?;
        if seqlens.len() < shape.batch || block_table.len() < shape.batch * block_table_stride {
            return Err(Error::internal(
                "seqlens or block_table smaller than the batch",
            ));
        }
        let bs = kv.block_size();
        let capacity = block_table_stride as i64 * bs as i64;
        for (b, &len) in seqlens[..shape.batch].iter().enumerate() {
            if len < 0 || len as i64 > capacity {
                return Err(Error::invalid(format!(
                    "seqlens[{b}] = {len} is outside [0, {capacity}] (block_table_stride {block_table_stride} x block_size {bs})"
                )));
            }
            let used = (len as usize).div_ceil(bs);
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
        Ok(Decode {
            shape,
            q_dtype,
            q,
            keys: Keys::Dense(DenseKeys {
                kv,
                block_table,
                block_table_stride,
                seqlens,
            }),
            attn_sink: None,
            q_zero_prefix: 0,
        })
    }

    /// Sparse decode: checks topk lengths and every used index.
    pub fn sparse(
        shape: DecodeShape,
        q_dtype: Dtype,
        q: &'a [u8],
        main: IndexedKeys<'a>,
        extra: Option<IndexedKeys<'a>>,
    ) -> Result<Self> {
        check_q(&shape, q_dtype, q, main.kv.layout.d_qk)?;
        if shape.causal {
            return Err(Error::invalid(
                "causal = true with indices: sparse attention takes its keys from the index lists, set causal = false",
            ));
        }
        main.validate(&shape, "")?;
        if let Some(x) = &extra {
            if x.kv.layout.d_qk != shape.d_qk {
                return Err(Error::internal("extra cache and shape disagree on d_qk"));
            }
            x.validate(&shape, "extra_")?;
        }
        Ok(Decode {
            shape,
            q_dtype,
            q,
            keys: Keys::Sparse(SparseKeys { main, extra }),
            attn_sink: None,
            q_zero_prefix: 0,
        })
    }

    /// Adds a per-head attention sink (`[h_q]`; +inf zeroes the output,
    /// -inf has no effect, NaN is rejected).
    pub fn with_sink(mut self, sink: &'a [f32]) -> Result<Self> {
        if sink.len() < self.shape.h_q {
            return Err(Error::internal("attn_sink is smaller than [h_q]"));
        }
        if let Some(h) = sink[..self.shape.h_q].iter().position(|v| v.is_nan()) {
            return Err(Error::invalid(format!("attn_sink[{h}] = NaN")));
        }
        self.attn_sink = Some(sink);
        Ok(self)
    }

    /// Declares the first `cols` columns of every query row zero, so a
    /// kernel may skip them in `Q·Kᵀ` (the keys' values there only serve
    /// as V: the expanded prefill's rows `[V | K_nope | k_pe]`). Checked:
    /// `cols` must be even, at most `d_qk`, and every such query value
    /// must be zero, else the call would be silently wrong.
    pub fn with_zero_query_prefix(mut self, cols: usize) -> Result<Self> {
        let d = self.shape.d_qk;
        if cols > d || !cols.is_multiple_of(2) {
            return Err(Error::internal(format!(
                "zero query prefix of {cols} columns: must be even and at most d_qk = {d}"
            )));
        }
        let es = self.q_dtype.size();
        let rows = self.shape.q_elems() / d;
        let mut vals = vec![0f32; cols];
        let nonzero = (0..rows).find(|&r| {
            let bytes = &self.q[r * d * es..][..cols * es];
            crate::format::load_slice(self.q_dtype, bytes, &mut vals);
            vals.iter().any(|&v| v != 0.0)
        });
        if let Some(r) = nonzero {
            return Err(Error::internal(format!(
                "query row {r} is not zero in its first {cols} columns"
            )));
        }
        self.q_zero_prefix = cols;
        Ok(self)
    }

    /// Keys query token `i` of sequence `b` attends to (duplicates and the
    /// causal mask included, invalid indices excluded).
    pub fn keys_seen(&self, b: usize, i: usize) -> usize {
        match &self.keys {
            Keys::Dense(d) => self.shape.visible(d.seqlens[b] as usize, i),
            Keys::Sparse(s) => {
                let count = |x: &IndexedKeys| {
                    x.list(self.shape.s_q, b, i)
                        .iter()
                        .filter(|&&p| p >= 0)
                        .count()
                };
                count(&s.main) + s.extra.as_ref().map_or(0, count)
            }
        }
    }

    /// FLOPs of the attention itself (for benchmarks).
    pub fn flops(&self) -> f64 {
        let s = &self.shape;
        let keys: usize = (0..s.batch)
            .flat_map(|b| (0..s.s_q).map(move |i| (b, i)))
            .map(|(b, i)| self.keys_seen(b, i))
            .sum();
        2.0 * keys as f64 * s.h_q as f64 * (s.d_qk + s.d_v) as f64
    }

    /// Cache bytes read, each key row once per query token that reads it
    /// (dense: once per sequence).
    pub fn kv_bytes(&self) -> f64 {
        match &self.keys {
            Keys::Dense(d) => {
                let tokens: usize = d.seqlens[..self.shape.batch]
                    .iter()
                    .map(|&l| l as usize)
                    .sum();
                (tokens * d.kv.layout.row_bytes) as f64
            }
            Keys::Sparse(s) => {
                let s_q = self.shape.s_q;
                let rows = |x: &IndexedKeys| -> usize {
                    (0..self.shape.batch)
                        .flat_map(|b| (0..s_q).map(move |i| (b, i)))
                        .map(|(b, i)| {
                            x.list(s_q, b, i).iter().filter(|&&p| p >= 0).count()
                                * x.kv.layout.row_bytes
                        })
                        .sum()
                };
                (rows(&s.main) + s.extra.as_ref().map_or(0, rows)) as f64
            }
        }
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
        let layout = KvLayout::new(crate::format::KvFormat::F32, 4, 2, "kv_format").unwrap();
        let kv = KvCache::new(layout, &kvdata, 4).unwrap();
        let q = vec![0u8; 2 * 4 * 4];
        // Sequence 0 uses one block; the padding entry 99 is never read.
        let table = [3, 99, 0, 2];
        assert!(Decode::dense(shape, Dtype::F32, &q, kv, &table, 2, &[2, 3]).is_ok());
        let e = Decode::dense(shape, Dtype::F32, &q, kv, &table, 2, &[3, 3]).unwrap_err();
        assert_eq!(e.message, "block_table[0][1] = 99 is outside [0, 4)");
        let e = Decode::dense(shape, Dtype::F32, &q, kv, &table, 2, &[2, 5]).unwrap_err();
        assert!(
            e.message.starts_with("seqlens[1] = 5 is outside [0, 4]"),
            "{}",
            e.message
        );
    }

    #[test]
    fn sparse_indices_are_checked_only_where_used() {
        let shape = DecodeShape::new(2, 1, 1, 4, 4, 1.0, false).unwrap();
        let kvdata = vec![0u8; 4 * 2 * 4 * 4];
        let layout = KvLayout::new(crate::format::KvFormat::F32, 4, 2, "kv_format").unwrap();
        let kv = KvCache::new(layout, &kvdata, 4).unwrap();
        let q = vec![0u8; 2 * 4 * 4];
        let idx = [7, -1, 0, 12345];
        let keys = |topk_length| IndexedKeys {
            kv,
            indices: &idx,
            topk: 2,
            topk_length,
        };
        let lens = [2, 1];
        let d = Decode::sparse(shape, Dtype::F32, &q, keys(Some(&lens)), None).unwrap();
        assert_eq!((d.keys_seen(0, 0), d.keys_seen(1, 0)), (1, 1));
        let e = Decode::sparse(shape, Dtype::F32, &q, keys(None), None).unwrap_err();
        assert!(
            e.message
                .starts_with("indices[1][0][1] = 12345 is outside [-1, 8)"),
            "{}",
            e.message
        );
        let bad = [3, 1];
        let e = Decode::sparse(shape, Dtype::F32, &q, keys(Some(&bad)), None).unwrap_err();
        assert_eq!(e.message, "topk_length[0] = 3 is outside [0, 2]");
        let causal = DecodeShape::new(2, 1, 1, 4, 4, 1.0, true).unwrap();
        assert!(Decode::sparse(causal, Dtype::F32, &q, keys(Some(&lens)), None).is_err());
    }
}
