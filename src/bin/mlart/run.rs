//! `mlart run`: load a checkpoint's attention layers, prefill random hidden
//! states, decode a few steps, and report per-layer and per-token times.
//! `mlart bench --model`: decode at batch 1 streams every weight once per
//! token; report that stream against the measured DRAM read bandwidth.
//! `--batch 8,16,…` adds batched decode steps, rated against the roofline
//! of the same run's ceilings: the weight stream at DRAM read bandwidth
//! or the products at the projections' compute peak, whichever is slower.

use super::ceilings;
use mlart::format::{KvFormat, KvLayout};
use mlart::kv::{KvPool, PoolOptions};
use mlart::model::{Activations, LoadOptions, Model};
use mlart::{Engine, EngineOptions, Error, Result};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

pub struct RunOptions {
    pub model: PathBuf,
    /// Layers `[a, b)`; `None` = all.
    pub layers: Option<(usize, usize)>,
    pub batch: usize,
    /// Every `--batch` value (a comma list; `run` takes one).
    pub batches: Vec<usize>,
    pub prompt: usize,
    pub decode: usize,
    pub kv: KvFormat,
    pub threads: usize,
    pub activations: Activations,
    /// Hidden states given as bf16 values (as a host with bf16 activations
    /// passes them) rather than arbitrary f32.
    pub hidden_bf16: bool,
    /// `LoadOptions::kept_keys_bytes` (`--kept-keys MB`).
    pub kept_keys_bytes: usize,
}

fn parse_range(s: &str) -> std::result::Result<(usize, usize), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or(format!("--layers {s}: expected a..b"))?;
    let a: usize = a.parse().map_err(|_| format!("--layers {s}: bad start"))?;
    let b: usize = b.parse().map_err(|_| format!("--layers {s}: bad end"))?;
    if b <= a {
        return Err(format!("--layers {s}: empty range"));
    }
    Ok((a, b))
}

pub fn parse(args: &[String]) -> std::result::Result<RunOptions, String> {
    let mut o = RunOptions {
        model: PathBuf::new(),
        layers: None,
        batch: 1,
        batches: vec![1],
        prompt: 128,
        decode: 16,
        kv: KvFormat::Bf16,
        threads: 0,
        activations: Activations::Precise,
        hidden_bf16: false,
        kept_keys_bytes: mlart::model::prefill::KEPT_KEYS_BYTES,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        let mut number = |name: &str| -> std::result::Result<usize, String> {
            let v = value(name)?;
            v.parse().map_err(|_| format!("{name} {v}: not a number"))
        };
        match a.as_str() {
            "--model" => o.model = PathBuf::from(value("--model")?),
            "--layers" => o.layers = Some(parse_range(&value("--layers")?)?),
            "--batch" => {
                let v = value("--batch")?;
                o.batches = v
                    .split(',')
                    .map(|b| match b.trim().parse::<usize>() {
                        Ok(n) if n >= 1 => Ok(n),
                        _ => Err(format!("--batch {v}: {b} is not a batch size (1 or more)")),
                    })
                    .collect::<std::result::Result<_, _>>()?;
                o.batch = o.batches[0];
            }
            "--prompt" => o.prompt = number("--prompt")?,
            "--decode" => o.decode = number("--decode")?,
            "--threads" => o.threads = number("--threads")?,
            "--kv" => {
                o.kv = match value("--kv")?.as_str() {
                    "bf16" => KvFormat::Bf16,
                    "f32" => KvFormat::F32,
                    "fp8" => KvFormat::Fp8V32,
                    "fp8-model1" => KvFormat::Fp8Model1,
                    other => {
                        return Err(format!(
                            "--kv {other}: expected bf16, f32, fp8 or fp8-model1"
                        ))
                    }
                }
            }
            "--activations" => {
                o.activations = match value("--activations")?.as_str() {
                    "precise" => Activations::Precise,
                    "bf16" => Activations::Bf16,
                    other => {
                        return Err(format!("--activations {other}: expected precise or bf16"))
                    }
                }
            }
            "--hidden" => {
                o.hidden_bf16 = match value("--hidden")?.as_str() {
                    "f32" => false,
                    "bf16" => true,
                    other => return Err(format!("--hidden {other}: expected f32 or bf16")),
                }
            }
            "--kept-keys" => {
                o.kept_keys_bytes = number("--kept-keys")?
                    .checked_mul(1 << 20)
                    .ok_or("--kept-keys: too many MB")?
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.model.as_os_str().is_empty() {
        return Err("--model DIR is required".into());
    }
    Ok(o)
}

/// Loads the model with a progress bar on stderr.
fn load(o: &RunOptions) -> Result<(Arc<Engine>, Model)> {
    let engine = Arc::new(Engine::new(&EngineOptions {
        num_threads: o.threads,
        ..EngineOptions::default()
    })?);
    let (first, count) = o.layers.map_or((0, 0), |(a, b)| (a, b - a));
    let mut bar = |f: f32, stage: &str| {
        let width = 30;
        let done = (f * width as f32) as usize;
        eprint!(
            "\rloading [{}{}] {:5.1}% {:<60}",
            "#".repeat(done),
            " ".repeat(width - done),
            f * 100.0,
            stage
        );
        let _ = std::io::stderr().flush();
        true
    };
    let t0 = Instant::now();
    let model = Model::load(
        engine.clone(),
        &o.model,
        LoadOptions {
            first_layer: first,
            num_layers: count,
            progress: Some(&mut bar),
            activations: o.activations,
            kept_keys_bytes: o.kept_keys_bytes,
            ..LoadOptions::default()
        },
    )?;
    eprintln!();
    println!(
        "loaded {} layer(s) from {} in {:.2} s: {:.1} MB of weights ({}), {} activations, projections on {}",
        model.layers.len(),
        o.model.display(),
        t0.elapsed().as_secs_f64(),
        model.bytes_loaded as f64 / 1e6,
        model.weight_dtype.name(),
        match model.activations {
            Activations::Precise => "precise",
            Activations::Bf16 => "bf16",
        },
        model.projections
    );
    println!(
        "keys kept between passes: {}",
        match model.kept_keys_bytes {
            0 => "none".to_string(),
            b => format!("up to {:.1} MB a sequence", b as f64 / 1e6),
        }
    );
    Ok((engine, model))
}

fn pool_for(
    engine: &Arc<Engine>,
    model: &Model,
    kv: KvFormat,
    tokens: usize,
    seqs: usize,
) -> Result<KvPool> {
    let block = 64;
    KvLayout::new(kv, model.config.d_qk(), block, "--kv")?;
    KvPool::new(
        engine.clone(),
        PoolOptions {
            format: kv,
            d_qk: model.config.d_qk(),
            num_layers: model.layers.len(),
            block_size: block,
            num_blocks: seqs * tokens.div_ceil(block).max(1) + seqs,
            index_dim: model.config.indexer.map_or(0, |ix| ix.head_dim),
        },
    )
}

/// Deterministic hidden states in [-1, 1), rounded to bf16 values for
/// `--hidden bf16`.
fn hidden(o: &RunOptions, n: usize, seed: u64) -> Vec<f32> {
    let mut x = mlart::model::gen::uniform(n, seed);
    if o.hidden_bf16 {
        x.iter_mut()
            .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
    }
    x
}

/// Runs every loaded layer once on `x` (residual added, and rounded to
/// bf16 with `--hidden bf16`), timing each.
fn step(
    o: &RunOptions,
    model: &Model,
    pool: &KvPool,
    ids: &[u64],
    n: &[usize],
    x: &mut [f32],
    layer_ms: &mut [f64],
) -> Result<()> {
    for (l, ms) in layer_ms.iter_mut().enumerate() {
        let t0 = Instant::now();
        let y = model.forward(pool, (model.first_layer + l) as i64, ids, n, x)?;
        *ms += t0.elapsed().as_secs_f64() * 1e3;
        x.iter_mut().zip(&y).for_each(|(a, b)| {
            *a += b;
            if o.hidden_bf16 {
                *a = half::bf16::from_f32(*a).to_f32();
            }
        });
    }
    Ok(())
}

pub fn run(o: &RunOptions) -> Result<()> {
    if o.batches.len() > 1 {
        return Err(Error::invalid(format!(
            "--batch {:?}: run takes one batch size (a list is for bench --model)",
            o.batches
        )));
    }
    let (engine, model) = load(o)?;
    let hid = model.config.hidden_size;
    let pool = pool_for(&engine, &model, o.kv, o.prompt + o.decode, o.batch)?;
    let ids: Vec<u64> = (0..o.batch as u64).collect();
    for &id in &ids {
        pool.create_seq(id)?;
    }
    let layers = model.layers.len();
    if o.prompt > 0 {
        let n = vec![o.prompt; o.batch];
        let mut x = hidden(o, o.batch * o.prompt * hid, 1);
        let mut ms = vec![0.0; layers];
        let t0 = Instant::now();
        step(o, &model, &pool, &ids, &n, &mut x, &mut ms)?;
        let total = t0.elapsed().as_secs_f64();
        println!(
            "prefill: {} x {} tokens in {:.1} ms ({:.0} tokens/s)",
            o.batch,
            o.prompt,
            total * 1e3,
            (o.batch * o.prompt) as f64 / total
        );
        for (l, t) in ms.iter().enumerate() {
            println!("  layer {:>3}: {t:9.2} ms", model.first_layer + l);
        }
    }
    if o.decode > 0 {
        let n = vec![1; o.batch];
        let mut ms = vec![0.0; layers];
        let mut per_token = Vec::new();
        for s in 0..o.decode {
            let mut x = hidden(o, o.batch * hid, 100 + s as u64);
            let t0 = Instant::now();
            step(o, &model, &pool, &ids, &n, &mut x, &mut ms)?;
            per_token.push(t0.elapsed().as_secs_f64() * 1e3);
            if x.iter().any(|v| !v.is_finite()) {
                return Err(Error::internal("decode produced a non-finite value"));
            }
        }
        per_token.sort_by(|a, b| a.total_cmp(b));
        println!(
            "decode: {} steps x batch {}: median {:.2} ms per step over {} layer(s) (min {:.2}, max {:.2})",
            o.decode,
            o.batch,
            per_token[per_token.len() / 2],
            layers,
            per_token[0],
            per_token[per_token.len() - 1]
        );
        for (l, t) in ms.iter().enumerate() {
            println!(
                "  layer {:>3}: {:9.3} ms per step",
                model.first_layer + l,
                t / o.decode as f64
            );
        }
    }
    println!(
        "cache: {} tokens per sequence in every layer",
        pool.len(0, 0)?
    );
    Ok(())
}

/// Batch-1 decode streams all attention weights of a layer once per token.
/// With the projections on a GPU (`MLART_BACKEND=cuda MLART_CUDA_PROJECTIONS=1`)
/// the ruler is the GPU's device-to-device copy bandwidth instead.
pub fn bench(o: &RunOptions) -> Result<()> {
    let (engine, model) = load(o)?;
    // A CUDA engine has no CPU threads of its own; projections it keeps on
    // the CPU run on all of them.
    let threads = match engine.info().threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        t => t,
    };
    let gpu = engine
        .backend()
        .cuda()
        .filter(|_| model.projections_on_gpu());
    let ruler = |label: &str| -> Result<f64> {
        match gpu {
            Some(cuda) => cuda.copy_bandwidth(256 << 20, 9),
            None => {
                println!("measuring DRAM read bandwidth with {threads} threads {label}...");
                Ok(ceilings::read_bandwidth(threads, 7))
            }
        }
    };
    let batched: Vec<usize> = o.batches.iter().copied().filter(|&b| b > 1).collect();
    // The projections' compute peaks, for the batched points on the CPU.
    let peaks = |label: &str| {
        (gpu.is_none() && !batched.is_empty()).then(|| {
            println!("measuring FMA, vdpbf16ps and AMX peaks with {threads} threads {label}...");
            ceilings::projection_peaks(threads)
        })
    };
    let (before, peaks_before) = (ruler("")?, peaks(""));
    let context = o.prompt.max(1);
    let single = if o.batches.contains(&1) {
        Some(single_step(
            o,
            &model,
            &pool_for(&engine, &model, o.kv, context + 96, 1)?,
            gpu,
        )?)
    } else {
        None
    };
    // Batched steps: every sequence holds a short context, so the time is
    // the projections' (the attention over a long context is `mlart bench`'s).
    let batch_context = context.min(32);
    let mut steps = Vec::new();
    for &b in &batched {
        let pool = pool_for(&engine, &model, o.kv, batch_context + 16, b)?;
        steps.push((b, batch_step(o, &model, &pool, b, batch_context)?));
    }
    // Measured before and after; the larger reading is the ceiling, so a
    // slow moment of this shared machine cannot inflate the percentage.
    let after = ruler("again ")?;
    let read_bw = before.max(after);
    let ruler_name = if gpu.is_some() {
        "GPU copy bandwidth"
    } else {
        "DRAM read"
    };
    println!(
        "{ruler_name} {:.1} GB/s (before {:.1}, after {:.1})",
        read_bw / 1e9,
        before / 1e9,
        after / 1e9
    );
    if let Some((t, on_device, profile)) = single {
        let gbs = model.bytes_loaded as f64 / t / 1e9;
        println!(
            "batch-1 decode, context {context}: {:.3} ms per token over {} layer(s); weights {:.1} MB ({}) streamed at {:.1} GB/s = {:.1}% of {ruler_name}",
            t * 1e3,
            model.layers.len(),
            model.bytes_loaded as f64 / 1e6,
            model.weight_dtype.name(),
            gbs,
            gbs * 1e9 / read_bw * 100.0
        );
        if let Some(td) = on_device {
            let gbs = model.bytes_loaded as f64 / td / 1e9;
            println!(
                "  with the hidden states in device memory: {:.3} ms per token, {:.1} GB/s = {:.1}% of {ruler_name}",
                td * 1e3,
                gbs,
                gbs * 1e9 / read_bw * 100.0
            );
        }
        if let Some((times, steps, wall)) = profile {
            print_step_profile(&times, steps, wall);
        }
    }
    if steps.is_empty() {
        return Ok(());
    }
    let compute = peaks_before
        .zip(peaks("again "))
        .map(|((f0, d0, a0), (f1, d1, a1))| {
            let (fma, dp, amx) = (f0.max(f1), d0.max(d1), a0.max(a1));
            println!(
                "FP32 FMA peak {:.1} GFLOP/s, vdpbf16ps peak {:.1} GFLOP/s, AMX tdpbf16ps peak {:.1} GFLOP/s",
                fma / 1e9,
                dp / 1e9,
                amx / 1e9
            );
            projection_ceiling(&model, fma, dp, amx)
        });
    println!(
        "batched decode, context {batch_context} per sequence, weights {:.1} MB ({}), {} activations:",
        model.bytes_loaded as f64 / 1e6,
        model.weight_dtype.name(),
        match model.activations {
            Activations::Precise => "precise",
            Activations::Bf16 => "bf16",
        },
    );
    for (b, t) in steps {
        let flops = b as f64 * token_flops(&model, batch_context + 8);
        let mem = model.bytes_loaded as f64 / read_bw;
        let mut line = format!(
            "  batch {b:>3}: {:8.2} ms per step, {:6.3} ms per token, {:7.1} GFLOP/s; weight stream {:5.1}% of {ruler_name}",
            t * 1e3,
            t * 1e3 / b as f64,
            flops / t / 1e9,
            mem / t * 100.0
        );
        if let Some((peak, name)) = compute {
            let comp = flops / peak;
            line += &format!(
                ", products {:5.1}% of {name}; {:.0}% of the roofline ({}-bound)",
                comp / t * 100.0,
                mem.max(comp) / t * 100.0,
                if comp > mem { "compute" } else { "memory" }
            );
        }
        println!("{line}");
    }
    Ok(())
}

/// What one decode step of batch 1 measures: the median step, the step with
/// the hidden states in device memory (GPU projections), and that step's
/// kernels.
type SingleStep = (
    f64,
    Option<f64>,
    Option<(Vec<mlart::backend::cuda::KernelTime>, usize, f64)>,
);

/// Batch-1 decode steps after a `--prompt` prefill; on a GPU also with
/// device memory and the per-kernel profile.
fn single_step(
    o: &RunOptions,
    model: &Model,
    pool: &KvPool,
    gpu: Option<&mlart::backend::cuda::CudaBackend>,
) -> Result<SingleStep> {
    let hid = model.config.hidden_size;
    let context = o.prompt.max(1);
    pool.create_seq(0)?;
    let mut ms = vec![0.0; model.layers.len()];
    let mut x = hidden(o, context * hid, 1);
    step(o, model, pool, &[0], &[context], &mut x, &mut ms)?;
    let mut times = Vec::new();
    for s in 0..32 {
        let mut x = hidden(o, hid, 7 + s);
        let t0 = Instant::now();
        step(o, model, pool, &[0], &[1], &mut x, &mut ms)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let t = times[times.len() / 2];
    // With the projections on the GPU and the pool on the same engine the
    // layers run whole there; timed again with the hidden states in device
    // memory too (`mlart_forward_args.memory = MLART_MEMORY_DEVICE`).
    let on_device = match gpu {
        Some(cuda) => Some(device_step_seconds(cuda, model, pool, 32)?),
        None => None,
    };
    // Where such a step's GPU time goes, kernel by kernel.
    let profile = match gpu {
        Some(cuda) => {
            let steps = 8;
            let mut wall = 0.0;
            let times = super::bench_cuda::profiled(cuda, || {
                wall = device_step_seconds(cuda, model, pool, steps)?;
                Ok(())
            })?;
            Some((times, steps, wall))
        }
        None => None,
    };
    Ok((t, on_device, profile))
}

/// Median seconds of a decode step of `b` sequences over every loaded
/// layer, each sequence prefilled with `context` tokens first.
fn batch_step(
    o: &RunOptions,
    model: &Model,
    pool: &KvPool,
    b: usize,
    context: usize,
) -> Result<f64> {
    let hid = model.config.hidden_size;
    let ids: Vec<u64> = (0..b as u64).collect();
    for &id in &ids {
        pool.create_seq(id)?;
    }
    let mut ms = vec![0.0; model.layers.len()];
    let mut x = hidden(o, b * context * hid, 1);
    step(o, model, pool, &ids, &vec![context; b], &mut x, &mut ms)?;
    let ones = vec![1; b];
    let mut times = Vec::new();
    for s in 0..16 {
        let mut x = hidden(o, b * hid, 7 + s);
        let t0 = Instant::now();
        step(o, model, pool, &ids, &ones, &mut x, &mut ms)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// FLOPs of one token's pass through the loaded layers at `context` keys:
/// every projection's products (the absorbed W_UK and W_UV are `kv_b_proj`'s
/// rows), the attention's two GEMMs and V3.2's indexer scores.
fn token_flops(model: &Model, context: usize) -> f64 {
    let c = &model.config;
    let macs = |w: &mlart::model::Linear| (w.out * w.inp) as f64;
    let per_layer: f64 = model
        .layers
        .iter()
        .map(|lw| {
            let q = match &lw.q {
                mlart::model::QProj::Lora { a, b, .. } => macs(a) + macs(b),
                mlart::model::QProj::Direct(w) => macs(w),
            };
            let ix = lw.indexer.as_ref().map_or(0.0, |ix| {
                macs(&ix.wq_b)
                    + macs(&ix.wk)
                    + macs(&ix.weights_proj)
                    + (ix.cfg.heads * ix.cfg.head_dim * context) as f64
            });
            let keys = c.indexer.map_or(context, |ix| context.min(ix.topk));
            let attention = (c.num_heads * keys * (c.d_qk() + c.kv_lora_rank)) as f64;
            q + macs(&lw.kv_a) + macs(lw.absorbed.kv_b()) + macs(&lw.o_proj) + ix + attention
        })
        .sum();
    2.0 * per_layer
}

/// The rate the projections' products can reach, and its name: with the
/// bf16 GEMM on AMX tiles or `vdpbf16ps`, bf16 activations run at that
/// peak and precise ones (each split into two bf16 products) at half of
/// it; otherwise the FMA peak.
fn projection_ceiling(model: &Model, fma: f64, dp: f64, amx: f64) -> (f64, &'static str) {
    use mlart::model::level::Level;
    let tiles = model.level == Level::Avx512Bf16 && mlart::model::gemm::on_amx() && amx > 0.0;
    match (model.level, model.activations) {
        (_, Activations::Bf16) if tiles => (amx, "AMX peak"),
        (_, Activations::Precise) if tiles => (amx / 2.0, "AMX peak / 2 (split activations)"),
        (Level::Avx512Bf16, Activations::Bf16) if dp > 0.0 => (dp, "vdpbf16ps peak"),
        (Level::Avx512Bf16, Activations::Precise) if dp / 2.0 > fma => {
            (dp / 2.0, "vdpbf16ps peak / 2 (split activations)")
        }
        _ => (fma, "FP32 FMA peak"),
    }
}

/// The kernels of one device-memory decode step: launches, GPU time, share;
/// then their sum against the step's wall time (the rest is launch gaps
/// and host work).
fn print_step_profile(times: &[mlart::backend::cuda::KernelTime], steps: usize, wall: f64) {
    let total: f64 = times.iter().map(|t| t.seconds).sum::<f64>() / steps as f64;
    println!(
        "  kernels of such a step (median step {:.1} us with an event pair around every launch):",
        wall * 1e6
    );
    println!(
        "    {:<26} {:>9} {:>9} {:>6}",
        "kernel", "launches", "us", "share"
    );
    for t in times {
        let us = t.seconds / steps as f64 * 1e6;
        println!(
            "    {:<26} {:>9.2} {:>9.1} {:>5.1}%",
            t.name,
            t.launches as f64 / steps as f64,
            us,
            100.0 * us * 1e-6 / total.max(1e-12)
        );
    }
    println!(
        "    kernels' GPU time {:.1} us of the {:.1} us step: {:.0}% busy",
        total * 1e6,
        wall * 1e6,
        100.0 * total / wall.max(1e-12)
    );
}

/// Median seconds of a batch-1 decode step over every loaded layer with
/// the hidden states and output in device memory, over `steps` steps.
fn device_step_seconds(
    cuda: &mlart::backend::cuda::CudaBackend,
    model: &Model,
    pool: &KvPool,
    steps: usize,
) -> Result<f64> {
    let hid = model.config.hidden_size;
    let x = mlart::model::gen::uniform(hid, 99);
    let bytes = 4 * hid;
    let (xd, yd) = (cuda.mem_alloc(bytes)?, cuda.mem_alloc(bytes)?);
    let r = (|| {
        cuda.mem_copy(xd, x.as_ptr() as u64, bytes)?;
        let mut times = Vec::new();
        for _ in 0..steps {
            let t0 = Instant::now();
            for l in 0..model.layers.len() {
                let layer = (model.first_layer + l) as i64;
                let f32 = mlart::format::Dtype::F32;
                model.forward_device(pool, layer, &[0], &[1], xd, f32, yd, f32, 0, None)?;
            }
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
    })();
    for p in [xd, yd] {
        cuda.mem_free(p)?;
    }
    r
}
