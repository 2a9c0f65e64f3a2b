//! The CPU backend: a persistent thread pool, a reusable workspace and the
//! split-KV driver around an ISA-specific [`kernel::AttentionKernel`].

pub mod isa;
pub mod kernel;

pub use isa::{CpuFeatures, CpuIsa};

use super::{try_grow, Backend, BackendInfo, BackendKind, Buffer};
use crate::decode::desc::DecodeOutput;
use crate::decode::{DenseDecode, SplitPlan};
use crate::error::{Error, Result};
use crate::format::{load_slice, store_slice};
use kernel::{AttentionKernel, ScalarKernel, Scratch, SeqTask};
use parking_lot::Mutex;
use rayon::prelude::*;
use std::cell::RefCell;

/// Kernel variants compiled into this build.
pub const BUILT_KERNELS: &[CpuIsa] = &[CpuIsa::Scalar];

fn kernel_for(isa: CpuIsa) -> Box<dyn AttentionKernel> {
    match isa {
        CpuIsa::Scalar | CpuIsa::Avx2 | CpuIsa::Avx512 | CpuIsa::Amx => Box::new(ScalarKernel),
    }
}

/// Per-call buffers, kept in a small free list so steady-state calls do not
/// allocate and concurrent calls do not contend.
#[derive(Default)]
struct Workspace {
    plan: SplitPlan,
    seqlens: Vec<usize>,
    /// Packed, pre-scaled queries `[batch, rows, d_qk]`.
    q: Vec<f32>,
    /// Normalized partial outputs `[items, rows, d_v]`.
    part_o: Vec<f32>,
    /// Their log-sum-exps `[items, rows]`.
    part_lse: Vec<f32>,
    /// Final lse in `[batch, rows]` order before transposing to `[batch, h_q, s_q]`.
    lse: Vec<f32>,
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
    /// `MLART_CPU_ISA` value, if set.
    pub fn new(threads: usize, forced_isa: Option<&str>, reason_prefix: &str) -> Result<Self> {
        let features = CpuFeatures::detect();
        let (isa, why) = isa::choose(&features, BUILT_KERNELS, forced_isa)?;
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
            .build()
            .map_err(|e| {
                Error::internal(format!("could not start {threads} worker threads: {e}"))
            })?;
        Ok(CpuBackend {
            info: BackendInfo {
                kind: BackendKind::Cpu,
                device_name: cpu_model_name(),
                cpu_isa: isa,
                threads,
                cpu_features: features.describe(),
                reason: format!("{reason_prefix}cpu kernel {}: {why}", isa.name()),
            },
            pool,
            kernel: kernel_for(isa),
            workspaces: Mutex::new(Vec::new()),
        })
    }

    fn run(
        &self,
        d: &DenseDecode<'_>,
        out: &mut DecodeOutput<'_>,
        ws: &mut Workspace,
    ) -> Result<()> {
        let s = &d.shape;
        let rows = s.rows();
        ws.seqlens.clear();
        ws.seqlens.extend((0..s.batch).map(|b| d.seqlen(b)));
        ws.plan.build(&ws.seqlens, self.info.threads);
        let n_items = ws.plan.items().len();
        try_grow(&mut ws.q, "packed queries", s.batch * rows * s.d_qk)?;
        try_grow(&mut ws.part_o, "partial outputs", n_items * rows * s.d_v)?;
        try_grow(&mut ws.part_lse, "partial lse", n_items * rows)?;
        try_grow(&mut ws.lse, "lse", s.batch * rows)?;

        let Workspace {
            plan,
            q,
            part_o,
            part_lse,
            lse: lse_ws,
            ..
        } = ws;
        let plan = &*plan;
        let kernel = &*self.kernel;
        let q_row_bytes = rows * s.d_qk * d.q_dtype.size();
        let out_row_bytes = rows * s.d_v * out.dtype.size();
        let out_dtype = out.dtype;
        let out_bytes = &mut out.out[..s.batch * out_row_bytes];

        self.pool.install(|| {
            // 1. Pack and pre-scale the queries once per call.
            q[..s.batch * rows * s.d_qk]
                .par_chunks_mut(rows * s.d_qk)
                .enumerate()
                .for_each(|(b, qb)| {
                    load_slice(d.q_dtype, &d.q[b * q_row_bytes..(b + 1) * q_row_bytes], qb);
                    qb.iter_mut().for_each(|x| *x *= s.softmax_scale);
                });
            let q = &q[..];

            // 2. Attend every work item into its partial slot.
            part_o[..n_items * rows * s.d_v]
                .par_chunks_mut(rows * s.d_v)
                .zip(part_lse[..n_items * rows].par_chunks_mut(rows))
                .zip(plan.items().par_iter())
                .for_each(|((o, l), item)| {
                    let b = item.seq as usize;
                    let task = SeqTask {
                        decode: d,
                        seq: b,
                        q: &q[b * rows * s.d_qk..(b + 1) * rows * s.d_qk],
                        start: item.start as usize,
                        end: item.end as usize,
                    };
                    SCRATCH.with(|cell| match cell.try_borrow_mut() {
                        Ok(mut scratch) => kernel.attend(&task, &mut scratch, o, l),
                        Err(_) => kernel.attend(&task, &mut Scratch::default(), o, l),
                    });
                });

            // 3. Merge the splits of each sequence by lse and store.
            out_bytes
                .par_chunks_mut(out_row_bytes)
                .zip(lse_ws[..s.batch * rows].par_chunks_mut(rows))
                .enumerate()
                .for_each(|(b, (ob, lb))| {
                    let first = plan.first_item(b);
                    let n = plan.items_of(b).len();
                    let slot = |k: usize| {
                        &part_o[(first + k) * rows * s.d_v..(first + k + 1) * rows * s.d_v]
                    };
                    let slot_lse = |k: usize| &part_lse[(first + k) * rows..(first + k + 1) * rows];
                    if n == 1 {
                        store_slice(out_dtype, slot(0), ob);
                        lb.copy_from_slice(slot_lse(0));
                        return;
                    }
                    SCRATCH.with(|cell| {
                        let mut local = Scratch::default();
                        let mut guard = cell.try_borrow_mut();
                        let scratch = match guard.as_mut() {
                            Ok(sc) => &mut **sc,
                            Err(_) => &mut local,
                        };
                        if scratch.k_tile.len() < s.d_v {
                            scratch.k_tile.resize(s.d_v, 0.0);
                        }
                        let acc = &mut scratch.k_tile[..s.d_v];
                        for r in 0..rows {
                            let m = (0..n)
                                .map(|k| slot_lse(k)[r])
                                .fold(f32::NEG_INFINITY, f32::max);
                            acc.fill(0.0);
                            if m == f32::NEG_INFINITY {
                                lb[r] = m;
                            } else {
                                let mut total = 0.0f32;
                                for k in 0..n {
                                    let w = (slot_lse(k)[r] - m).exp();
                                    total += w;
                                    if w > 0.0 {
                                        let part = &slot(k)[r * s.d_v..(r + 1) * s.d_v];
                                        acc.iter_mut().zip(part).for_each(|(a, &p)| *a += w * p);
                                    }
                                }
                                let inv = 1.0 / total;
                                acc.iter_mut().for_each(|a| *a *= inv);
                                lb[r] = m + total.ln();
                            }
                            let ob_row = out_dtype.size() * s.d_v;
                            store_slice(out_dtype, acc, &mut ob[r * ob_row..(r + 1) * ob_row]);
                        }
                    });
                });
        });

        // lse: [batch, s_q, h_q] order internally -> [batch, h_q, s_q]; a row
        // that saw no key reports +inf, as FlashMLA does.
        if let Some(lse) = out.lse.as_deref_mut() {
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

    fn decode(&self, d: &DenseDecode<'_>, out: &mut DecodeOutput<'_>) -> Result<()> {
        let mut ws = self.workspaces.lock().pop().unwrap_or_default();
        let result = self.run(d, out, &mut ws);
        self.workspaces.lock().push(ws);
        result
    }

    fn alloc(&self, what: &str, bytes: usize) -> Result<Buffer> {
        Buffer::host_zeroed(what, bytes)
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
