//! The CPU backend: a persistent thread pool, a reusable workspace and the
//! split-KV driver around an ISA-specific [`kernel::AttentionKernel`].

pub mod affinity;
#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
pub mod isa;
pub mod kernel;
pub mod phases;
mod simd;

pub use affinity::Affinity;
pub use isa::{CpuFeatures, CpuIsa};

use super::{try_grow, Backend, BackendInfo, BackendKind, Buffer};
use crate::decode::desc::DecodeOutput;
use crate::decode::desc::MAX_HEAD_DIM;
use crate::decode::{Decode, Keys, SplitPlan};
use crate::error::{Error, Result};
use crate::format::{load_slice, store_slice, Dtype};
use kernel::{AttentionKernel, AttnTask, CallQueries, KeySource, ScalarKernel, Scratch, EXTRA_KEY};
use parking_lot::Mutex;
use rayon::prelude::*;
use std::cell::{Cell, RefCell};

/// Query rows (tokens × heads) a kernel attends at once. A prefill chunk
/// of 256 tokens × 128 heads packed whole is 75 MB of queries and 67 MB of
/// accumulators, re-read for every 64-key tile; a run of 256 rows has
/// about 0.6 MB of each, near the size of a core's L2.
const ROWS_PER_RUN: usize = 256;

/// Query rows per parallel piece of the merge of a sequence's splits.
const MERGE_ROWS: usize = 16;

thread_local! {
    /// Set on the engines' worker threads by the pool's start handler.
    static ON_ENGINE_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is one of a CPU engine's worker threads.
/// Such a thread must never block on a lock: the holder may be waiting for
/// it to finish its share of a parallel loop (see `KvPool`'s locking).
pub(crate) fn on_engine_worker() -> bool {
    ON_ENGINE_WORKER.with(Cell::get)
}

/// Kernel variants compiled into this build.
pub const BUILT_KERNELS: &[CpuIsa] = &[
    CpuIsa::Scalar,
    CpuIsa::Avx2,
    CpuIsa::Avx512,
    CpuIsa::Avx512Bf16,
    CpuIsa::Amx,
];

fn kernel_for(isa: CpuIsa, emulated_tiles: bool) -> Box<dyn AttentionKernel> {
    match isa {
        CpuIsa::Avx2 => Box::new(simd::Avx2Kernel),
        CpuIsa::Avx512 => Box::new(simd::Avx512Kernel),
        CpuIsa::Avx512Bf16 => Box::new(simd::Avx512Bf16Kernel),
        CpuIsa::Amx => Box::new(simd::AmxKernel {
            emulated: emulated_tiles,
        }),
        CpuIsa::Scalar => Box::new(ScalarKernel),
    }
}

/// Per-call buffers, kept in a small free list so steady-state calls do not
/// allocate and concurrent calls do not contend.
#[derive(Default)]
struct Workspace {
    plan: SplitPlan,
    /// Packed, pre-scaled queries `[batch, rows, d_qk]`.
    q: Vec<f32>,
    /// Normalized partial outputs `[items, rows, d_v]`.
    part_o: Vec<f32>,
    /// Their log-sum-exps `[items, rows]`.
    part_lse: Vec<f32>,
    /// Final lse in `[batch, s_q, h_q]` order before transposing to `[batch, h_q, s_q]`.
    lse: Vec<f32>,
    /// Sparse: every query token's valid keys, compacted (`EXTRA_KEY` marks the extra cache).
    keys: Vec<u32>,
    /// Sparse: `keys[key_first[g]..key_first[g + 1]]` belong to query group `g`.
    key_first: Vec<usize>,
    /// Keys per group (dense: sequence lengths).
    key_counts: Vec<usize>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

pub struct CpuBackend {
    info: BackendInfo,
    pool: rayon::ThreadPool,
    kernel: Box<dyn AttentionKernel>,
    workspaces: Mutex<Vec<Workspace>>,
}

impl CpuBackend {
    /// `threads == 0` means one per available core. `forced_isa` is the
    /// `MLART_CPU_ISA` value, if set; `affinity` says whether to pin the
    /// threads (see [`affinity`]).
    pub fn new(
        threads: usize,
        affinity: Affinity,
        forced_isa: Option<&str>,
        reason_prefix: &str,
    ) -> Result<Self> {
        let emulate_amx = std::env::var("MLART_AMX_EMULATE").is_ok_and(|v| v == "1");
        Self::with_isa(threads, affinity, forced_isa, emulate_amx, reason_prefix)
    }

    /// [`Self::new`] with `MLART_AMX_EMULATE` given: `emulate_amx` runs
    /// AMX in software where the CPU lacks it.
    fn with_isa(
        threads: usize,
        affinity: Affinity,
        forced_isa: Option<&str>,
        emulate_amx: bool,
        reason_prefix: &str,
    ) -> Result<Self> {
        let features = CpuFeatures::detect();
        let choice = isa::choose(&features, BUILT_KERNELS, forced_isa, emulate_amx)?;
        let (isa, why) = (choice.isa, &choice.reason);
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("mlart-cpu-{i}"))
            .start_handler(|_| ON_ENGINE_WORKER.with(|w| w.set(true)))
            .build()
            .map_err(|e| {
                Error::internal(format!("could not start {threads} worker threads: {e}"))
            })?;
        let placed = place_threads(&pool, affinity, threads);
        Ok(CpuBackend {
            info: BackendInfo {
                kind: BackendKind::Cpu,
                device_name: cpu_model_name(),
                cpu_isa: isa,
                device_index: 0,
                threads,
                cpu_features: features.describe(),
                thread_placement: placed,
                reason: format!("{reason_prefix}cpu kernel {}: {why}", isa.name()),
            },
            pool,
            kernel: kernel_for(isa, choice.emulated_tiles),
            workspaces: Mutex::new(Vec::new()),
        })
    }

    fn run(&self, d: &Decode<'_>, out: &mut DecodeOutput<'_>, ws: &mut Workspace) -> Result<()> {
        let s = &d.shape;
        // A group is what shares keys: a sequence (all its query tokens, with
        // the causal mask) for dense decode, one query token for sparse.
        let n_q = match d.keys {
            Keys::Dense(_) => s.s_q,
            Keys::Sparse(_) => 1,
        };
        let n_groups = s.batch * s.s_q / n_q;
        let rows = n_q * s.h_q;
        ws.key_counts.clear();
        ws.keys.clear();
        ws.key_first.clear();
        match &d.keys {
            Keys::Dense(dk) => ws
                .key_counts
                .extend(dk.seqlens[..s.batch].iter().map(|&l| l as usize)),
            Keys::Sparse(sk) => {
                // Compact each query's valid indices (main, then extra) once.
                for b in 0..s.batch {
                    for i in 0..s.s_q {
                        let first = ws.keys.len();
                        ws.key_first.push(first);
                        ws.keys.extend(
                            sk.main
                                .list(s.s_q, b, i)
                                .iter()
                                .filter(|&&p| p >= 0)
                                .map(|&p| p as u32),
                        );
                        if let Some(x) = &sk.extra {
                            ws.keys.extend(
                                x.list(s.s_q, b, i)
                                    .iter()
                                    .filter(|&&p| p >= 0)
                                    .map(|&p| p as u32 | EXTRA_KEY),
                            );
                        }
                        ws.key_counts.push(ws.keys.len() - first);
                    }
                }
                ws.key_first.push(ws.keys.len());
            }
        }
        // Groups of many query rows (prefill chunks) are attended in runs
        // of tokens, in parallel (below). When they have several runs each,
        // and the runs alone give every thread work, keys are not split:
        // no partial results to merge. Decode-sized groups keep the plan.
        let per_run = (ROWS_PER_RUN / s.h_q).max(1);
        let runs = n_groups * n_q.div_ceil(per_run);
        let plan_workers = if rows > ROWS_PER_RUN && runs >= self.info.threads {
            1
        } else {
            self.info.threads
        };
        ws.plan.build(&ws.key_counts, plan_workers);
        let n_items = ws.plan.items().len();
        try_grow(&mut ws.q, "packed queries", s.batch * s.rows() * s.d_qk)?;
        try_grow(&mut ws.part_o, "partial outputs", n_items * rows * s.d_v)?;
        try_grow(&mut ws.part_lse, "partial lse", n_items * rows)?;
        try_grow(&mut ws.lse, "lse", s.batch * s.rows())?;

        let Workspace {
            plan,
            q,
            part_o,
            part_lse,
            lse: lse_ws,
            keys,
            key_first,
            key_counts,
        } = ws;
        let (plan, keys, key_first, key_counts) =
            (&*plan, &keys[..], &key_first[..], &key_counts[..]);
        let kernel = &*self.kernel;
        let q_seq_bytes = s.rows() * s.d_qk * d.q_dtype.size();
        let out_group_bytes = rows * s.d_v * out.dtype.size();
        let out_dtype = out.dtype;
        let out_bytes = &mut out.out[..n_groups * out_group_bytes];

        let call = CallQueries {
            q_bf16: d.q_dtype == Dtype::Bf16,
            p_bf16: out.dtype == Dtype::Bf16,
            d_qk: s.d_qk,
            d_v: s.d_v,
            kv_format: match &d.keys {
                Keys::Dense(dk) => dk.kv.layout.format,
                Keys::Sparse(sk) => sk.main.kv.layout.format,
            },
        };
        let pack_q = kernel.reads_f32_queries(&call);

        self.pool.install(|| {
            // 1. Pack and pre-scale the queries once per call (if the
            // kernel reads them so).
            if pack_q {
                q[..s.batch * s.rows() * s.d_qk]
                    .par_chunks_mut(s.rows() * s.d_qk)
                    .enumerate()
                    .for_each(|(b, qb)| {
                        load_slice(d.q_dtype, &d.q[b * q_seq_bytes..(b + 1) * q_seq_bytes], qb);
                        qb.iter_mut().for_each(|x| *x *= s.softmax_scale);
                    });
            }
            let q = &q[..];

            // 2. Attend every work item into its partial slot.
            part_o[..n_items * rows * s.d_v]
                .par_chunks_mut(rows * s.d_v)
                .zip(part_lse[..n_items * rows].par_chunks_mut(rows))
                .zip(plan.items().par_iter())
                .for_each(|((o, l), item)| {
                    let g = item.seq as usize;
                    let (source, causal_seqlen) = match &d.keys {
                        Keys::Dense(dk) => {
                            let blocks = &dk.block_table[g * dk.block_table_stride..]
                                [..dk.block_table_stride];
                            (
                                KeySource::Paged { kv: &dk.kv, blocks },
                                s.causal.then_some(key_counts[g]),
                            )
                        }
                        Keys::Sparse(sk) => (
                            KeySource::List {
                                main: &sk.main.kv,
                                extra: sk.extra.as_ref().map(|x| &x.kv),
                                keys: &keys[key_first[g]..key_first[g + 1]],
                            },
                            None,
                        ),
                    };
                    // Many query tokens (a prefill chunk): attend a few at a
                    // time, so their packed rows stay in cache and, when
                    // causal, each run skips the keys none of its tokens sees.
                    let run = |ri: usize, o: &mut [f32], l: &mut [f32]| {
                        let i0 = ri * per_run;
                        let i1 = (i0 + per_run).min(n_q);
                        let (r0, r1) = (i0 * s.h_q, i1 * s.h_q);
                        // Token i0 + i sees keys < len - n_q + i0 + i + 1, which
                        // is the mask of i1 - i0 tokens over len - (n_q - i1).
                        let run_seqlen = causal_seqlen.map(|len| (len + i1).saturating_sub(n_q));
                        let end = (item.end as usize).min(run_seqlen.unwrap_or(usize::MAX));
                        let qr = (g * rows + r0) * s.d_qk..(g * rows + r1) * s.d_qk;
                        let task = AttnTask {
                            q: if pack_q { &q[qr.clone()] } else { &[] },
                            n_q: i1 - i0,
                            h_q: s.h_q,
                            d_qk: s.d_qk,
                            d_v: s.d_v,
                            source,
                            start: (item.start as usize).min(end),
                            end,
                            causal_seqlen: run_seqlen,
                            q_bf16: (d.q_dtype == Dtype::Bf16)
                                .then(|| &d.q[qr.start * 2..qr.end * 2]),
                            scale: s.softmax_scale,
                            p_bf16: out.dtype == Dtype::Bf16,
                            q_skip: d.q_zero_prefix,
                        };
                        SCRATCH.with(|cell| match cell.try_borrow_mut() {
                            Ok(mut scratch) => kernel.attend(&task, &mut scratch, o, l),
                            Err(_) => kernel.attend(&task, &mut Scratch::default(), o, l),
                        });
                    };
                    if n_q <= per_run {
                        run(0, o, l);
                    } else {
                        o.par_chunks_mut(per_run * s.h_q * s.d_v)
                            .zip(l.par_chunks_mut(per_run * s.h_q))
                            .enumerate()
                            .for_each(|(ri, (o, l))| run(ri, o, l));
                    }
                });

            // 3. Merge the splits of each group by lse, apply the sink, store:
            // in runs of rows, so that one long sequence's merge is shared
            // by the threads too.
            let ob_row = out_dtype.size() * s.d_v;
            out_bytes
                .par_chunks_mut(out_group_bytes)
                .zip(lse_ws[..n_groups * rows].par_chunks_mut(rows))
                .enumerate()
                .for_each(|(g, (ob, lb))| {
                    let first = plan.first_item(g);
                    let n = plan.items_of(g).len();
                    let slot =
                        |k: usize, r: usize| &part_o[((first + k) * rows + r) * s.d_v..][..s.d_v];
                    let slot_lse = |k: usize, r: usize| part_lse[(first + k) * rows + r];
                    ob.par_chunks_mut(MERGE_ROWS * ob_row)
                        .zip(lb.par_chunks_mut(MERGE_ROWS))
                        .enumerate()
                        .for_each(|(c, (ob, lb))| {
                            let mut acc = [0f32; MAX_HEAD_DIM];
                            let acc = &mut acc[..s.d_v];
                            for (i, l) in lb.iter_mut().enumerate() {
                                let r = c * MERGE_ROWS + i;
                                let m = (0..n)
                                    .map(|k| slot_lse(k, r))
                                    .fold(f32::NEG_INFINITY, f32::max);
                                acc.fill(0.0);
                                if m == f32::NEG_INFINITY {
                                    *l = m;
                                } else {
                                    let mut total = 0.0f32;
                                    for k in 0..n {
                                        let w = (slot_lse(k, r) - m).exp();
                                        total += w;
                                        if w > 0.0 {
                                            acc.iter_mut()
                                                .zip(slot(k, r))
                                                .for_each(|(a, &p)| *a += w * p);
                                        }
                                    }
                                    let lse = m + total.ln();
                                    let mut scale = 1.0 / total;
                                    if let Some(sink) = d.attn_sink {
                                        scale /= 1.0 + (sink[r % s.h_q] - lse).exp();
                                    }
                                    acc.iter_mut().for_each(|a| *a *= scale);
                                    *l = lse;
                                }
                                store_slice(out_dtype, acc, &mut ob[i * ob_row..(i + 1) * ob_row]);
                            }
                        });
                });
        });

        // lse: [batch, s_q, h_q] order internally -> [batch, h_q, s_q]; a row
        // that saw no key reports +inf, as FlashMLA does.
        if let Some(lse) = out.lse.as_deref_mut() {
            let rows = s.rows();
            for b in 0..s.batch {
                for i in 0..s.s_q {
                    for h in 0..s.h_q {
                        let v = ws.lse[b * rows + i * s.h_q + h];
                        lse[(b * s.h_q + h) * s.s_q + i] = if v == f32::NEG_INFINITY {
                            f32::INFINITY
                        } else {
                            v
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn decode(&self, d: &Decode<'_>, out: &mut DecodeOutput<'_>) -> Result<()> {
        let mut ws = self.workspaces.lock().pop().unwrap_or_default();
        let result = self.run(d, out, &mut ws);
        self.workspaces.lock().push(ws);
        result
    }

    fn install(&self, f: &mut (dyn FnMut() + Send)) {
        self.pool.install(f)
    }

    fn alloc(&self, what: &str, bytes: usize) -> Result<Buffer> {
        Buffer::host_zeroed(what, bytes)
    }
}

/// Pins the pool's threads as [`affinity::place`] decides; says what was
/// done. If any thread cannot be pinned, all are left unpinned.
fn place_threads(pool: &rayon::ThreadPool, request: Affinity, threads: usize) -> String {
    let mask = affinity::process_mask();
    let plan = affinity::place(request, threads, mask.as_deref());
    let Some(cpus) = &plan.cpus else {
        return plan.why;
    };
    let results = pool.broadcast(|ctx| affinity::set_thread_cpus(&cpus[ctx.index()..][..1]));
    match results.iter().position(|r| r.is_err()) {
        None => plan.why,
        Some(i) => {
            let all = mask.unwrap_or_default();
            pool.broadcast(|_| affinity::set_thread_cpus(&all).ok());
            format!(
                "not pinned (pinning thread {i} to CPU {} failed: {})",
                cpus[i],
                results[i].as_ref().err().map_or("", |e| e.as_str())
            )
        }
    }
}

/// The CPU's marketing name, from /proc/cpuinfo where available.
fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each worker's own affinity mask, read on that worker.
    fn worker_masks(b: &CpuBackend) -> Vec<Option<Vec<usize>>> {
        b.pool.broadcast(|_| affinity::process_mask())
    }

    #[cfg(all(target_os = "linux", not(miri)))]
    #[test]
    fn workers_run_where_the_placement_says() {
        let mask = affinity::process_mask().expect("Linux reports the mask");
        let pinned = CpuBackend::new(3, Affinity::Pin, Some("scalar"), "").unwrap();
        let mut got: Vec<usize> = worker_masks(&pinned)
            .into_iter()
            .map(|m| match m.as_deref() {
                Some([cpu]) => *cpu,
                other => panic!("a pinned worker has mask {other:?}"),
            })
            .collect();
        got.sort_unstable();
        let mut want: Vec<usize> = (0..3).map(|i| mask[i % mask.len()]).collect();
        want.sort_unstable();
        assert_eq!(got, want);
        assert!(pinned.info.thread_placement.starts_with("pinned to CPUs"));

        let free = CpuBackend::new(2, Affinity::None, Some("scalar"), "").unwrap();
        assert!(worker_masks(&free)
            .iter()
            .all(|m| m.as_ref() == Some(&mask)));
        assert_eq!(free.info.thread_placement, "not pinned (affinity NONE)");
    }
}

#[cfg(test)]
mod zero_query_prefix {
    use super::*;
    use crate::decode::{DecodeShape, KvCache};
    use crate::format::{KvFormat, KvLayout};
    use crate::model::gen::uniform;

    /// A declared zero query prefix (the expanded prefill's queries
    /// `[0 | q_nope | q_pe]`) is left out of `Q·Kᵀ` by every variant with
    /// the full product's results, bit for bit: causal and varlen, a
    /// prefix of whole AMX tile steps, BF16 and F32. The declaration is
    /// checked, not trusted.
    #[test]
    fn a_zero_query_prefix_gives_the_full_products() {
        let (batch, s_q, h_q, d_qk, d_v, bs) = (2usize, 5usize, 3usize, 96usize, 64usize, 16);
        let (skip, per_seq) = (64usize, 5usize);
        let seqlens = [70i32, 5];
        let table: Vec<i32> = (0..(batch * per_seq) as i32).rev().collect();
        let shape = DecodeShape::new(
            batch as i32,
            s_q as i32,
            h_q as i32,
            d_qk as i32,
            d_v as i32,
            0.125,
            true,
        )
        .unwrap();
        for isa in ["scalar", "avx2", "avx512", "avx512bf16", "amx"] {
            let backend = match CpuBackend::with_isa(2, Affinity::None, Some(isa), true, "") {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("zero query prefix: {isa} skipped on this CPU: {e}");
                    continue;
                }
            };
            for (format, dt) in [(KvFormat::Bf16, Dtype::Bf16), (KvFormat::F32, Dtype::F32)] {
                let layout = KvLayout::new(format, d_qk, bs, "cache").unwrap();
                let blocks = batch * per_seq;
                let mut cache = vec![0u8; layout.cache_bytes(blocks).unwrap()];
                // Large values in the keys' prefix (V): any of them in a
                // score would show.
                let keys = uniform(blocks * bs * d_qk, 3);
                for (r, row) in keys.chunks_exact(d_qk).enumerate() {
                    let mut row = row.to_vec();
                    row[..skip].iter_mut().for_each(|x| *x *= 50.0);
                    layout.store_row(&mut cache, r / bs, r % bs, &row);
                }
                let kv = KvCache::new(layout, &cache, blocks).unwrap();
                let mut qf = uniform(batch * s_q * h_q * d_qk, 4);
                for row in qf.chunks_exact_mut(d_qk) {
                    row[..skip].fill(0.0);
                }
                let mut q = vec![0u8; qf.len() * dt.size()];
                store_slice(dt, &qf, &mut q);
                let run = |prefix: usize| {
                    let mut d =
                        Decode::dense(shape, dt, &q, kv, &table, per_seq, &seqlens).unwrap();
                    if prefix > 0 {
                        d = d.with_zero_query_prefix(prefix).unwrap();
                    }
                    let mut o = vec![0u8; shape.out_elems() * dt.size()];
                    let mut lse = vec![0f32; batch * h_q * s_q];
                    let mut out = DecodeOutput::new(&shape, dt, &mut o, Some(&mut lse)).unwrap();
                    backend.decode(&d, &mut out).unwrap();
                    (o, lse)
                };
                let full = run(0);
                let skipped = run(skip);
                assert!(full.1.iter().all(|l| l.is_finite()));
                assert_eq!(full.0, skipped.0, "{isa} {format:?}: outputs differ");
                assert_eq!(full.1, skipped.1, "{isa} {format:?}: lse differs");
            }
        }

        // The declaration is checked: a nonzero value, an odd or too long
        // prefix are refused.
        let layout = KvLayout::new(KvFormat::F32, d_qk, bs, "cache").unwrap();
        let cache = vec![0u8; layout.cache_bytes(batch * per_seq).unwrap()];
        let kv = KvCache::new(layout, &cache, batch * per_seq).unwrap();
        let mut qf = vec![0f32; batch * s_q * h_q * d_qk];
        qf[(2 * h_q + 1) * d_qk + skip - 1] = 1e-30;
        let mut q = vec![0u8; qf.len() * 4];
        store_slice(Dtype::F32, &qf, &mut q);
        let d = Decode::dense(shape, Dtype::F32, &q, kv, &table, per_seq, &seqlens).unwrap();
        let e = d.with_zero_query_prefix(skip).unwrap_err().to_string();
        assert!(e.contains("query row 7"), "{e}");
        assert!(d.with_zero_query_prefix(skip - 2).is_ok());
        assert!(d.with_zero_query_prefix(3).is_err());
        assert!(d.with_zero_query_prefix(d_qk + 2).is_err());
    }
}
