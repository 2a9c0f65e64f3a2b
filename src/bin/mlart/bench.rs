//! `mlart bench`: decode throughput on the DeepSeek-V3 shape, each figure
//! stated against the ceiling that binds it and against the scalar reference
//! kernel, both measured in the same run.

use super::ceilings::{self, Ceilings, QkUnit};
use mlart::backend::cpu::phases::{self, Phase, Profile};
use mlart::backend::cpu::CpuIsa;
use mlart::decode::desc::DecodeOutput;
use mlart::decode::{Decode, DecodeShape, IndexedKeys, KvCache};
use mlart::format::{store_slice, Dtype, KvFormat, KvLayout};
use mlart::{Engine, EngineOptions, Result};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// One benchmark point.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub batch: usize,
    pub seqlen: usize,
    pub h_q: usize,
    pub s_q: usize,
    pub format: KvFormat,
    /// Sparse: keys per query token, random positions of the sequence drawn
    /// with replacement (so duplicates occur, and topk may exceed seqlen).
    pub topk: Option<usize>,
}

pub struct Options {
    pub threads: usize,
    /// Four small points.
    pub quick: bool,
    /// The full grid (see [`grid_points`]).
    pub grid: bool,
    /// Explicit points (`--points`); overrides the built-in lists.
    pub points: Option<Vec<Point>>,
    pub json: Option<String>,
    /// Time budget per point and kernel; `None`: 1.0 s, 0.3 s with `--grid`.
    pub seconds: Option<f64>,
    /// Also time the reference kernel on every point.
    pub scalar: bool,
    /// The reference kernel's ISA (`--reference`, default scalar).
    pub reference: String,
    /// Back the caches with transparent huge pages (`--huge-pages`), as a
    /// caller of `mlart_decode_paged` can; pools do it themselves.
    pub huge_pages: bool,
}

const D_QK: usize = 576;
const D_V: usize = 512;
const BLOCK: usize = 64;
/// Repetitions per point and kernel: at least / at most (median reported).
const MIN_REPS: usize = 3;
const MAX_REPS: usize = 50;

fn default_points(quick: bool) -> Vec<Point> {
    let p = |batch, seqlen, h_q, format, topk| Point {
        batch,
        seqlen,
        h_q,
        s_q: 1,
        format,
        topk,
    };
    use KvFormat::{Bf16, Fp8V32};
    if quick {
        vec![
            p(1, 1024, 128, Bf16, None),
            p(2, 1024, 16, Bf16, None),
            p(1, 1024, 128, Fp8V32, None),
            p(1, 4096, 128, Fp8V32, Some(512)),
        ]
    } else {
        vec![
            p(1, 1024, 128, Bf16, None),
            p(1, 4096, 128, Bf16, None),
            p(8, 4096, 128, Bf16, None),
            p(1, 16384, 128, Bf16, None),
            p(8, 16384, 16, Bf16, None),
            p(1, 4096, 128, Fp8V32, None),
            p(8, 16384, 16, Fp8V32, None),
            p(1, 16384, 128, Bf16, Some(2048)),
            p(1, 16384, 128, Fp8V32, Some(2048)),
            p(8, 16384, 128, Fp8V32, Some(2048)),
        ]
    }
}

/// The full grid: h_q {16, 64, 128} x s_q {1, 2} x N {1024, 4096, 16384} x
/// batch {1, 8} x {bf16, fp8_v32} x {dense, sparse topk 2048} = 144 points.
/// Ordered so that points sharing a cache (format, N, batch) are adjacent.
/// Sparse at N = 1024 reads 2048 positions of 1024 tokens: duplicates are
/// allowed by the semantics and each counts as a row read.
pub fn grid_points() -> Vec<Point> {
    let mut v = Vec::new();
    for format in [KvFormat::Bf16, KvFormat::Fp8V32] {
        for seqlen in [1024, 4096, 16384] {
            for batch in [1, 8] {
                for h_q in [16, 64, 128] {
                    for s_q in [1, 2] {
                        for topk in [None, Some(2048)] {
                            v.push(Point {
                                batch,
                                seqlen,
                                h_q,
                                s_q,
                                format,
                                topk,
                            });
                        }
                    }
                }
            }
        }
    }
    v
}

/// Parses `h_q:s_q:N:batch:format:topk,...` (topk: a number, or `dense`).
pub fn parse_points(s: &str) -> std::result::Result<Vec<Point>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let f: Vec<&str> = p.trim().split(':').collect();
            let bad = |why: &str| format!("--points {p}: {why} (want h_q:s_q:N:batch:format:topk)");
            if f.len() != 6 {
                return Err(bad("six fields separated by ':'"));
            }
            let num = |i: usize, name: &str| -> std::result::Result<usize, String> {
                f[i].parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(&format!("{name} = {} is not a positive number", f[i])))
            };
            let format = [
                KvFormat::Bf16,
                KvFormat::F16,
                KvFormat::F32,
                KvFormat::Fp8V32,
                KvFormat::Fp8Model1,
            ]
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(f[4]))
            .ok_or_else(|| {
                bad(&format!(
                    "format {} is not one of bf16, f16, f32, fp8_v32, fp8_model1",
                    f[4]
                ))
            })?;
            let topk = match f[5] {
                "dense" | "-" | "none" => None,
                _ => Some(num(5, "topk")?),
            };
            Ok(Point {
                h_q: num(0, "h_q")?,
                s_q: num(1, "s_q")?,
                seqlen: num(2, "N")?,
                batch: num(3, "batch")?,
                format,
                topk,
            })
        })
        .collect()
}

/// xorshift64; quality is irrelevant here.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let x = &mut self.0;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Uniform in [-0.1, 0.1).
    fn noise(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
    }
}

/// A filled KV cache, reused by adjacent points of the same (format, N, batch).
struct KvData {
    key: (KvFormat, usize, usize),
    layout: KvLayout,
    num_blocks: usize,
    bytes: Vec<u8>,
}

fn build_kv(pt: &Point, huge_pages: bool) -> Result<KvData> {
    let blocks_per_seq = pt.seqlen.div_ceil(BLOCK);
    let num_blocks = blocks_per_seq * pt.batch;
    let layout = KvLayout::new(pt.format, D_QK, BLOCK, "kv_format")?;
    let mut bytes =
        mlart::backend::zeroed_bytes("kv cache", layout.cache_bytes(num_blocks)?, huge_pages)?;
    let mut rng = Rng(7);
    let mut row = vec![0f32; D_QK];
    for t in 0..num_blocks * BLOCK {
        row.iter_mut().for_each(|x| *x = rng.noise());
        layout.store_row(&mut bytes, t / BLOCK, t % BLOCK, &row);
    }
    Ok(KvData {
        key: (pt.format, pt.seqlen, pt.batch),
        layout,
        num_blocks,
        bytes,
    })
}

struct Measured {
    point: Point,
    flops: f64,
    bytes: f64,
    /// Seconds per call of the kernel under test.
    time: Timing,
    /// Median seconds per call of the scalar reference, if timed.
    scalar_seconds: Option<f64>,
    /// Each call's FLOP rate over the compute peak read just before it
    /// ([`ceilings::probe`]): the median of those ratios, and of the
    /// readings (FLOP/s). `None` where the kernel's unit has no probe.
    paired: Paired,
    /// The kernel's phases (the amx kernel only).
    phases: Option<Phases>,
}

impl Measured {
    fn gflops(&self) -> f64 {
        self.flops / self.time.median / 1e9
    }
    fn gbytes(&self) -> f64 {
        self.bytes / self.time.median / 1e9
    }
    /// Arithmetic intensity, FLOP per cache byte.
    fn intensity(&self) -> f64 {
        self.flops / self.bytes
    }
    fn scalar_gflops(&self) -> Option<f64> {
        self.scalar_seconds.map(|s| self.flops / s / 1e9)
    }
    fn speedup(&self) -> Option<f64> {
        self.scalar_seconds.map(|s| s / self.time.median)
    }
    /// p90 over p10 of the call times, minus one: 0.05 = the slowest tenth
    /// of the calls took 5% longer than the fastest tenth.
    fn spread(&self) -> f64 {
        self.time.p90 / self.time.p10 - 1.0
    }
    /// The ceiling that binds this point, and the fraction of it reached.
    fn bound(&self, ceil: &Ceilings) -> (&'static str, f64) {
        if ceil.compute_flops > 0.0 && self.intensity() > ceil.compute_flops / ceil.read_bw {
            (
                ceil.compute_name,
                self.flops / self.time.median / ceil.compute_flops,
            )
        } else {
            ("dram read", self.bytes / self.time.median / ceil.read_bw)
        }
    }
}

/// [`Phases`] in figures a reader can hold against the ceilings: per 256
/// keys of one kernel call (one thread), and the two GEMMs' rates.
struct PhaseFigures {
    /// Query rows per kernel call, on average (the GEMMs' M).
    rows: f64,
    /// The compute peak the figures are against (FLOP/s, all threads).
    peak: f64,
    /// µs per 256 keys, per [`Phase`] (in `Phase::ALL`'s order).
    us: [f64; 6],
    /// µs per 256 keys of the FLOPs at one thread's share of the compute
    /// peak, and of the cache bytes at its share of the DRAM read rate.
    at_peak_us: f64,
    dram_us: f64,
    /// Kernel time summed over the threads over wall time × threads: the
    /// rest is the split merge, scheduling and threads waiting.
    busy: f64,
    /// `Sᵀ = K·Qᵀ` and `O += P·V` (their phases alone) against one thread's
    /// share of the compute peak.
    scores_of_peak: f64,
    pv_of_peak: f64,
}

impl PhaseFigures {
    fn of(m: &Measured, ceil: &Ceilings, threads: usize) -> Option<Self> {
        let ph = m.phases.as_ref()?;
        let p = &ph.profile;
        if p.keys == 0 || p.ticks_per_second <= 0.0 {
            return None;
        }
        let t = threads as f64;
        let rows = p.row_keys as f64 / p.keys as f64;
        let per256 = |secs: f64| secs / p.keys as f64 * 256.0 * 1e6;
        let all = if ph.peak > 0.0 {
            ph.peak
        } else {
            ceil.compute_flops
        };
        let peak = all / t;
        let keys_per_call = p.keys as f64 / ph.calls as f64;
        let rate = |flops: f64, phase: Phase| flops / p.seconds(phase).max(1e-12) / peak;
        let row_keys = p.row_keys as f64;
        Some(PhaseFigures {
            rows,
            peak: all,
            us: Phase::ALL.map(|ph| per256(p.seconds(ph))),
            at_peak_us: 2.0 * rows * 256.0 * (D_QK + D_V) as f64 / peak * 1e6,
            dram_us: m.bytes / keys_per_call * 256.0 / (ceil.read_bw / t) * 1e6,
            busy: p.total_seconds() / (ph.wall * t),
            scores_of_peak: rate(2.0 * row_keys * D_QK as f64, Phase::Scores),
            pv_of_peak: rate(2.0 * row_keys * D_V as f64, Phase::Pv),
        })
    }
}

/// The phase table: where the kernel's time goes, point by point.
fn print_phases(kernel: &str, results: &[Measured], ceil: &Ceilings, threads: usize) {
    let figs: Vec<(&Measured, PhaseFigures)> = results
        .iter()
        .filter_map(|m| PhaseFigures::of(m, ceil, threads).map(|f| (m, f)))
        .collect();
    if figs.is_empty() {
        return;
    }
    println!(
        "where the {kernel} kernel's time goes (a separate, untimed pass per point after its timed calls):\n\
         - the time-stamp counter read between the phases of each key tile, summed over the threads;\n\
         - µs per 256 keys of one kernel call (its `rows` query rows, one thread);\n\
         - `peak`: the {0} peak read just before the pass (GFLOP/s, all threads); `at peak`: the keys' \
         FLOPs at one thread's share of it; `% pk`: the phase's GEMM FLOPs against that share;\n\
         - `DRAM`: the keys' bytes at one thread's share of the DRAM read rate used above;\n\
         - `busy`: kernel time over wall time x threads (the rest: merging splits, scheduling, waiting).",
        ceil.compute_name,
    );
    print!("{POINT_HEADER} {:>5}", "rows");
    for ph in Phase::ALL {
        print!(" {:>8}", ph.name());
    }
    println!(
        " {:>8} {:>7} {:>8} {:>8} {:>6} {:>10} {:>7}",
        "total", "peak", "at peak", "DRAM", "busy", "scores %pk", "P·V %pk"
    );
    for (m, f) in &figs {
        print!("{} {:>5.0}", point_columns(&m.point), f.rows);
        for us in f.us {
            print!(" {us:>8.2}");
        }
        println!(
            " {:>8.2} {:>7.0} {:>8.2} {:>8.2} {:>5.1}% {:>9.1}% {:>6.1}%",
            f.us.iter().sum::<f64>(),
            f.peak / 1e9,
            f.at_peak_us,
            f.dram_us,
            f.busy * 100.0,
            f.scores_of_peak * 100.0,
            f.pv_of_peak * 100.0
        );
    }
}

/// The median of `v` (not empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The median, 10th and 90th percentile of `v` (not empty).
fn quantiles(mut v: Vec<f64>) -> Timing {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
    Timing {
        median: v[v.len() / 2],
        p10: at(0.1),
        p90: at(0.9),
    }
}

/// Seconds per call of one engine at one point: the median, and the 10th
/// and 90th percentiles (how much this VM's runs spread).
struct Timing {
    median: f64,
    p10: f64,
    p90: f64,
}

/// The median ratio of a call's FLOP rate to the peak read before it, and
/// the median reading (see [`Measured::paired`]).
type Paired = Option<(f64, f64)>;

/// What [`run_point`] measured: the point's FLOPs and bytes, each engine's
/// timing, the first engine's paired rating and phases.
struct PointRun {
    flops: f64,
    bytes: f64,
    times: Vec<Timing>,
    paired: Paired,
    phases: Option<Phases>,
}

/// The phase count of a separate, untimed pass over a point: what the
/// kernel summed, the pass's wall seconds and its calls, and the compute
/// peak read just before it (FLOP/s; 0 without a probe).
struct Phases {
    profile: Profile,
    peak: f64,
    wall: f64,
    calls: usize,
}

/// Times `engines` on `pt` (the kernel under test first), interleaving
/// their calls so that all see the same machine noise: FLOPs, bytes, each
/// engine's timing, and for the first the paired rating (see [`Measured::paired`]):
/// `probe` reads its compute peak before each of its timed calls (and an
/// untimed call follows each reading). With `count_phases`, a separate
/// pass after the timed ones counts the first engine's kernel phases
/// ([`phases`]; a quarter of the budget, 3..50 calls).
fn run_point(
    engines: &[&Engine],
    pt: Point,
    kv: &KvData,
    budget: f64,
    probe: &dyn Fn() -> f64,
    count_phases: bool,
) -> Result<PointRun> {
    let shape = DecodeShape::new(
        pt.batch as i32,
        pt.s_q as i32,
        pt.h_q as i32,
        D_QK as i32,
        D_V as i32,
        0.0,
        false,
    )?;
    let blocks_per_seq = pt.seqlen.div_ceil(BLOCK);
    let dtype = Dtype::Bf16;
    let mut q = vec![0u8; shape.q_elems() * dtype.size()];
    let mut rng = Rng(11);
    let qf: Vec<f32> = (0..shape.q_elems()).map(|_| rng.noise()).collect();
    store_slice(dtype, &qf, &mut q);
    // Interleave the sequences' blocks so reads are not one linear stream.
    let table: Vec<i32> = (0..pt.batch)
        .flat_map(|b| (0..blocks_per_seq).map(move |j| (j * pt.batch + b) as i32))
        .collect();
    let seqlens = vec![pt.seqlen as i32; pt.batch];
    let cache = KvCache::new(kv.layout, &kv.bytes, kv.num_blocks)?;
    let indices: Vec<i32>;
    let d = match pt.topk {
        None => Decode::dense(shape, dtype, &q, cache, &table, blocks_per_seq, &seqlens)?,
        Some(topk) => {
            // Random token positions of each sequence (with replacement), as
            // physical cache positions.
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            indices = (0..pt.batch * pt.s_q * topk)
                .map(|k| {
                    let b = k / (pt.s_q * topk);
                    let t = (rng.next() % pt.seqlen as u64) as usize;
                    table[b * blocks_per_seq + t / BLOCK] * BLOCK as i32 + (t % BLOCK) as i32
                })
                .collect();
            let main = IndexedKeys {
                kv: cache,
                indices: &indices,
                topk,
                topk_length: None,
            };
            Decode::sparse(shape, dtype, &q, main, None)?
        }
    };
    let mut out = vec![0u8; shape.out_elems() * dtype.size()];
    let mut lse = vec![0f32; shape.lse_elems()];
    let mut run = |engine: &Engine| -> Result<f64> {
        let mut o = DecodeOutput::new(&shape, dtype, &mut out, Some(&mut lse))?;
        let t0 = Instant::now();
        engine.decode(&d, &mut o)?;
        Ok(t0.elapsed().as_secs_f64())
    };
    for e in engines {
        run(e)?; // warm-up: workspace growth, page faults
    }
    let mut times = vec![Vec::new(); engines.len()];
    let (mut ratios, mut peaks) = (Vec::new(), Vec::new());
    let total = budget * engines.len() as f64;
    let start = Instant::now();
    while times[0].len() < MIN_REPS
        || (start.elapsed().as_secs_f64() < total && times[0].len() < MAX_REPS)
    {
        for (i, (e, t)) in engines.iter().zip(times.iter_mut()).enumerate() {
            let peak = if i == 0 { probe() } else { 0.0 };
            if peak > 0.0 {
                // The workers slept through the probe: an untimed call
                // wakes them and refills the caches (else a 0.4 ms call
                // measured 0.9 ms).
                run(e)?;
            }
            let secs = run(e)?;
            t.push(secs);
            if peak > 0.0 {
                ratios.push(d.flops() / secs / peak);
                peaks.push(peak);
            }
        }
    }
    let paired = (!ratios.is_empty()).then(|| (median(ratios), median(peaks)));
    let counted = match count_phases {
        false => None,
        true => {
            let per_call = median(times[0].clone());
            let calls = ((budget / 4.0 / per_call) as usize).clamp(MIN_REPS, MAX_REPS);
            let peak = probe();
            run(engines[0])?;
            phases::start();
            let t0 = Instant::now();
            let ran = (0..calls).try_for_each(|_| run(engines[0]).map(drop));
            let wall = t0.elapsed().as_secs_f64();
            let profile = phases::stop();
            ran?;
            Some(Phases {
                profile,
                peak,
                wall,
                calls,
            })
        }
    };
    Ok(PointRun {
        flops: d.flops(),
        bytes: d.kv_bytes(),
        times: times.into_iter().map(quantiles).collect(),
        paired,
        phases: counted,
    })
}

/// A second engine with the reference kernel `isa`: `Engine::new` reads
/// `MLART_CPU_ISA` at creation, so it is set just for that call and then
/// restored (nothing else reads the environment meanwhile).
fn reference_engine(threads: usize, isa: &str) -> Result<Engine> {
    const VAR: &str = "MLART_CPU_ISA";
    let prev = std::env::var_os(VAR);
    std::env::set_var(VAR, isa);
    let engine = Engine::new(&EngineOptions {
        num_threads: threads,
        ..EngineOptions::default()
    });
    match prev {
        Some(v) => std::env::set_var(VAR, v),
        None => std::env::remove_var(VAR),
    }
    engine
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn print_ceilings(when: &str, c: &Ceilings) {
    println!(
        "ceilings {when}: FP32 FMA peak {:.1} GFLOP/s ({}), vdpbf16ps peak {:.1} GFLOP/s, AMX tdpbf16ps peak {:.1} GFLOP/s, DRAM read {:.1} GB/s",
        c.fma_flops / 1e9,
        c.fma_isa,
        c.bf16_flops / 1e9,
        c.amx_flops / 1e9,
        c.read_bw / 1e9
    );
}

/// The point's columns of the tables, under [`POINT_HEADER`].
fn point_columns(pt: &Point) -> String {
    format!(
        "{:>5} {:>6} {:>4} {:>3} {:>8} {:>6}",
        pt.batch,
        pt.seqlen,
        pt.h_q,
        pt.s_q,
        pt.format.name(),
        topk_name(pt.topk)
    )
}

const POINT_HEADER: &str = "batch seqlen  h_q s_q       kv   topk";

fn topk_name(topk: Option<usize>) -> String {
    topk.map_or("dense".to_string(), |k| k.to_string())
}

pub fn run(opts: &Options) -> Result<()> {
    let engine = Engine::new(&EngineOptions {
        num_threads: opts.threads,
        ..EngineOptions::default()
    })?;
    let info = engine.info();
    let threads = info.threads;
    let date = utc_now();
    println!(
        "mlart {} bench — {} ({} threads, {}), {date} UTC",
        env!("CARGO_PKG_VERSION"),
        info.device_name,
        threads,
        info.thread_placement
    );
    println!(
        "backend {} kernel {}: {}",
        info.kind.name(),
        info.cpu_isa.name(),
        info.reason
    );
    let scalar = if !opts.scalar {
        None
    } else if info.cpu_isa.name() == opts.reference {
        println!(
            "reference: none (the kernel under test is already the {} one)",
            opts.reference
        );
        None
    } else {
        let s = reference_engine(threads, &opts.reference)?;
        println!(
            "reference: {} kernel ({} threads), runs interleaved with {}, call by call",
            s.info().cpu_isa.name(),
            s.info().threads,
            info.cpu_isa.name()
        );
        Some(s)
    };
    let ref_name = scalar
        .as_ref()
        .map_or("scalar", |s| s.info().cpu_isa.name());
    let engines: Vec<&Engine> = std::iter::once(&engine).chain(scalar.as_ref()).collect();

    let (points, mode) = match (&opts.points, opts.grid, opts.quick) {
        (Some(p), _, _) => (p.clone(), "points"),
        (None, true, _) => (grid_points(), "grid"),
        (None, false, quick) => (
            default_points(quick),
            if quick { "quick" } else { "default" },
        ),
    };
    let budget = opts
        .seconds
        .unwrap_or(if mode == "grid" { 0.3 } else { 1.0 });

    // Every point has bf16 queries and outputs and a bf16/FP8 cache with
    // d_qk = 576, so the avx512bf16 kernel runs both GEMMs on vdpbf16ps
    // (P·V in bf16 because the output is bf16) and amx both on tiles.
    let unit = match info.cpu_isa {
        CpuIsa::Avx512Bf16 => QkUnit::Bf16Dp,
        CpuIsa::Amx => QkUnit::Amx,
        _ => QkUnit::Fma,
    };
    println!("measuring ceilings before the points ({threads} threads) ...");
    let before = ceilings::measure(threads);
    print_ceilings("before", &before);
    println!(
        "{} points ({mode}), budget {budget} s per point and kernel, median of {MIN_REPS}..{MAX_REPS} runs after a warm-up{}",
        points.len(),
        if opts.huge_pages { "; caches on transparent huge pages" } else { "" }
    );

    let mut results = Vec::new();
    let mut kv: Option<KvData> = None;
    let n = points.len();
    for (i, pt) in points.into_iter().enumerate() {
        if kv.as_ref().map(|k| k.key) != Some((pt.format, pt.seqlen, pt.batch)) {
            drop(kv.take()); // free the previous cache first
            kv = Some(build_kv(&pt, opts.huge_pages)?);
        }
        let data = kv.as_ref().expect("built above");
        let probe = || ceilings::probe(threads, unit);
        // The vector and tile kernels count their phases; the reference
        // kernel does not.
        let count = info.cpu_isa != CpuIsa::Scalar;
        let PointRun {
            flops,
            bytes,
            times: mut secs,
            paired,
            phases,
        } = run_point(&engines, pt, data, budget, &probe, count)?;
        let m = Measured {
            point: pt,
            flops,
            bytes,
            scalar_seconds: secs.get(1).map(|t| t.median),
            time: secs.swap_remove(0),
            paired,
            phases,
        };
        eprintln!(
            "[{:>3}/{n}] b {} N {} h_q {} s_q {} {} {}: {:.3} ms, {:.1} GFLOP/s{}",
            i + 1,
            pt.batch,
            pt.seqlen,
            pt.h_q,
            pt.s_q,
            pt.format.name(),
            topk_name(pt.topk),
            m.time.median * 1e3,
            m.gflops(),
            m.scalar_seconds.map_or(String::new(), |s| format!(
                "; {ref_name} {:.3} ms, {:.2}x",
                s * 1e3,
                s / m.time.median
            ))
        );
        results.push(m);
    }
    drop(kv);

    println!("measuring ceilings after the points ...");
    let after = ceilings::measure(threads);
    print_ceilings("before", &before);
    print_ceilings("after", &after);
    let used = Ceilings {
        fma_flops: before.fma_flops.max(after.fma_flops),
        fma_isa: before.fma_isa,
        read_bw: before.read_bw.max(after.read_bw),
        bf16_flops: before.bf16_flops.max(after.bf16_flops),
        amx_flops: before.amx_flops.max(after.amx_flops),
        ..before
    }
    .for_kernel(unit, unit, D_QK, D_V);
    println!(
        "ceilings used: the max of before and after (the VM is noisy): compute ({}) {:.1} GFLOP/s, DRAM read {:.1} GB/s, machine balance {:.1} FLOP/byte",
        used.compute_name,
        used.compute_flops / 1e9,
        used.read_bw / 1e9,
        used.compute_flops / used.read_bw
    );
    println!(
        "shape: DeepSeek-V3 MLA decode, d_qk {D_QK}, d_v {D_V}, bf16 q/out, block {BLOCK}, not causal\n\
         FLOPs = 2·b·s_q·h_q·keys·(d_qk+d_v); bytes = cache rows read (dense: once per sequence; \
         sparse: topk random positions per query token, drawn with replacement, each counted)\n\
         % paired (compute-bound points): the median over calls of the call's FLOP rate over the {} peak read just before it (~10 ms)",
        used.compute_name
    );
    let with_scalar = scalar.is_some();
    print!(
        "{POINT_HEADER} {:>10} {:>8} {:>7} {:>7} {:>9} {:>7} {:>7} {:>8}",
        "time ms", "GFLOP/s", "GB/s", "FLOP/B", "bound", "% ceil", "spread", "% paired"
    );
    if with_scalar {
        print!(
            " {:>10} {:>8}",
            format!("{ref_name} ms"),
            format!("x {ref_name}")
        );
    }
    println!();
    for m in &results {
        let pt = &m.point;
        let (bound, fraction) = m.bound(&used);
        let paired = match (m.paired, bound) {
            (Some((r, _)), b) if b != "dram read" => format!("{:.1}%", r * 100.0),
            _ => "-".to_string(),
        };
        print!(
            "{} {:>10.3} {:>8.1} {:>7.2} {:>7.1} {:>9} {:>6.1}% {:>6.1}% {:>8}",
            point_columns(pt),
            m.time.median * 1e3,
            m.gflops(),
            m.gbytes(),
            m.intensity(),
            bound,
            fraction * 100.0,
            m.spread() * 100.0,
            paired
        );
        if let (Some(s), Some(x)) = (m.scalar_seconds, m.speedup()) {
            print!(" {:>10.3} {:>7.2}x", s * 1e3, x);
        }
        println!();
    }
    print_phases(info.cpu_isa.name(), &results, &used, threads);
    let speedups: Vec<f64> = results.iter().filter_map(Measured::speedup).collect();
    if !speedups.is_empty() {
        let geo = (speedups.iter().map(|x| x.ln()).sum::<f64>() / speedups.len() as f64).exp();
        let (lo, hi) = speedups
            .iter()
            .fold((f64::INFINITY, 0f64), |(l, h), &x| (l.min(x), h.max(x)));
        println!(
            "speed-up over {ref_name}: geometric mean {geo:.2}x, min {lo:.2}x, max {hi:.2}x ({} points)",
            speedups.len()
        );
    }
    if let Some(path) = &opts.json {
        let json = to_json(&JsonRun {
            info,
            date: &date,
            mode,
            budget,
            before: &before,
            after: &after,
            used: &used,
            scalar_isa: scalar.as_ref().map(|s| s.info().cpu_isa.name()),
            huge_pages: opts.huge_pages,
            results: &results,
        });
        std::fs::write(path, json)
            .map_err(|e| mlart::Error::new(mlart::Status::Io, format!("--json {path}: {e}")))?;
        println!("wrote {path}");
    }
    Ok(())
}

struct JsonRun<'a> {
    info: &'a mlart::backend::BackendInfo,
    date: &'a str,
    mode: &'a str,
    budget: f64,
    before: &'a Ceilings,
    after: &'a Ceilings,
    used: &'a Ceilings,
    scalar_isa: Option<&'static str>,
    huge_pages: bool,
    results: &'a [Measured],
}

fn to_json(r: &JsonRun) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let opt = |x: Option<f64>, prec: usize| x.map_or("null".to_string(), |v| format!("{v:.prec$}"));
    let ceil = |c: &Ceilings| {
        format!(
            "{{\"fma_gflops\": {:.3}, \"fma_isa\": \"{}\", \"bf16dp_gflops\": {:.3}, \"amx_gflops\": {:.3}, \"read_gbytes_per_s\": {:.3}}}",
            c.fma_flops / 1e9,
            c.fma_isa,
            c.bf16_flops / 1e9,
            c.amx_flops / 1e9,
            c.read_bw / 1e9
        )
    };
    let points: Vec<String> = r
        .results
        .iter()
        .map(|m| {
            let (bound, fraction) = m.bound(r.used);
            format!(
                "    {{\"batch\": {}, \"seqlen\": {}, \"h_q\": {}, \"s_q\": {}, \"d_qk\": {D_QK}, \"d_v\": {D_V}, \"kv_format\": \"{}\", \"topk\": {}, \
                 \"flops\": {:.6e}, \"bytes\": {:.6e}, \"seconds\": {:.6e}, \"seconds_p10\": {:.6e}, \"seconds_p90\": {:.6e}, \"gflops\": {:.3}, \"gbytes_per_s\": {:.3}, \"intensity\": {:.3}, \
                 \"bound\": \"{}\", \"fraction_of_ceiling\": {:.4}, \"fraction_of_paired_peak\": {}, \"paired_peak_gflops\": {}, \"scalar_seconds\": {}, \"scalar_gflops\": {}, \"speedup\": {}, \"phases\": {}}}",
                m.point.batch,
                m.point.seqlen,
                m.point.h_q,
                m.point.s_q,
                m.point.format.name(),
                m.point.topk.map_or("null".to_string(), |k| k.to_string()),
                m.flops,
                m.bytes,
                m.time.median,
                m.time.p10,
                m.time.p90,
                m.gflops(),
                m.gbytes(),
                m.intensity(),
                bound,
                fraction,
                opt(m.paired.map(|p| p.0), 4),
                opt(m.paired.map(|p| p.1 / 1e9), 3),
                m.scalar_seconds.map_or("null".to_string(), |s| format!("{s:.6e}")),
                opt(m.scalar_gflops(), 3),
                opt(m.speedup(), 4),
                PhaseFigures::of(m, r.used, r.info.threads).map_or("null".to_string(), |f| {
                    let us: Vec<String> = Phase::ALL
                        .iter()
                        .zip(f.us)
                        .map(|(ph, us)| format!("\"{}\": {us:.3}", ph.key()))
                        .collect();
                    format!(
                        "{{\"rows\": {:.1}, \"peak_gflops\": {:.3}, \"us_per_256_keys\": {{{}}}, \"at_peak_us\": {:.3}, \"dram_us\": {:.3}, \"busy\": {:.4}, \"scores_of_peak\": {:.4}, \"pv_of_peak\": {:.4}}}",
                        f.rows,
                        f.peak / 1e9,
                        us.join(", "),
                        f.at_peak_us,
                        f.dram_us,
                        f.busy,
                        f.scores_of_peak,
                        f.pv_of_peak
                    )
                }),
            )
        })
        .collect();
    format!(
        "{{\n  \"version\": \"{}\",\n  \"date\": \"{}\",\n  \"device\": \"{}\",\n  \"backend\": \"{}\",\n  \"cpu_isa\": \"{}\",\n  \"reference_isa\": {},\n  \"threads\": {},\n  \"thread_placement\": \"{}\",\n  \"huge_pages\": {},\n  \"mode\": \"{}\",\n  \"seconds_per_point\": {},\n  \
         \"ceilings\": {{\n    \"rule\": \"used = max of before and after\",\n    \"before\": {},\n    \"after\": {},\n    \"used\": {},\n    \
         \"fma_gflops\": {:.3}, \"fma_isa\": \"{}\", \"compute_gflops\": {:.3}, \"compute_name\": \"{}\", \"read_gbytes_per_s\": {:.3}, \"balance_flop_per_byte\": {:.3}\n  }},\n  \"points\": [\n{}\n  ]\n}}\n",
        env!("CARGO_PKG_VERSION"),
        r.date,
        esc(&r.info.device_name),
        r.info.kind.name(),
        r.info.cpu_isa.name(),
        r.scalar_isa.map_or("null".to_string(), |s| format!("\"{s}\"")),
        r.info.threads,
        esc(&r.info.thread_placement),
        r.huge_pages,
        r.mode,
        r.budget,
        ceil(r.before),
        ceil(r.after),
        ceil(r.used),
        r.used.fma_flops / 1e9,
        r.used.fma_isa,
        r.used.compute_flops / 1e9,
        r.used.compute_name,
        r.used.read_bw / 1e9,
        r.used.compute_flops / r.used.read_bw,
        points.join(",\n")
    )
}
