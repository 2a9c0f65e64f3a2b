//! The managed KV pool: paged blocks in the engine's memory, sequences with
//! per-layer lengths, fork with copy-on-write, truncate, and decode over a
//! list of sequences.
//!
//! Block `k` of a sequence holds its tokens `[k * block_size, (k + 1) *
//! block_size)` in every layer, so one block table serves all layers. Blocks
//! are reference counted: a fork shares them, and the first write into a
//! shared block copies it (all layers) first.
//!
//! Memory: the engine's. On a CPU engine the layers are host buffers; on a
//! CUDA engine they are device memory: appended rows are copied once and
//! converted/quantized by the `mla_append` kernel (byte-identical to the
//! host's encoding), copy-on-write copies stay on the device, and decode
//! reads the layer in place (only queries, tables and outputs move).
//!
//! Concurrency: the state sits behind one reader-writer lock. Mutations
//! (create, free, fork, truncate, append) are serialized; decodes and
//! queries share the lock and run concurrently with each other.

use crate::backend::cuda::indexer::{KeyScatter, SelectOut};
use crate::backend::cuda::staging::{DataRef, OutRef};
use crate::backend::Buffer;
use crate::decode::desc::DecodeOutput;
use crate::decode::{Decode, DecodeShape, IndexedKeys, KvCache};
use crate::engine::Engine;
use crate::error::{check_range, checked_size, Error, Result, Status};
use crate::format::{load_slice, Dtype, KvFormat, KvLayout};
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::collections::HashMap;
use std::sync::Arc;

/// Refuses to go on on an engine worker thread; see [`KvPool::read`].
fn off_engine_workers() -> Result<()> {
    if crate::backend::cpu::on_engine_worker() {
        return Err(Error::internal(
            "the KV pool's lock was requested on an engine worker thread, \
             which can deadlock concurrent calls (a bug in mlart)",
        ));
    }
    Ok(())
}

/// Pool geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolOptions {
    pub format: KvFormat,
    pub d_qk: usize,
    pub num_layers: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    /// Elements of an indexer key per token (DeepSeek-V3.2's
    /// `index_head_dim`), 0 for none. A pool with indexer keys keeps, per
    /// layer and token, the key as E4M3 codes and its f32 scale
    /// ([`index_row_bytes`]) beside the cache row, in the same memory (a
    /// GPU pool's keys stay on the GPU, which then scores them); rows reach
    /// it only through a model forward, which writes both.
    pub index_dim: usize,
}

/// Bytes of one token's indexer key: `dim` E4M3 codes, then its f32 scale.
pub fn index_row_bytes(dim: usize) -> usize {
    if dim == 0 {
        0
    } else {
        dim + 4
    }
}

/// Sparse attention over a pool: per query token, logical positions.
#[derive(Clone, Copy, Debug)]
pub struct PoolSparse<'a> {
    /// `[batch, s_q, topk]`: token positions `0..len` of each sequence, -1 = none.
    pub indices: &'a [i32],
    pub topk: usize,
    /// Optional `[batch]`: only the first `topk_length[b]` entries are used.
    pub topk_length: Option<&'a [i32]>,
}

/// Occupancy figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub blocks_total: usize,
    pub blocks_used: usize,
    pub blocks_free: usize,
    pub sequences: usize,
    /// Bytes of one block across all layers.
    pub bytes_per_block: usize,
    /// Bytes of cache memory the pool owns.
    pub bytes_total: usize,
}

#[derive(Clone, Debug)]
struct Sequence {
    blocks: Vec<i32>,
    /// Tokens stored, per layer.
    lens: Vec<usize>,
}

impl Sequence {
    fn max_len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }
}

/// The rows of an append: per item in host memory, or all items' rows one
/// after another in the engine's GPU memory.
enum RowData<'a> {
    Host(Vec<&'a [u8]>),
    Device(u64),
}

/// The indexer keys of an append: per item in host memory, or all items'
/// rows one after another in the engine's GPU memory (a pool whose keys
/// are there).
#[derive(Clone, Copy)]
pub(crate) enum KeyRows<'a> {
    Host(&'a [&'a [u8]]),
    Device(u64),
}

/// A selection's shape and destination (see [`KvPool::select_with`]).
pub(crate) struct Selection<'a> {
    /// Indexer heads.
    pub heads: usize,
    pub topk: usize,
    pub out: SelectOut<'a>,
    /// Bytes of scores per GPU pass; 0: the default.
    pub score_budget: usize,
}

/// The keys of a sparse decode over a pool: logical positions (checked and
/// translated), or pool slots `[batch, s_q, topk]` (-1: none) in engine
/// memory, which a kernel wrote from this pool's block tables
/// ([`KvPool::select_with`]).
pub(crate) enum SparseIn<'a> {
    Logical(PoolSparse<'a>),
    Slots { ptr: u64, topk: usize },
}

/// One layer's `[num_blocks, block]` cache.
enum LayerMem {
    Host(Buffer),
    /// Device memory of the engine's GPU.
    Device(u64),
}

struct State {
    /// Per layer: `[num_blocks, block_size, row]`.
    layers: Vec<LayerMem>,
    /// Per layer: `[num_blocks, block_size, index_row_bytes]`, beside the
    /// cache (host memory, or GPU memory where the indexer then runs);
    /// empty without indexer keys.
    index: Vec<LayerMem>,
    refcount: Vec<u32>,
    free: Vec<i32>,
    seqs: HashMap<u64, Sequence>,
}

pub struct KvPool {
    engine: Arc<Engine>,
    opts: PoolOptions,
    layout: KvLayout,
    state: RwLock<State>,
}

impl Drop for KvPool {
    fn drop(&mut self) {
        if let Some(cuda) = self.engine.backend().cuda() {
            // Work enqueued without a wait (a device-row append, a decode of
            // a layer kept on the GPU) may still use the blocks.
            let _ = cuda.sync();
            let st = self.state.get_mut();
            for m in st.layers.iter().chain(&st.index) {
                if let LayerMem::Device(p) = m {
                    // Nothing to report to from a drop; the driver frees
                    // the rest at exit.
                    let _ = cuda.mem_free(*p);
                }
            }
        }
    }
}

impl KvPool {
    pub fn new(engine: Arc<Engine>, opts: PoolOptions) -> Result<Self> {
        check_range(
            "d_qk",
            opts.d_qk as i64,
            1,
            crate::decode::desc::MAX_HEAD_DIM as i64 + 1,
        )?;
        check_range("num_layers", opts.num_layers as i64, 1, 1 << 16)?;
        check_range("block_size", opts.block_size as i64, 1, 1 << 20)?;
        check_range("num_blocks", opts.num_blocks as i64, 1, i32::MAX as i64)?;
        check_range(
            "index_head_dim",
            opts.index_dim as i64,
            0,
            crate::model::config::MAX_INDEX_HEAD_DIM as i64 + 1,
        )?;
        let layout = KvLayout::new(opts.format, opts.d_qk, opts.block_size, "kv_format")?;
        let layer_bytes = layout.cache_bytes(opts.num_blocks)?;
        checked_size("kv pool", &[layer_bytes, opts.num_layers])?;
        let index_bytes = checked_size(
            "kv pool indexer keys",
            &[
                index_row_bytes(opts.index_dim),
                opts.block_size,
                opts.num_blocks,
                opts.num_layers,
            ],
        )? / opts.num_layers;
        let index_layers = if opts.index_dim == 0 {
            0
        } else {
            opts.num_layers
        };
        let mut layers = match engine.backend().cuda() {
            None => (0..opts.num_layers)
                .map(|l| {
                    engine
                        .backend()
                        .alloc(&format!("kv pool layer {l}"), layer_bytes)
                        .map(LayerMem::Host)
                })
                .chain((0..index_layers).map(|l| {
                    Buffer::host_zeroed(&format!("kv pool layer {l} indexer keys"), index_bytes)
                        .map(LayerMem::Host)
                }))
                .collect::<Result<Vec<_>>>()?,
            Some(cuda) => {
                // The cache layers, then the indexer keys' layers.
                let mut v = Vec::with_capacity(opts.num_layers + index_layers);
                let r = (|| {
                    for l in 0..opts.num_layers + index_layers {
                        let bytes = if l < opts.num_layers {
                            layer_bytes
                        } else {
                            index_bytes
                        };
                        let p = cuda.mem_alloc(bytes)?;
                        v.push(LayerMem::Device(p));
                        cuda.zero_async(p, bytes)?;
                    }
                    cuda.sync()
                })();
                if let Err(e) = r {
                    for m in &v {
                        if let LayerMem::Device(p) = m {
                            let _ = cuda.mem_free(*p);
                        }
                    }
                    return Err(e.with_context("creating the KV pool in GPU memory"));
                }
                v
            }
        };
        let index = layers.split_off(opts.num_layers);
        Ok(KvPool {
            engine,
            opts,
            layout,
            state: RwLock::new(State {
                layers,
                index,
                refcount: vec![0; opts.num_blocks],
                // Pop from the end: hand out low block ids first.
                free: (0..opts.num_blocks as i32).rev().collect(),
                seqs: HashMap::new(),
            }),
        })
    }

    pub fn options(&self) -> &PoolOptions {
        &self.opts
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn layer_index(&self, layer: i64) -> Result<usize> {
        check_range("layer", layer, 0, self.opts.num_layers as i64)?;
        Ok(layer as usize)
    }

    fn missing(seq: u64) -> Error {
        Error::not_found(format!("seq_id = {seq} is not a sequence of this pool"))
    }

    /// The pool's lock, shared. Every lock is taken on the calling thread,
    /// never on an engine worker: a worker that blocked here could be the
    /// one a lock holder's parallel copy is waiting for, and concurrent
    /// calls would deadlock. Doing so is a bug in mlart, so it is refused
    /// with an error rather than risking the hang.
    fn read(&self) -> Result<RwLockReadGuard<'_, State>> {
        off_engine_workers()?;
        Ok(self.state.read())
    }

    /// The pool's lock, exclusive; see [`Self::read`].
    fn write(&self) -> Result<RwLockWriteGuard<'_, State>> {
        off_engine_workers()?;
        Ok(self.state.write())
    }

    /// Block counts. Infallible for the ABI's sake: it is only called on a
    /// host's thread, which the debug assertion checks.
    pub fn stats(&self) -> PoolStats {
        debug_assert!(!crate::backend::cpu::on_engine_worker());
        let st = self.state.read();
        let bytes_per_block = (self.layout.block_bytes
            + index_row_bytes(self.opts.index_dim) * self.opts.block_size)
            * self.opts.num_layers;
        PoolStats {
            blocks_total: self.opts.num_blocks,
            blocks_used: self.opts.num_blocks - st.free.len(),
            blocks_free: st.free.len(),
            sequences: st.seqs.len(),
            bytes_per_block,
            bytes_total: bytes_per_block * self.opts.num_blocks,
        }
    }

    /// Creates an empty sequence.
    pub fn create_seq(&self, seq: u64) -> Result<()> {
        let mut st = self.write()?;
        if st.seqs.contains_key(&seq) {
            return Err(Error::invalid(format!("seq_id = {seq} already exists")));
        }
        let lens = vec![0; self.opts.num_layers];
        st.seqs.insert(
            seq,
            Sequence {
                blocks: Vec::new(),
                lens,
            },
        );
        Ok(())
    }

    /// Frees a sequence; blocks no other sequence shares return to the pool.
    pub fn free_seq(&self, seq: u64) -> Result<()> {
        let mut st = self.write()?;
        let s = st.seqs.remove(&seq).ok_or_else(|| Self::missing(seq))?;
        for &b in &s.blocks {
            release(&mut st, b);
        }
        Ok(())
    }

    /// Makes `dst` a copy of `src` that shares its blocks (copy-on-write).
    pub fn fork(&self, src: u64, dst: u64) -> Result<()> {
        let mut st = self.write()?;
        if st.seqs.contains_key(&dst) {
            return Err(Error::invalid(format!("dst seq_id = {dst} already exists")));
        }
        let s = st.seqs.get(&src).ok_or_else(|| Self::missing(src))?.clone();
        for &b in &s.blocks {
            st.refcount[b as usize] += 1;
        }
        st.seqs.insert(dst, s);
        Ok(())
    }

    /// Cuts every layer of `seq` to at most `len` tokens and releases the
    /// blocks no longer needed (speculative-decode rollback).
    pub fn truncate(&self, seq: u64, len: i64) -> Result<()> {
        if len < 0 {
            return Err(Error::invalid(format!("length = {len} must be >= 0")));
        }
        let mut st = self.write()?;
        let bs = self.opts.block_size;
        let s = st.seqs.get_mut(&seq).ok_or_else(|| Self::missing(seq))?;
        for l in s.lens.iter_mut() {
            *l = (*l).min(len as usize);
        }
        let keep = s.max_len().div_ceil(bs);
        let dropped: Vec<i32> = s.blocks.drain(keep..).collect();
        for b in dropped {
            release(&mut st, b);
        }
        Ok(())
    }

    /// Cuts one layer of `seq` to at most `len` tokens (undoing an append);
    /// blocks no layer needs any more are released.
    pub fn truncate_layer(&self, seq: u64, layer: i64, len: usize) -> Result<()> {
        let layer = self.layer_index(layer)?;
        let mut st = self.write()?;
        let bs = self.opts.block_size;
        let s = st.seqs.get_mut(&seq).ok_or_else(|| Self::missing(seq))?;
        s.lens[layer] = s.lens[layer].min(len);
        let keep = s.max_len().div_ceil(bs);
        let dropped: Vec<i32> = s.blocks.drain(keep..).collect();
        for b in dropped {
            release(&mut st, b);
        }
        Ok(())
    }

    /// Tokens stored in `layer` of `seq`.
    pub fn len(&self, seq: u64, layer: i64) -> Result<usize> {
        let layer = self.layer_index(layer)?;
        let st = self.read()?;
        Ok(st.seqs.get(&seq).ok_or_else(|| Self::missing(seq))?.lens[layer])
    }

    /// Appends `n` rows of `d_qk` elements of `dtype` to `layer` of `seq`.
    /// On any error, including a full pool, nothing changes.
    pub fn append(&self, seq: u64, layer: i64, n: usize, dtype: Dtype, src: &[u8]) -> Result<()> {
        self.append_batch(layer, &[(seq, n, src)], dtype)
    }

    /// Appends rows to several sequences of one layer, all or nothing:
    /// the blocks every sequence needs (new ones and copy-on-write copies)
    /// are counted under one lock before anything changes.
    pub fn append_batch(
        &self,
        layer: i64,
        items: &[(u64, usize, &[u8])],
        dtype: Dtype,
    ) -> Result<()> {
        self.append_batch_indexed(layer, items, dtype, None)
    }

    /// [`Self::append_batch`] that also writes each item's indexer keys:
    /// `index[i]` holds `n` rows of [`index_row_bytes`] for item `i`.
    /// Required (and only allowed) when the pool keeps indexer keys.
    pub fn append_batch_indexed(
        &self,
        layer: i64,
        items: &[(u64, usize, &[u8])],
        dtype: Dtype,
        index: Option<&[&[u8]]>,
    ) -> Result<()> {
        let counts: Vec<(u64, usize)> = items.iter().map(|&(s, n, _)| (s, n)).collect();
        let rows = RowData::Host(items.iter().map(|&(_, _, r)| r).collect());
        self.append_rows(layer, &counts, rows, dtype, index.map(KeyRows::Host))
    }

    /// [`Self::append_batch_indexed`] from rows in the engine's GPU memory:
    /// `rows` holds `[sum of n, d_qk]` of `dtype`, the items' rows one
    /// after another (the indexer keys, if any, in host memory or, laid out
    /// the same way, in GPU memory). The rows are converted on the engine's
    /// stream and not waited for: later work there sees them. A device pool
    /// only.
    pub(crate) fn append_batch_device(
        &self,
        layer: i64,
        items: &[(u64, usize)],
        rows: u64,
        dtype: Dtype,
        index: Option<KeyRows<'_>>,
    ) -> Result<()> {
        self.append_rows(layer, items, RowData::Device(rows), dtype, index)
    }

    fn append_rows(
        &self,
        layer: i64,
        items: &[(u64, usize)],
        rows: RowData<'_>,
        dtype: Dtype,
        index: Option<KeyRows<'_>>,
    ) -> Result<()> {
        let layer = self.layer_index(layer)?;
        let irow = index_row_bytes(self.opts.index_dim);
        match index {
            // A plain append to a pool with indexer keys: its tokens would
            // have no key for the indexer to score.
            None if irow != 0 => {
                return Err(Error::invalid(format!(
                    "this pool keeps indexer keys (index_head_dim = {}): its rows are appended by a DeepSeek-V3.2 model's forward, which computes them, not by a plain append",
                    self.opts.index_dim
                )))
            }
            Some(_) if irow == 0 => {
                return Err(Error::internal("indexer keys for a pool without them"))
            }
            Some(KeyRows::Host(ix))
                if ix.len() != items.len()
                    || ix
                        .iter()
                        .zip(items)
                        .any(|(r, &(_, n))| r.len() < n * irow) =>
            {
                return Err(Error::internal("indexer key rows do not match the items"));
            }
            _ => {}
        }
        dtype.check_activation("dtype")?;
        let src_row = self.opts.d_qk * dtype.size();
        let bs = self.opts.block_size;
        let mut st = self.write()?;
        let st = &mut *st;
        // Plan: per item its start, end and the block slots to copy; count
        // blocks, following the references each planned copy gives up.
        let mut released: HashMap<i32, u32> = HashMap::new();
        let mut plans = Vec::with_capacity(items.len());
        let mut needed = 0;
        for (i, &(seq, n)) in items.iter().enumerate() {
            let need_bytes = checked_size("rows", &[n, src_row])?;
            if matches!(&rows, RowData::Host(r) if r.get(i).is_none_or(|r| r.len() < need_bytes)) {
                return Err(Error::internal("rows buffer is smaller than [n, d_qk]"));
            }
            if items[..i].iter().any(|&(other, _)| other == seq) {
                return Err(Error::invalid(format!(
                    "seq_id = {seq} appears twice in one append"
                )));
            }
            let s = st.seqs.get(&seq).ok_or_else(|| Self::missing(seq))?;
            let start = s.lens[layer];
            let end = start
                .checked_add(n)
                .filter(|&e| e <= i32::MAX as usize)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "n = {n}: sequence {seq} would exceed {} tokens",
                        i32::MAX
                    ))
                })?;
            let need = if n == 0 { 0 } else { end.div_ceil(bs) };
            let fresh = need.saturating_sub(s.blocks.len());
            let mut shared = Vec::new();
            for j in start / bs..need.min(s.blocks.len()) {
                let b = s.blocks[j];
                let gone = released.get(&b).copied().unwrap_or(0);
                if st.refcount[b as usize] - gone > 1 {
                    *released.entry(b).or_default() += 1;
                    shared.push(j);
                }
            }
            needed += fresh + shared.len();
            plans.push((start, end, fresh, shared));
        }
        if needed > st.free.len() {
            let what: Vec<String> = items
                .iter()
                .map(|&(seq, n)| format!("{n} tokens to seq_id {seq}"))
                .collect();
            return Err(Error::new(
                Status::PoolExhausted,
                format!(
                    "appending {} needs {needed} free blocks but {} are left (pool of {} blocks x {bs} tokens)",
                    what.join(", "),
                    st.free.len(),
                    self.opts.num_blocks,
                ),
            ));
        }
        // Block ids in the order `free.pop()` hands them out, assigned now
        // so the data can be written before any state changes.
        let mut take = st.free.iter().rev().copied();
        let mut applies = Vec::with_capacity(items.len());
        for (&(seq, _), (start, end, fresh, shared)) in items.iter().zip(plans) {
            let s = st.seqs.get(&seq).ok_or_else(|| Self::missing(seq))?;
            let mut blocks = s.blocks.clone();
            let mut copies = Vec::with_capacity(shared.len());
            for j in shared {
                let new = take
                    .next()
                    .ok_or_else(|| Error::internal("free list too short"))?;
                copies.push((blocks[j], new));
                blocks[j] = new;
            }
            let mut fresh_ids = Vec::with_capacity(fresh);
            for _ in 0..fresh {
                let id = take
                    .next()
                    .ok_or_else(|| Error::internal("free list too short"))?;
                fresh_ids.push(id);
                blocks.push(id);
            }
            applies.push(PlannedAppend {
                start,
                end,
                blocks,
                copies,
                fresh: fresh_ids,
            });
        }
        // Data: the indexer keys, then copy-on-write copies (every layer)
        // and the rows (on a GPU, waited for there with host rows).
        if let Some(ix) = index {
            self.write_index(st, layer, items, &applies, ix)?;
        }
        self.write_data(st, layer, items, &rows, &applies, dtype, index)?;
        // Commit; nothing can fail from here on.
        st.free.truncate(st.free.len() - needed);
        for (&(seq, _), a) in items.iter().zip(applies) {
            for &(old, new) in &a.copies {
                st.refcount[old as usize] -= 1;
                st.refcount[new as usize] = 1;
            }
            for &id in &a.fresh {
                st.refcount[id as usize] = 1;
            }
            let s = st.seqs.get_mut(&seq).ok_or_else(|| Self::missing(seq))?;
            s.blocks = a.blocks;
            s.lens[layer] = a.end;
        }
        Ok(())
    }

    /// Writes an append's data (see `append_batch`): on the host in place,
    /// on a GPU through the engine's stream, waiting for it at the end (host
    /// rows) so a failure is seen before the append commits.
    #[allow(clippy::too_many_arguments)]
    fn write_data(
        &self,
        st: &mut State,
        layer: usize,
        items: &[(u64, usize)],
        rows: &RowData<'_>,
        applies: &[PlannedAppend],
        dtype: Dtype,
        index: Option<KeyRows<'_>>,
    ) -> Result<()> {
        let block_bytes = self.layout.block_bytes;
        let bs = self.opts.block_size;
        let d_qk = self.opts.d_qk;
        let src_row = d_qk * dtype.size();
        let plain = self.opts.format.plain_dtype();
        let mut row = [0f32; crate::decode::desc::MAX_HEAD_DIM];
        // Converts one source row into token `off` of block `block` of `dst`.
        let mut put_row = |dst: &mut [u8], block: usize, off: usize, srow: &[u8]| {
            if plain == Some(dtype) {
                let at = block * block_bytes + off * src_row;
                dst[at..at + src_row].copy_from_slice(srow);
            } else {
                load_slice(dtype, srow, &mut row[..d_qk]);
                self.layout.store_row(dst, block, off, &row[..d_qk]);
            }
        };
        match self.engine.backend().cuda() {
            None => {
                for a in applies {
                    for &(old, new) in &a.copies {
                        for buf in st.layers.iter_mut() {
                            if let LayerMem::Host(b) = buf {
                                b.as_mut_slice().copy_within(
                                    old as usize * block_bytes..(old as usize + 1) * block_bytes,
                                    new as usize * block_bytes,
                                );
                            }
                        }
                    }
                }
                let LayerMem::Host(buf) = &mut st.layers[layer] else {
                    return Err(Error::internal("host pool with a device layer"));
                };
                let RowData::Host(srcs) = rows else {
                    return Err(Error::internal("device rows for a host pool"));
                };
                let data = buf.as_mut_slice();
                for ((&(_, n), src), a) in items.iter().zip(srcs).zip(applies) {
                    for k in 0..n {
                        let t = a.start + k;
                        let block = a.blocks[t / bs] as usize;
                        put_row(data, block, t % bs, &src[k * src_row..(k + 1) * src_row]);
                    }
                }
                Ok(())
            }
            Some(cuda) => {
                let ptrs: Vec<u64> = st
                    .layers
                    .iter()
                    .map(|m| match m {
                        LayerMem::Device(p) => Ok(*p),
                        LayerMem::Host(_) => Err(Error::internal("device pool with a host layer")),
                    })
                    .collect::<Result<_>>()?;
                for a in applies {
                    for &(old, new) in &a.copies {
                        for &p in &ptrs {
                            cuda.copy_async(
                                p + (new as usize * block_bytes) as u64,
                                p + (old as usize * block_bytes) as u64,
                                block_bytes,
                            )?;
                        }
                    }
                }
                // Rows: one staged copy (unless they are on the device) and
                // the append kernel, which converts/quantizes exactly as the
                // host does.
                let mut slots = Vec::new();
                for (&(_, n), a) in items.iter().zip(applies) {
                    for k in 0..n {
                        let t = a.start + k;
                        slots.push((a.blocks[t / bs] as usize * bs + t % bs) as i32);
                    }
                }
                let kv = ptrs[layer];
                // The indexer keys go to the same slots.
                let irow = index_row_bytes(self.opts.index_dim);
                let mut host_keys = Vec::new();
                let keys = match (index, st.index.get(layer)) {
                    (None, _) => None,
                    (Some(k), Some(&LayerMem::Device(dst))) => Some(KeyScatter {
                        dst,
                        row_bytes: irow,
                        rows: match k {
                            KeyRows::Host(rows) => {
                                for (&(_, n), r) in items.iter().zip(rows) {
                                    host_keys.extend_from_slice(&r[..n * irow]);
                                }
                                DataRef::Host(&host_keys)
                            }
                            KeyRows::Device(p) => DataRef::Device(p),
                        },
                    }),
                    (Some(_), _) => return Err(Error::internal("indexer keys not on the GPU")),
                };
                match rows {
                    RowData::Host(srcs) => {
                        let mut host = Vec::new();
                        for (&(_, n), src) in items.iter().zip(srcs) {
                            host.extend_from_slice(&src[..n * src_row]);
                        }
                        let data = DataRef::Host(&host);
                        cuda.append_rows(kv, &self.layout, dtype, data, &slots, keys, true)?;
                        // The copy-on-write copies too, before the append commits.
                        cuda.sync()
                    }
                    RowData::Device(p) => {
                        let data = DataRef::Device(*p);
                        cuda.append_rows(kv, &self.layout, dtype, data, &slots, keys, false)
                    }
                }
            }
        }
    }

    /// Writes an append's indexer keys: the copy-on-write copies of every
    /// layer's keys, then (host memory) the new rows; a GPU pool's new rows
    /// go with the append's own (`write_data`). They only touch blocks the
    /// append takes, so a later failure of the append leaves nothing
    /// changed. On a GPU this is enqueued (`write_data` waits for it).
    fn write_index(
        &self,
        st: &mut State,
        layer: usize,
        items: &[(u64, usize)],
        applies: &[PlannedAppend],
        index: KeyRows<'_>,
    ) -> Result<()> {
        let bs = self.opts.block_size;
        let irow = index_row_bytes(self.opts.index_dim);
        let block_bytes = irow * bs;
        let cuda = self.engine.backend().cuda();
        for a in applies {
            for &(old, new) in &a.copies {
                let (old, new) = (old as usize * block_bytes, new as usize * block_bytes);
                for buf in st.index.iter_mut() {
                    match (buf, cuda) {
                        (LayerMem::Host(b), _) => {
                            b.as_mut_slice().copy_within(old..old + block_bytes, new)
                        }
                        (LayerMem::Device(p), Some(c)) => {
                            c.copy_async(*p + new as u64, *p + old as u64, block_bytes)?
                        }
                        (LayerMem::Device(_), None) => {
                            return Err(Error::internal("device indexer keys on a CPU engine"))
                        }
                    }
                }
            }
        }
        let slot = |a: &PlannedAppend, t: usize| a.blocks[t / bs] as usize * bs + t % bs;
        match (&mut st.index[layer], cuda, index) {
            (LayerMem::Host(buf), _, KeyRows::Host(index)) => {
                let data = buf.as_mut_slice();
                for ((&(_, n), a), rows) in items.iter().zip(applies).zip(index) {
                    for k in 0..n {
                        let at = slot(a, a.start + k) * irow;
                        data[at..at + irow].copy_from_slice(&rows[k * irow..(k + 1) * irow]);
                    }
                }
                Ok(())
            }
            // A GPU pool's new keys go with the append's rows (`write_data`).
            (LayerMem::Device(_), Some(_), _) => Ok(()),
            (LayerMem::Host(_), _, KeyRows::Device(_)) => {
                Err(Error::internal("device indexer keys for a host pool"))
            }
            (LayerMem::Device(_), None, _) => {
                Err(Error::internal("device indexer keys on a CPU engine"))
            }
        }
    }

    /// Whether the pool's indexer keys live in GPU memory, where
    /// [`Self::select_on_device`] scores them (not [`Self::with_index_keys`]).
    pub fn index_on_device(&self) -> bool {
        // As `new` places them: with the cache, on a CUDA engine's GPU.
        self.opts.index_dim != 0 && self.engine.backend().cuda().is_some()
    }

    /// The indexer's choice for new tokens whose keys are appended, on the
    /// GPU that holds the pool's keys (see `model::indexer::select`): the
    /// tokens are `n_tokens[b]` of each sequence `seqs[b]`, in batch order,
    /// at positions `pos`; `q [tokens, heads, index_dim]` and `w [tokens,
    /// heads]` as `IndexerTokens`; `out [tokens, topk]`. The GPU holds at
    /// most `score_budget` bytes of scores at a time (0: the default, 32
    /// MiB), taking fewer tokens per pass. Waits.
    #[allow(clippy::too_many_arguments)]
    pub fn select_on_device(
        &self,
        layer: i64,
        seqs: &[u64],
        n_tokens: &[usize],
        pos: &[usize],
        q: &[f32],
        w: &[f32],
        heads: usize,
        out: &mut [i32],
        score_budget: usize,
    ) -> Result<()> {
        let (q, w) = (bytemuck::cast_slice(q), bytemuck::cast_slice(w));
        let (q, w) = (DataRef::Host(q), DataRef::Host(w));
        let topk = out.len() / pos.len().max(1);
        let out = SelectOut::Host(out);
        let sel = Selection {
            heads,
            topk,
            out,
            score_budget,
        };
        self.select_with(layer, seqs, n_tokens, pos, q, w, sel)
    }

    /// [`Self::select_on_device`] with `q` and `w` in host or engine
    /// memory, the choices into host memory (waited for) or as positions
    /// and/or pool slots into engine memory (enqueued).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn select_with(
        &self,
        layer: i64,
        seqs: &[u64],
        n_tokens: &[usize],
        pos: &[usize],
        q: DataRef<'_>,
        w: DataRef<'_>,
        sel: Selection<'_>,
    ) -> Result<()> {
        let Selection {
            heads,
            topk,
            out,
            score_budget,
        } = sel;
        let layer = self.layer_index(layer)?;
        let cuda = self
            .engine
            .backend()
            .cuda()
            .ok_or_else(|| Error::internal("device indexer keys on a CPU engine"))?;
        let st = self.read()?;
        let Some(&LayerMem::Device(keys)) = st.index.get(layer) else {
            return Err(Error::internal(
                "the pool's indexer keys are not in GPU memory",
            ));
        };
        let total: usize = n_tokens.iter().sum();
        if seqs.len() != n_tokens.len() || pos.len() != total || total == 0 {
            return Err(Error::internal("indexer selection tokens disagree"));
        }
        let found = sequences(&st, seqs)?;
        let (table, stride) = block_tables(&found);
        let (mut tok_seq, mut tok_len) = (Vec::with_capacity(total), Vec::with_capacity(total));
        let mut toks = pos.iter();
        for (b, (s, &n)) in found.iter().zip(n_tokens).enumerate() {
            for &p in toks.by_ref().take(n) {
                // The kernel follows the block table for every candidate:
                // each must be a stored token.
                if p >= s.lens[layer] {
                    return Err(Error::internal(format!(
                        "indexer query at position {p} of a sequence of {} tokens",
                        s.lens[layer]
                    )));
                }
                tok_seq.push(b as i32);
                tok_len.push(p as i32 + 1);
            }
        }
        let query = crate::backend::cuda::indexer::IndexQuery {
            keys,
            block_size: self.opts.block_size,
            dim: self.opts.index_dim,
            heads,
            table: &table,
            stride,
            tok_seq: &tok_seq,
            tok_len: &tok_len,
            q,
            w,
            topk,
            score_budget: if score_budget == 0 {
                crate::backend::cuda::indexer::SCORE_BUDGET
            } else {
                score_budget
            },
        };
        cuda.index_select(&query, out)
    }

    /// Calls `f` with a reader of the indexer keys of `seq` in `layer`
    /// (positions `0..len`), under the pool's read lock.
    pub fn with_index_keys<R>(
        &self,
        seq: u64,
        layer: i64,
        f: impl FnOnce(IndexKeys<'_>) -> R,
    ) -> Result<R> {
        let layer = self.layer_index(layer)?;
        if self.opts.index_dim == 0 {
            return Err(Error::internal("the pool keeps no indexer keys"));
        }
        let st = self.read()?;
        let s = st.seqs.get(&seq).ok_or_else(|| Self::missing(seq))?;
        let LayerMem::Host(data) = &st.index[layer] else {
            return Err(Error::internal(
                "the pool's indexer keys are in GPU memory (select_on_device)",
            ));
        };
        Ok(f(IndexKeys {
            data: data.as_slice(),
            blocks: &s.blocks,
            len: s.lens[layer],
            block_size: self.opts.block_size,
            dim: self.opts.index_dim,
        }))
    }

    /// Positions `range` of `seq` in `layer` (within its length), converted
    /// to f32 rows `[range.len(), d_qk]` at the front of `dst` (FP8 rows
    /// dequantized). Host pools only.
    pub(crate) fn read_rows(
        &self,
        seq: u64,
        layer: i64,
        range: std::ops::Range<usize>,
        dst: &mut [f32],
    ) -> Result<()> {
        let layer = self.layer_index(layer)?;
        let st = self.read()?;
        let s = st.seqs.get(&seq).ok_or_else(|| Self::missing(seq))?;
        let LayerMem::Host(data) = &st.layers[layer] else {
            return Err(Error::internal("read_rows of a pool in GPU memory"));
        };
        let (d, bs) = (self.layout.d_qk, self.opts.block_size);
        if range.start > range.end || range.end > s.lens[layer] {
            return Err(Error::internal(format!(
                "read_rows: positions {range:?} of a sequence of {} tokens",
                s.lens[layer]
            )));
        }
        if dst.len() < range.len() * d {
            return Err(Error::internal(
                "read_rows: dst is smaller than [positions, d_qk]",
            ));
        }
        let kv = KvCache::new(self.layout, data.as_slice(), self.opts.num_blocks)?;
        // On the calling thread: no parallel work while the lock is held (a
        // worker that picked up another call waiting for this lock would
        // never finish its part). A pass's rows take well under a
        // millisecond.
        for (row, p) in dst[..range.len() * d].chunks_exact_mut(d).zip(range) {
            kv.load(s.blocks[p / bs] as usize, p % bs, row);
        }
        Ok(())
    }

    /// Decodes `layer` for the sequences `seqs` (duplicates allowed); the
    /// pool supplies the block table and lengths. `shape.d_qk` must be the
    /// pool's `d_qk` and `shape.batch == seqs.len()`. With `sparse`, each
    /// query attends to the listed *logical* token positions of its sequence
    /// (`-1` = none), which the pool translates through the block table.
    #[allow(clippy::too_many_arguments)]
    pub fn decode(
        &self,
        layer: i64,
        seqs: &[u64],
        shape: DecodeShape,
        q_dtype: Dtype,
        q: &[u8],
        sparse: Option<PoolSparse<'_>>,
        attn_sink: Option<&[f32]>,
        out: &mut DecodeOutput<'_>,
    ) -> Result<()> {
        let q = DataRef::Host(q);
        self.decode_with(
            layer,
            seqs,
            shape,
            q_dtype,
            q,
            sparse.map(SparseIn::Logical),
            attn_sink,
            OutRef::Host(out),
        )
    }

    /// [`Self::decode`] of a device pool with the queries `[batch, s_q,
    /// h_q, d_qk]` and the output `[batch, s_q, h_q, d_v]` in the engine's
    /// GPU memory: enqueued on the engine's stream, not waited for. A
    /// sparse attention's keys may be pool slots in engine memory
    /// ([`SparseIn::Slots`]), which nothing stages.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decode_on_device(
        &self,
        layer: i64,
        seqs: &[u64],
        shape: DecodeShape,
        q_dtype: Dtype,
        q: u64,
        sparse: Option<SparseIn<'_>>,
        out: u64,
        out_dtype: Dtype,
    ) -> Result<()> {
        let out = OutRef::Device {
            ptr: out,
            dtype: out_dtype,
            lse: 0,
        };
        self.decode_with(
            layer,
            seqs,
            shape,
            q_dtype,
            DataRef::Device(q),
            sparse,
            None,
            out,
        )
    }

    /// [`Self::decode`] of a CUDA engine's pool with the queries `[batch,
    /// s_q, h_q, d_qk]`, the output `[batch, s_q, h_q, d_v]` and the lse
    /// `[batch, h_q, s_q]` (unless 0) at device addresses of that engine;
    /// `seqs`, `sparse` and `attn_sink` stay host memory. Ordered after the
    /// work on the caller's CUstream `stream`, which continues after it; 0:
    /// the call waits.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_device_memory(
        &self,
        layer: i64,
        seqs: &[u64],
        shape: DecodeShape,
        q_dtype: Dtype,
        q: u64,
        sparse: Option<PoolSparse<'_>>,
        attn_sink: Option<&[f32]>,
        out: u64,
        out_dtype: Dtype,
        lse: u64,
        stream: u64,
    ) -> Result<()> {
        let cuda = self.engine.backend().cuda().ok_or_else(|| {
            Error::unsupported(
                "memory = MLART_MEMORY_DEVICE but this pool's engine runs on the CPU and reads host memory only",
            )
        })?;
        cuda.join_from(stream)?;
        let out = OutRef::Device {
            ptr: out,
            dtype: out_dtype,
            lse,
        };
        let q = DataRef::Device(q);
        let sparse = sparse.map(SparseIn::Logical);
        self.decode_with(layer, seqs, shape, q_dtype, q, sparse, attn_sink, out)?;
        cuda.join_to(stream)
    }

    #[allow(clippy::too_many_arguments)]
    fn decode_with(
        &self,
        layer: i64,
        seqs: &[u64],
        shape: DecodeShape,
        q_dtype: Dtype,
        q: DataRef<'_>,
        sparse: Option<SparseIn<'_>>,
        attn_sink: Option<&[f32]>,
        out: OutRef<'_, '_>,
    ) -> Result<()> {
        let layer = self.layer_index(layer)?;
        if shape.d_qk != self.opts.d_qk {
            return Err(Error::invalid(format!(
                "d_qk = {} does not match the pool's d_qk = {}",
                shape.d_qk, self.opts.d_qk
            )));
        }
        if shape.batch != seqs.len() {
            return Err(Error::internal("batch and seq_ids disagree"));
        }
        let st = self.read()?;
        let found = sequences(&st, seqs)?;
        let bs = self.opts.block_size;
        // Dense: block table and lengths. Sparse: logical positions
        // translated to physical ones (entries past topk_length stay -1).
        enum Keys {
            Dense(Vec<i32>, usize, Vec<i32>),
            Sparse(Vec<i32>),
            Slots(u64),
        }
        let keys = match &sparse {
            None => {
                let lens: Vec<i32> = found.iter().map(|s| s.lens[layer] as i32).collect();
                let (table, stride) = block_tables(&found);
                Keys::Dense(table, stride, lens)
            }
            Some(SparseIn::Slots { ptr, .. }) => Keys::Slots(*ptr),
            Some(SparseIn::Logical(sp)) => {
                if sp.indices.len() < shape.batch * shape.s_q * sp.topk {
                    return Err(Error::internal("indices smaller than [batch, s_q, topk]"));
                }
                let mut phys = vec![-1i32; shape.batch * shape.s_q * sp.topk];
                for (b, s) in found.iter().enumerate() {
                    let len = s.lens[layer];
                    let used = match sp.topk_length {
                        None => sp.topk,
                        Some(l) => {
                            let n = l[b];
                            if n < 0 || n as usize > sp.topk {
                                return Err(Error::invalid(format!(
                                    "topk_length[{b}] = {n} is outside [0, {}]",
                                    sp.topk
                                )));
                            }
                            n as usize
                        }
                    };
                    for i in 0..shape.s_q {
                        let row = (b * shape.s_q + i) * sp.topk;
                        for k in 0..used {
                            let p = sp.indices[row + k];
                            if p == -1 {
                                continue;
                            }
                            if p < 0 || p as usize >= len {
                                return Err(Error::invalid(format!(
                                    "indices[{b}][{i}][{k}] = {p} is outside [-1, {len}) (seq_ids[{b}] = {} holds {len} tokens in layer {layer})",
                                    seqs[b]
                                )));
                            }
                            let p = p as usize;
                            phys[row + k] = (s.blocks[p / bs] as usize * bs + p % bs) as i32;
                        }
                    }
                }
                Keys::Sparse(phys)
            }
        };
        let topk_length = match &sparse {
            Some(SparseIn::Logical(sp)) => sp.topk_length,
            _ => None,
        };
        let topk = match &sparse {
            Some(SparseIn::Logical(sp)) => sp.topk,
            Some(SparseIn::Slots { topk, .. }) => *topk,
            None => 0,
        };
        match &st.layers[layer] {
            LayerMem::Host(buf) => {
                let (DataRef::Host(q), OutRef::Host(out)) = (q, out) else {
                    return Err(Error::internal("device queries for a host pool"));
                };
                let kv = KvCache::new(self.layout, buf.as_slice(), self.opts.num_blocks)?;
                let d = match &keys {
                    Keys::Dense(table, stride, lens) => {
                        Decode::dense(shape, q_dtype, q, kv, table, *stride, lens)?
                    }
                    Keys::Sparse(phys) => {
                        let main = IndexedKeys {
                            kv,
                            indices: phys,
                            topk,
                            topk_length,
                        };
                        Decode::sparse(shape, q_dtype, q, main, None)?
                    }
                    Keys::Slots(_) => return Err(Error::internal("device slots for a host pool")),
                };
                self.finish(d, attn_sink, out)
            }
            LayerMem::Device(ptr) => {
                use crate::backend::cuda::staging::{HostDecode, HostIndexed, HostKeys, Indices};
                let cuda = self
                    .engine
                    .backend()
                    .cuda()
                    .ok_or_else(|| Error::internal("device pool on a CPU engine"))?;
                let kv = DataRef::Device(*ptr);
                let sparse = |indices| HostKeys::Sparse {
                    main: HostIndexed {
                        layout: self.layout,
                        kv,
                        num_blocks: self.opts.num_blocks,
                        indices,
                        topk,
                        topk_length,
                    },
                    extra: None,
                };
                let keys = match &keys {
                    Keys::Dense(table, stride, lens) => HostKeys::Dense {
                        layout: self.layout,
                        kv,
                        num_blocks: self.opts.num_blocks,
                        table,
                        stride: *stride,
                        seqlens: lens,
                    },
                    Keys::Sparse(phys) => sparse(Indices::Host(phys)),
                    Keys::Slots(p) => sparse(Indices::Device(*p)),
                };
                if let Some(s) = attn_sink {
                    if s.len() < shape.h_q {
                        return Err(Error::internal("attn_sink is smaller than [h_q]"));
                    }
                    if let Some(h) = s[..shape.h_q].iter().position(|v| v.is_nan()) {
                        return Err(Error::invalid(format!("attn_sink[{h}] = NaN")));
                    }
                }
                cuda.decode_staged(
                    &HostDecode {
                        shape,
                        q_dtype,
                        q,
                        keys,
                        sink: attn_sink,
                    },
                    out,
                )
            }
        }
    }

    fn finish(
        &self,
        d: Decode<'_>,
        attn_sink: Option<&[f32]>,
        out: &mut DecodeOutput<'_>,
    ) -> Result<()> {
        let d = match attn_sink {
            Some(s) => d.with_sink(s)?,
            None => d,
        };
        self.engine.decode(&d, out)
    }
}

/// The indexer keys of one sequence in one layer (see
/// [`KvPool::with_index_keys`]).
pub struct IndexKeys<'a> {
    data: &'a [u8],
    blocks: &'a [i32],
    /// Tokens stored.
    pub len: usize,
    block_size: usize,
    /// Elements per key.
    pub dim: usize,
}

impl IndexKeys<'_> {
    /// Token `t`'s key: its E4M3 codes and its scale.
    pub fn key(&self, t: usize) -> (&[u8], f32) {
        let irow = index_row_bytes(self.dim);
        let at = (self.blocks[t / self.block_size] as usize * self.block_size
            + t % self.block_size)
            * irow;
        let row = &self.data[at..at + irow];
        let (codes, scale) = row.split_at(self.dim);
        (
            codes,
            f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]]),
        )
    }
}

/// One sequence's part of an append, planned before anything changes.
struct PlannedAppend {
    start: usize,
    end: usize,
    /// The sequence's block list after the append.
    blocks: Vec<i32>,
    /// Copy-on-write: (old, new) block ids.
    copies: Vec<(i32, i32)>,
    fresh: Vec<i32>,
}

/// The sequences `seqs` (a call's `seq_ids`) of the pool's state.
fn sequences<'s>(st: &'s State, seqs: &[u64]) -> Result<Vec<&'s Sequence>> {
    seqs.iter()
        .enumerate()
        .map(|(i, id)| {
            st.seqs.get(id).ok_or_else(|| {
                Error::not_found(format!(
                    "seq_ids[{i}] = {id} is not a sequence of this pool"
                ))
            })
        })
        .collect()
}

/// The sequences' block tables `[sequences, stride]` (-1 past each one's
/// blocks) and their stride (the most blocks, at least 1).
fn block_tables(seqs: &[&Sequence]) -> (Vec<i32>, usize) {
    let stride = seqs
        .iter()
        .map(|s| s.blocks.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut table = vec![-1i32; seqs.len() * stride];
    for (i, s) in seqs.iter().enumerate() {
        table[i * stride..i * stride + s.blocks.len()].copy_from_slice(&s.blocks);
    }
    (table, stride)
}

fn release(st: &mut State, block: i32) {
    let rc = &mut st.refcount[block as usize];
    *rc -= 1;
    if *rc == 0 {
        st.free.push(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineOptions;
    use crate::format::KvFormat;

    /// The pool's lock is refused on an engine worker (where blocking can
    /// deadlock concurrent calls) and taken on the caller's thread.
    #[test]
    fn the_lock_is_refused_on_engine_workers() {
        let engine = Arc::new(Engine::new(&EngineOptions::default()).unwrap());
        let pool = KvPool::new(
            engine.clone(),
            PoolOptions {
                format: KvFormat::Bf16,
                d_qk: 576,
                num_layers: 1,
                block_size: 64,
                num_blocks: 4,
                index_dim: 0,
            },
        )
        .unwrap();
        assert!(!crate::backend::cpu::on_engine_worker());
        pool.create_seq(1).unwrap();

        let on_worker = engine.install(|| {
            (
                crate::backend::cpu::on_engine_worker(),
                pool.create_seq(2),
                pool.len(1, 0),
            )
        });
        assert!(on_worker.0, "install ran the closure off the workers");
        for e in [on_worker.1.unwrap_err(), on_worker.2.unwrap_err()] {
            assert_eq!(e.status, Status::Internal);
            assert!(e.message.contains("engine worker thread"), "{}", e.message);
        }
        // Nothing changed, and the caller's thread still may.
        assert_eq!(pool.stats().sequences, 1);
        pool.create_seq(2).unwrap();
        assert_eq!(pool.len(2, 0).unwrap(), 0);
    }
}
