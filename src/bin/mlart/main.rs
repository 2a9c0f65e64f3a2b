//! The `mlart` command: `info` describes what mlart would run on here,
//! `bench` measures decode throughput against the machine's ceilings,
//! `gen-model` writes a random-weight DeepSeek checkpoint.

mod bench;
mod bench_cuda;
mod ceilings;
mod gen_model;
mod run;

use mlart::backend::cpu::CpuFeatures;
use mlart::{Engine, EngineOptions};
use std::process::ExitCode;

const USAGE: &str = "usage: mlart <command> [options]

commands:
  info                    version, ABI, chosen backend and kernel, CPU features
  bench [options]         decode throughput on the DeepSeek-V3 shape (h_q 128, d_qk 576, d_v 512, bf16)
      --threads N         worker threads (default: all cores)
      --quick             four small points only
      --grid              the full grid: h_q 16|64|128 x s_q 1|2 x N 1024|4096|16384 x batch 1|8
                          x bf16|fp8_v32 x dense|sparse topk 2048 (144 points; topk > N repeats positions)
      --points LIST       explicit points h_q:s_q:N:batch:format:topk,... (topk: a number or dense),
                          e.g. 128:1:4096:1:bf16:dense,128:2:16384:8:fp8_v32:2048
      --seconds S         time budget per point and kernel, median of >= 3 runs (default 1.0; 0.3 with --grid)
      --no-scalar         skip the reference kernel (otherwise timed on every point: x scalar column)
      --reference ISA     the reference kernel: scalar (default) | avx2 | avx512 | avx512bf16 | amx, its calls
                          interleaved with the kernel's (e.g. amx against avx512 in the same VM state)
      --huge-pages        back the bench's caches with transparent huge pages (Linux madvise), as pools are
      --json PATH         also write the results as JSON (every point, ceilings before/after/used, date)
  bench --cuda [options]  GPU decode throughput: dense bf16 b=128 N=4096 h_q 16|128, sparse fp8_v32 h_q 128 topk 2048;
                          the model's projections; the V3.2 indexer's selection (1|64 tokens, 16384|131072 keys);
                          each decode point's GPU time per kernel (plan, decode, combine)
      --device I          CUDA device (default 0)
      --matmul-tflops T   the GPU's measured bf16 matmul rate, for the % matmul column
      --reps R            timed calls per point, median reported (default 20)
      --json PATH         also write the results as JSON
  run --model DIR [options]
                          load a checkpoint's attention layers, prefill random hidden states, decode
      --layers A..B       layers to load (default: all)
      --batch B           sequences (default 1)
      --prompt N          prefill tokens per sequence (default 128)
      --decode T          decode steps (default 16)
      --kv F              cache format: bf16 | f32 | fp8 | fp8-model1 (default bf16)
      --activations A     projections' activations: precise | bf16 (rounded, as DeepSeek's
                          reference; faster prefill) (default precise)
      --hidden H          hidden states as f32 values or bf16 values, as a bf16 host passes them
                          (default f32)
      --kept-keys MB      up-projected keys a long prompt's passes keep (default 1024; 0 keeps none)
  bench --model DIR [run options]
                          batch-1 decode through the model's layers: weight stream vs DRAM bandwidth
                          (GPU projections: vs copy bandwidth, and the step's GPU time kernel by kernel)
      --batch LIST        batch sizes, e.g. 1,8,16,32 (default 1): each batch > 1 is a decode step
                          rated against the roofline of the weight stream and the projections' peak
  gen-model --preset P [options] DIR
                          write a random-weight DeepSeek checkpoint (config.json, safetensors) to DIR
      --preset P          tiny | v2-lite | v3 | tiny-v3.2 | v3.2 | small | small-v3.2
                          (V3.2: with the sparse-attention indexer; small: tiny
                          projections with DeepSeek's 576-wide cache rows, for GPUs)
      --dtype D           bf16 | f16 | f32 | fp8 (e4m3, 128x128 block scales) (default bf16)
      --layers N          num_hidden_layers (default 2)
      --seed S            random seed (default 0)
      --shards K          safetensors files; K > 1 adds model.safetensors.index.json (default 1)
      --no-yarn           omit rope_scaling from config.json

environment: MLART_BACKEND=cpu|cuda, MLART_CPU_ISA=scalar|avx2|avx512|avx512bf16|amx";

fn info() -> mlart::Result<()> {
    println!(
        "mlart {} (ABI {})",
        env!("CARGO_PKG_VERSION"),
        mlart::ffi::types::MLART_ABI_VERSION
    );
    println!("cpu features: {}", CpuFeatures::detect().describe());
    let engine = Engine::new(&EngineOptions::default())?;
    let i = engine.info();
    println!("backend: {}", i.kind.name());
    println!("device: {}", i.device_name);
    println!("cpu kernel: {}", i.cpu_isa.name());
    println!("threads: {} {}", i.threads, i.thread_placement);
    println!("why: {}", i.reason);
    match mlart::backend::cuda::device_count() {
        Ok(n) => {
            println!("cuda devices: {n}");
            for d in 0..n {
                match mlart::backend::cuda::CudaBackend::probe(d) {
                    Ok((p, image)) => println!(
                        "  {d}: {} (sm_{}{}, {} SMs, {:.0} GiB), kernels: {image}",
                        p.name,
                        p.major,
                        p.minor,
                        p.sm_count,
                        p.total_memory as f64 / (1u64 << 30) as f64
                    ),
                    Err(e) => println!("  {d}: {}", e.message),
                }
            }
        }
        Err(e) => println!("cuda devices: none ({})", e.message),
    }
    println!(
        "cuda kernels in this build: {}",
        if mlart::backend::cuda::fatbin::fatbin().is_some() {
            "yes (sm_80, sm_90a, sm_100a SASS + compute_80 PTX)"
        } else {
            "no (built without nvcc)"
        }
    );
    Ok(())
}

fn parse_bench(args: &[String]) -> Result<bench::Options, String> {
    let mut o = bench::Options {
        threads: 0,
        quick: false,
        grid: false,
        points: None,
        json: None,
        seconds: None,
        scalar: true,
        reference: "scalar".to_string(),
        huge_pages: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--threads" => {
                let v = value("--threads")?;
                o.threads = v
                    .parse()
                    .map_err(|_| format!("--threads {v}: not a number"))?;
            }
            "--seconds" => {
                let v = value("--seconds")?;
                let s: f64 = v
                    .parse()
                    .map_err(|_| format!("--seconds {v}: not a number"))?;
                if !(s >= 0.0 && s.is_finite()) {
                    return Err(format!("--seconds {v}: not a non-negative number"));
                }
                o.seconds = Some(s);
            }
            "--json" => o.json = Some(value("--json")?),
            "--quick" => o.quick = true,
            "--grid" => o.grid = true,
            "--points" => o.points = Some(bench::parse_points(&value("--points")?)?),
            "--no-scalar" => o.scalar = false,
            "--reference" => {
                let v = value("--reference")?;
                if !["scalar", "avx2", "avx512", "avx512bf16", "amx"].contains(&v.as_str()) {
                    return Err(format!(
                        "--reference {v}: not a CPU kernel (scalar, avx2, avx512, avx512bf16, amx)"
                    ));
                }
                o.reference = v;
            }
            "--huge-pages" => o.huge_pages = true,
            other => return Err(format!("unknown bench option {other}")),
        }
    }
    if [o.quick, o.grid, o.points.is_some()]
        .iter()
        .filter(|&&x| x)
        .count()
        > 1
    {
        return Err("--quick, --grid and --points exclude each other".to_string());
    }
    if o.points.as_ref().is_some_and(|p| p.is_empty()) {
        return Err("--points: no points given".to_string());
    }
    Ok(o)
}

fn parse_bench_cuda(args: &[String]) -> Result<bench_cuda::Options, String> {
    let mut o = bench_cuda::Options {
        device: 0,
        matmul_tflops: None,
        reps: 20,
        json: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--cuda" => {}
            "--device" => {
                let v = value("--device")?;
                o.device = v
                    .parse()
                    .map_err(|_| format!("--device {v}: not a number"))?;
            }
            "--reps" => {
                let v = value("--reps")?;
                o.reps = v.parse().map_err(|_| format!("--reps {v}: not a number"))?;
                if o.reps == 0 {
                    return Err("--reps 0: must be >= 1".to_string());
                }
            }
            "--matmul-tflops" => {
                let v = value("--matmul-tflops")?;
                let t: f64 = v
                    .parse()
                    .map_err(|_| format!("--matmul-tflops {v}: not a number"))?;
                if !(t > 0.0 && t.is_finite()) {
                    return Err(format!("--matmul-tflops {v}: not a positive number"));
                }
                o.matmul_tflops = Some(t);
            }
            "--json" => o.json = Some(value("--json")?),
            other => return Err(format!("unknown bench --cuda option {other}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    // `mlart info | head` should stop quietly when the reader goes away,
    // as other command-line tools do, instead of panicking in println!.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any
    // thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("info") => info(),
        Some("bench") if args.iter().any(|a| a == "--model") => match run::parse(&args[1..]) {
            Ok(o) => run::bench(&o),
            Err(e) => {
                eprintln!("mlart: {e}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("bench") if args.iter().any(|a| a == "--cuda") => match parse_bench_cuda(&args[1..]) {
            Ok(o) => bench_cuda::run(&o),
            Err(e) => {
                eprintln!("mlart: {e}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("run") => match run::parse(&args[1..]) {
            Ok(o) => run::run(&o),
            Err(e) => {
                eprintln!("mlart: {e}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("bench") => match parse_bench(&args[1..]) {
            Ok(o) => bench::run(&o),
            Err(e) => {
                eprintln!("mlart: {e}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("gen-model") => match gen_model::parse(&args[1..]) {
            Ok(o) => gen_model::run(&o),
            Err(e) => {
                eprintln!("mlart: {e}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mlart: {e}");
            ExitCode::FAILURE
        }
    }
}
