//! `mlart bench`: decode throughput on the DeepSeek-V3 shape, each figure
//! stated against the ceiling that binds it, measured in the same run.

use super::ceilings::{self, Ceilings};
use mlart::decode::desc::DecodeOutput;
use mlart::decode::{Decode, DecodeShape, IndexedKeys, KvCache};
use mlart::format::{store_slice, Dtype, KvFormat, KvLayout};
use mlart::{Engine, EngineOptions, Result};
use std::time::Instant;

/// One benchmark point.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub batch: usize,
    pub seqlen: usize,
    pub h_q: usize,
    pub s_q: usize,
    pub format: KvFormat,
    /// Sparse: keys per query token (random positions of the sequence).
    pub topk: Option<usize>,
}

pub struct Options {
    pub threads: usize,
    pub quick: bool,
    pub json: Option<String>,
    pub seconds: f64,
}

const D_QK: usize = 576;
const D_V: usize = 512;
const BLOCK: usize = 64;

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

/// Deterministic uniform noise in [-0.1, 0.1) (xorshift; quality is irrelevant here).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

struct Measured {
    point: Point,
    seconds: f64,
    gflops: f64,
    gbytes: f64,
    bound: &'static str,
    fraction: f64,
}

fn run_point(engine: &Engine, pt: Point, ceil: &Ceilings, budget: f64) -> Result<Measured> {
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
    let num_blocks = blocks_per_seq * pt.batch;
    let dtype = Dtype::Bf16;
    let layout = KvLayout::new(pt.format, D_QK, BLOCK, "kv_format")?;
    let mut kv = vec![0u8; layout.cache_bytes(num_blocks)?];
    let rows = noise(num_blocks * BLOCK * D_QK, 7);
    for (t, row) in rows.chunks_exact(D_QK).enumerate() {
        layout.store_row(&mut kv, t / BLOCK, t % BLOCK, row);
    }
    let mut q = vec![0u8; shape.q_elems() * dtype.size()];
    store_slice(dtype, &noise(shape.q_elems(), 11), &mut q);
    // Interleave the sequences' blocks so reads are not one linear stream.
    let table: Vec<i32> = (0..pt.batch)
        .flat_map(|b| (0..blocks_per_seq).map(move |j| (j * pt.batch + b) as i32))
        .collect();
    let seqlens = vec![pt.seqlen as i32; pt.batch];
    let cache = KvCache::new(layout, &kv, num_blocks)?;
    let indices: Vec<i32>;
    let d = match pt.topk {
        None => Decode::dense(shape, dtype, &q, cache, &table, blocks_per_seq, &seqlens)?,
        Some(topk) => {
            // Random token positions of each sequence, as physical cache positions.
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            indices = (0..pt.batch * pt.s_q * topk)
                .map(|k| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = k / (pt.s_q * topk);
                    let t = (x % pt.seqlen as u64) as usize;
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
    let mut run = || -> Result<f64> {
        let mut o = DecodeOutput::new(&shape, dtype, &mut out, Some(&mut lse))?;
        let t0 = Instant::now();
        engine.decode(&d, &mut o)?;
        Ok(t0.elapsed().as_secs_f64())
    };
    run()?; // warm-up: workspace growth, page faults
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed().as_secs_f64() < budget && times.len() < 50) {
        times.push(run()?);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let seconds = times[times.len() / 2];
    let (flops, bytes) = (d.flops(), d.kv_bytes());
    let (gflops, gbytes) = (flops / seconds / 1e9, bytes / seconds / 1e9);
    let compute_bound = ceil.fma_flops > 0.0 && flops / bytes > ceil.fma_flops / ceil.read_bw;
    let (bound, fraction) = if compute_bound {
        ("fp32 fma", gflops * 1e9 / ceil.fma_flops)
    } else {
        ("dram read", gbytes * 1e9 / ceil.read_bw)
    };
    Ok(Measured {
        point: pt,
        seconds,
        gflops,
        gbytes,
        bound,
        fraction,
    })
}

pub fn run(opts: &Options) -> Result<()> {
    let engine = Engine::new(&EngineOptions {
        num_threads: opts.threads,
        ..EngineOptions::default()
    })?;
    let info = engine.info();
    let threads = info.threads;
    println!(
        "mlart {} bench — {} ({} threads)",
        env!("CARGO_PKG_VERSION"),
        info.device_name,
        threads
    );
    println!(
        "backend {} kernel {}: {}",
        info.kind.name(),
        info.cpu_isa.name(),
        info.reason
    );
    println!("measuring ceilings with {threads} threads ...");
    let ceil = ceilings::measure(threads);
    println!(
        "ceilings: FP32 FMA peak {:.1} GFLOP/s ({}), DRAM read {:.1} GB/s",
        ceil.fma_flops / 1e9,
        ceil.fma_isa,
        ceil.read_bw / 1e9
    );
    println!(
        "shape: DeepSeek-V3 MLA decode, d_qk {D_QK}, d_v {D_V}, bf16 q/out, block {BLOCK}, s_q 1"
    );
    println!(
        "{:>5} {:>6} {:>4} {:>8} {:>6} {:>10} {:>9} {:>8} {:>10} {:>8}",
        "batch", "seqlen", "h_q", "kv", "topk", "time ms", "GFLOP/s", "GB/s", "bound", "% ceil"
    );
    let mut results = Vec::new();
    for pt in default_points(opts.quick) {
        let m = run_point(&engine, pt, &ceil, opts.seconds)?;
        println!(
            "{:>5} {:>6} {:>4} {:>8} {:>6} {:>10.3} {:>9.1} {:>8.2} {:>10} {:>7.1}%",
            pt.batch,
            pt.seqlen,
            pt.h_q,
            pt.format.name(),
            pt.topk.map_or("dense".to_string(), |k| k.to_string()),
            m.seconds * 1e3,
            m.gflops,
            m.gbytes,
            m.bound,
            m.fraction * 100.0
        );
        results.push(m);
    }
    if let Some(path) = &opts.json {
        std::fs::write(path, to_json(info, &ceil, &results))
            .map_err(|e| mlart::Error::new(mlart::Status::Io, format!("--json {path}: {e}")))?;
        println!("wrote {path}");
    }
    Ok(())
}

fn to_json(info: &mlart::backend::BackendInfo, ceil: &Ceilings, results: &[Measured]) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let points: Vec<String> = results
        .iter()
        .map(|m| {
            format!(
                "    {{\"batch\": {}, \"seqlen\": {}, \"h_q\": {}, \"s_q\": {}, \"d_qk\": {D_QK}, \"d_v\": {D_V}, \"kv_format\": \"{}\", \"topk\": {}, \"seconds\": {:.6e}, \"gflops\": {:.3}, \"gbytes_per_s\": {:.3}, \"bound\": \"{}\", \"fraction_of_ceiling\": {:.4}}}",
                m.point.batch, m.point.seqlen, m.point.h_q, m.point.s_q, m.point.format.name(),
                m.point.topk.map_or("null".to_string(), |k| k.to_string()), m.seconds, m.gflops, m.gbytes, m.bound, m.fraction
            )
        })
        .collect();
    format!(
        "{{\n  \"version\": \"{}\",\n  \"device\": \"{}\",\n  \"backend\": \"{}\",\n  \"cpu_isa\": \"{}\",\n  \"threads\": {},\n  \"ceilings\": {{\"fma_gflops\": {:.3}, \"fma_isa\": \"{}\", \"read_gbytes_per_s\": {:.3}}},\n  \"points\": [\n{}\n  ]\n}}\n",
        env!("CARGO_PKG_VERSION"),
        esc(&info.device_name),
        info.kind.name(),
        info.cpu_isa.name(),
        info.threads,
        ceil.fma_flops / 1e9,
        ceil.fma_isa,
        ceil.read_bw / 1e9,
        points.join(",\n")
    )
}
