//! Host-memory decodes on a GPU: the inputs are packed into one engine-owned
//! staging area (256-byte aligned pieces), copied on the engine's stream,
//! decoded, and the outputs copied back. Caches that already live in engine
//! memory (a GPU-resident pool) are used in place.

use super::args::{DeviceDecode, KeysDev};
use super::device::{CudaBackend, Which};
use super::driver::dev_err;
use super::lowering::as_bytes;
use crate::decode::desc::DecodeOutput;
use crate::error::Result;
use crate::format::Dtype;
use cudarc::driver::result;

/// Data a call reads: host bytes (staged per call) or engine device memory
/// (a device-resident pool layer; a device-resident layer's activations).
#[derive(Clone, Copy, Debug)]
pub enum DataRef<'a> {
    Host(&'a [u8]),
    Device(u64),
}

/// A sparse call's physical indices `[batch, s_q, topk]`: checked host
/// memory, or engine memory a kernel wrote from the pool's own block
/// tables (the V3.2 indexer's choice, `mla_index_topk`).
#[derive(Clone, Copy, Debug)]
pub enum Indices<'a> {
    Host(&'a [i32]),
    Device(u64),
}

/// One indexed cache of a host-memory sparse call.
#[derive(Clone, Copy, Debug)]
pub struct HostIndexed<'a> {
    pub layout: crate::format::KvLayout,
    pub kv: DataRef<'a>,
    pub num_blocks: usize,
    pub indices: Indices<'a>,
    pub topk: usize,
    pub topk_length: Option<&'a [i32]>,
}

/// Which keys a host-memory call reads.
#[derive(Clone, Copy, Debug)]
pub enum HostKeys<'a> {
    Dense {
        layout: crate::format::KvLayout,
        kv: DataRef<'a>,
        num_blocks: usize,
        table: &'a [i32],
        stride: usize,
        seqlens: &'a [i32],
    },
    Sparse {
        main: HostIndexed<'a>,
        extra: Option<HostIndexed<'a>>,
    },
}

/// A validated decode whose small inputs are in host memory.
#[derive(Clone, Copy, Debug)]
pub struct HostDecode<'a> {
    pub shape: crate::decode::DecodeShape,
    pub q_dtype: Dtype,
    pub q: DataRef<'a>,
    pub keys: HostKeys<'a>,
    pub sink: Option<&'a [f32]>,
}

/// Where a staged decode's output goes.
pub enum OutRef<'a, 'b> {
    /// Copied back into host memory; the call waits.
    Host(&'a mut DecodeOutput<'b>),
    /// Written at a device address (`[batch, s_q, h_q, d_v]` of `dtype`,
    /// and the lse `[batch, h_q, s_q]` f32 at `lse` unless 0) on the
    /// engine's stream; the call only enqueues.
    Device { ptr: u64, dtype: Dtype, lse: u64 },
}

/// Device buffers of one call, 256-byte aligned (the driver's alignment),
/// one after another from a base address.
#[derive(Debug, Default)]
pub struct Carve {
    bytes: usize,
}

impl Carve {
    /// Reserves `bytes` and returns their offset.
    pub fn take(&mut self, bytes: usize) -> usize {
        let at = self.bytes;
        self.bytes += bytes.div_ceil(256) * 256;
        at
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Host slices packed into one staging area, each piece 256-byte aligned.
#[derive(Default)]
struct Staging<'a> {
    pieces: Vec<(usize, &'a [u8])>,
    carve: Carve,
}

impl<'a> Staging<'a> {
    /// Reserves room for `data` (copied in) and returns its offset.
    fn put(&mut self, data: &'a [u8]) -> usize {
        let off = self.carve.take(data.len());
        self.pieces.push((off, data));
        off
    }

    /// Reserves `len` bytes the device writes.
    fn reserve(&mut self, len: usize) -> usize {
        self.carve.take(len)
    }
}

/// Pieces up to this size that lie next to each other in the staging area
/// go in one copy: each copy costs the driver microseconds, about what a
/// small decode's kernels take.
const COALESCE_BYTES: usize = 64 << 10;

/// The copies that put `pieces` (offset, bytes; in offset order) in place:
/// runs of small neighbouring pieces joined into one buffer (with the
/// alignment gaps zeroed), large ones as they are; empty ones skipped.
fn coalesce<'a>(pieces: &[(usize, &'a [u8])]) -> Vec<(usize, std::borrow::Cow<'a, [u8]>)> {
    use std::borrow::Cow;
    let mut out: Vec<(usize, Cow<'a, [u8]>)> = Vec::new();
    // The run being joined: its start and its bytes so far.
    let mut run: Option<(usize, Vec<u8>)> = None;
    for &(off, data) in pieces {
        if data.is_empty() {
            continue;
        }
        let small = data.len() <= COALESCE_BYTES;
        // Joins the run when it directly follows it (only alignment between).
        if let Some((start, buf)) = run.as_mut() {
            let end = *start + buf.len().div_ceil(256) * 256;
            if small && off == end {
                buf.resize(off - *start, 0);
                buf.extend_from_slice(data);
                continue;
            }
        }
        if let Some((start, buf)) = run.take() {
            out.push((start, Cow::Owned(buf)));
        }
        if small {
            run = Some((off, data.to_vec()));
        } else {
            out.push((off, Cow::Borrowed(data)));
        }
    }
    if let Some((start, buf)) = run {
        out.push((start, Cow::Owned(buf)));
    }
    out
}

/// Where a staged piece will be: an offset in the staging area, or a
/// device address already.
#[derive(Clone, Copy)]
enum At {
    Staged(usize),
    Device(u64),
}

impl At {
    fn addr(self, base: u64) -> u64 {
        match self {
            At::Staged(off) => base + off as u64,
            At::Device(p) => p,
        }
    }
}

fn stage_cache<'a>(sg: &mut Staging<'a>, c: DataRef<'a>) -> At {
    match c {
        DataRef::Host(d) => At::Staged(sg.put(d)),
        DataRef::Device(p) => At::Device(p),
    }
}

struct StagedIndexed {
    layout: crate::format::KvLayout,
    kv: At,
    num_blocks: usize,
    indices: At,
    topk: usize,
    topk_length: Option<usize>,
}

fn stage_indexed<'a>(sg: &mut Staging<'a>, ik: &HostIndexed<'a>) -> StagedIndexed {
    StagedIndexed {
        layout: ik.layout,
        kv: stage_cache(sg, ik.kv),
        num_blocks: ik.num_blocks,
        indices: match ik.indices {
            Indices::Host(i) => At::Staged(sg.put(as_bytes(i))),
            Indices::Device(p) => At::Device(p),
        },
        topk: ik.topk,
        topk_length: ik.topk_length.map(|l| sg.put(as_bytes(l))),
    }
}

impl CudaBackend {
    /// A decode whose queries, tables, output and (unless device-resident)
    /// caches are in host memory: stages them into engine memory, decodes,
    /// copies the results back.
    pub fn decode_host(&self, d: &HostDecode<'_>, out: &mut DecodeOutput<'_>) -> Result<()> {
        self.decode_staged(d, OutRef::Host(out))
    }

    /// A decode whose small inputs (tables, indices, sink) are host memory
    /// and whose queries, caches and output may be either: stages what is
    /// on the host, then decodes. Waits unless the output is device memory.
    pub fn decode_staged(&self, d: &HostDecode<'_>, mut out: OutRef<'_, '_>) -> Result<()> {
        // One host-memory call at a time owns the staging area, from the
        // copies in to the copies back.
        let _host_call = self.host_calls.lock();
        let mut sg = Staging::default();
        let q = stage_cache(&mut sg, d.q);
        let sink = d.sink.map(|s| sg.put(as_bytes(s)));
        enum Staged {
            Dense(At, usize, usize, usize),
            Sparse(StagedIndexed, Option<StagedIndexed>),
        }
        let (layout, num_blocks, staged) = match &d.keys {
            HostKeys::Dense {
                layout,
                kv,
                num_blocks,
                table,
                stride,
                seqlens,
            } => {
                let kv = stage_cache(&mut sg, *kv);
                let bt = sg.put(as_bytes(table));
                let sl = sg.put(as_bytes(seqlens));
                (*layout, *num_blocks, Staged::Dense(kv, bt, *stride, sl))
            }
            HostKeys::Sparse { main, extra } => {
                let m = stage_indexed(&mut sg, main);
                let x = extra.as_ref().map(|x| stage_indexed(&mut sg, x));
                (main.layout, main.num_blocks, Staged::Sparse(m, x))
            }
        };
        let (out_at, out_dtype, lse_off, lse_dev) = match &out {
            OutRef::Host(o) => (
                At::Staged(sg.reserve(o.out.len())),
                o.dtype,
                o.lse
                    .as_ref()
                    .map(|l| sg.reserve(std::mem::size_of_val(&**l))),
                0,
            ),
            OutRef::Device { ptr, dtype, lse } => (At::Device(*ptr), *dtype, None, *lse),
        };

        self.make_current()?;
        let base = {
            let mut st = self.state.lock();
            let base = self.ensure(&mut st, Which::Staging, sg.carve.bytes())?;
            for (off, data) in coalesce(&sg.pieces) {
                // SAFETY: the staging area holds `sg.carve.bytes()`. On our stream, so
                // the kernels (same stream) see the data; a copy from
                // pageable memory is staged before the call returns.
                unsafe { result::memcpy_htod_async(base + off as u64, &data[..], st.stream) }
                    .map_err(dev_err("cuMemcpyHtoDAsync"))?;
            }
            base
        };
        let at = |off: usize| base + off as u64;
        let (kv, keys_dev) = match staged {
            Staged::Dense(kv, bt, stride, sl) => (
                kv.addr(base),
                KeysDev::Dense(super::args::DenseDev {
                    block_table: at(bt),
                    stride,
                    seqlens: at(sl),
                }),
            ),
            Staged::Sparse(main, extra) => {
                let dev = |s: &StagedIndexed| super::args::IndexedDev {
                    layout: s.layout,
                    kv: s.kv.addr(base),
                    num_blocks: s.num_blocks,
                    indices: s.indices.addr(base),
                    topk: s.topk,
                    topk_length: s.topk_length.map_or(0, at),
                };
                (
                    main.kv.addr(base),
                    KeysDev::Sparse {
                        main: dev(&main),
                        extra: extra.as_ref().map(dev),
                    },
                )
            }
        };
        let args = DeviceDecode {
            shape: d.shape,
            q_dtype: d.q_dtype,
            out_dtype,
            layout,
            q: q.addr(base),
            kv,
            num_blocks,
            keys: keys_dev,
            sink: sink.map_or(0, at),
            out: out_at.addr(base),
            lse: lse_off.map_or(lse_dev, at),
            stream: 0,
        };
        let OutRef::Host(out) = &mut out else {
            // Device output: enqueued; the caller's later work on the
            // engine's stream is ordered after it.
            return self.decode_on(&args, false);
        };
        self.decode_device(&args)?;
        // SAFETY: the decode finished (stream 0 waits); sizes match the reservations.
        unsafe { result::memcpy_dtoh_sync(&mut *out.out, out_at.addr(base)) }
            .map_err(dev_err("cuMemcpyDtoH"))?;
        if let (Some(l), Some(off)) = (out.lse.as_deref_mut(), lse_off) {
            // SAFETY: as above.
            unsafe { result::memcpy_dtoh_sync(l, at(off)) }.map_err(dev_err("cuMemcpyDtoH"))?;
        }
        Ok(())
    }
}

pub(super) fn host_indexed<'a>(k: &crate::decode::IndexedKeys<'a>) -> HostIndexed<'a> {
    HostIndexed {
        layout: k.kv.layout,
        kv: DataRef::Host(k.kv.data),
        num_blocks: k.kv.num_blocks,
        indices: Indices::Host(k.indices),
        topk: k.topk,
        topk_length: k.topk_length,
    }
}

#[cfg(test)]
mod tests {
    use super::{coalesce, COALESCE_BYTES};

    /// The joined copies write every piece's bytes at its offset and
    /// nothing outside the pieces and the gaps between joined ones.
    #[test]
    fn small_neighbouring_pieces_share_one_copy() {
        let (a, b, c) = (vec![1u8; 10], vec![2u8; 300], vec![3u8; 4]);
        let big = vec![4u8; COALESCE_BYTES + 1];
        // a, b and c are neighbours (256-byte aligned); a reservation of
        // 512 bytes lies between c and d; big stands alone; e follows it.
        let pieces: Vec<(usize, &[u8])> = vec![
            (0, &a),
            (256, &b),
            (768, &[]),
            (768, &c),
            (1536, &c),
            (2048, &big),
            (2048 + (COALESCE_BYTES + 1).div_ceil(256) * 256, &a),
        ];
        let copies = coalesce(&pieces);
        let offs: Vec<usize> = copies.iter().map(|(o, _)| *o).collect();
        assert_eq!(offs, [0, 1536, 2048, pieces[6].0]);
        assert_eq!(copies[0].1.len(), 768 + 4);
        let mut mem = vec![0xeeu8; pieces[6].0 + 10];
        for (off, d) in &copies {
            mem[*off..*off + d.len()].copy_from_slice(d);
        }
        for &(off, d) in &pieces {
            assert_eq!(&mem[off..off + d.len()], d, "piece at {off}");
        }
        // The reservation between c and the next piece is not written.
        assert!(mem[772..1536].iter().all(|&v| v == 0xee));
    }

    #[test]
    fn carved_buffers_are_aligned_and_apart() {
        let mut cv = super::Carve::default();
        let at = [6, 0, 300, 4].map(|n| cv.take(n));
        assert_eq!(at, [0, 256, 256, 768]);
        assert_eq!(cv.bytes(), 1024);
    }
}
