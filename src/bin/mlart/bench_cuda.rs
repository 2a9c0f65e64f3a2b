//! `mlart bench --cuda`: GPU decode throughput on device-resident inputs,
//! each figure stated against the device's copy bandwidth (measured in the
//! same run) and, when given, its measured bf16 matmul rate.

use mlart::backend::cuda::args::{DenseDev, DeviceDecode, IndexedDev, KeysDev};
use mlart::backend::cuda::{CudaBackend, KernelTime};
use mlart::decode::DecodeShape;
use mlart::format::{Dtype, KvFormat, KvLayout};
use mlart::{BackendRequest, Engine, EngineOptions, Error, Result};

pub struct Options {
    pub device: usize,
    /// The device's bf16 matmul rate in TFLOP/s (measured elsewhere, e.g.
    /// by scripts/gpu-check.sh with torch); enables the "% matmul" column.
    pub matmul_tflops: Option<f64>,
    pub reps: usize,
    pub json: Option<String>,
}

/// One GPU point: batch, keys per sequence (dense) or cache tokens per
/// sequence (sparse), h_q, format, sparse topk.
#[derive(Clone, Copy, Debug)]
struct Point {
    batch: usize,
    seqlen: usize,
    h_q: usize,
    format: KvFormat,
    topk: Option<usize>,
}

/// The points: dense BF16 b=128 N=4096 at h_q 16 and 128, and
/// sparse FP8 (V3.2 layout) h_q=128 topk=2048 over 4096-token sequences.
const POINTS: [Point; 3] = [
    Point {
        batch: 128,
        seqlen: 4096,
        h_q: 16,
        format: KvFormat::Bf16,
        topk: None,
    },
    Point {
        batch: 128,
        seqlen: 4096,
        h_q: 128,
        format: KvFormat::Bf16,
        topk: None,
    },
    Point {
        batch: 128,
        seqlen: 4096,
        h_q: 128,
        format: KvFormat::Fp8V32,
        topk: Some(2048),
    },
];

const BLOCK: usize = 64;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Device buffers of one point, freed on drop.
struct Buffers<'a> {
    cuda: &'a CudaBackend,
    ptrs: Vec<u64>,
}

impl Buffers<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<u64> {
        let p = self.cuda.mem_alloc(bytes.len())?;
        self.ptrs.push(p);
        self.cuda
            .mem_copy(p, bytes.as_ptr() as usize as u64, bytes.len())?;
        Ok(p)
    }

    fn put_i32(&mut self, v: &[i32]) -> Result<u64> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(&bytes)
    }

    fn zeroed(&mut self, n: usize) -> Result<u64> {
        self.put(&vec![0u8; n])
    }
}

impl Drop for Buffers<'_> {
    fn drop(&mut self) {
        for &p in &self.ptrs {
            let _ = self.cuda.mem_free(p);
        }
    }
}

/// Random finite bf16 bits of magnitude below ~0.5.
fn bf16_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let r = rng.next();
        let bits = 0x3a00u16 | (r as u16 & 0x83ff);
        v.extend_from_slice(&bits.to_le_bytes());
    }
    v
}

/// A random cache of `tokens` rows in `format` (FP8: finite codes, unit
/// scales, bf16 rope); the values only have to be finite.
fn cache_bytes(rng: &mut Rng, layout: &KvLayout, blocks: usize) -> Vec<u8> {
    match layout.format {
        KvFormat::Bf16 => bf16_bytes(rng, blocks * BLOCK * layout.d_qk),
        KvFormat::Fp8V32 => {
            let mut v = vec![0u8; blocks * layout.block_bytes];
            for row in v.chunks_exact_mut(656) {
                for b in &mut row[..512] {
                    *b = (rng.next() as u8) & 0xbf;
                }
                for s in 0..4 {
                    row[512 + 4 * s..516 + 4 * s].copy_from_slice(&0.01f32.to_le_bytes());
                }
                row[528..].copy_from_slice(&bf16_bytes(rng, 64));
            }
            v
        }
        _ => vec![0u8; blocks * layout.block_bytes],
    }
}

struct Figures {
    seconds: f64,
    bytes: f64,
    flops: f64,
    /// Per kernel (plan, decode, combine): GPU time of a few profiled calls.
    kernels: Vec<KernelTime>,
    calls: usize,
}

/// Runs `f`, which makes `calls` calls, with the backend's per-kernel
/// profile open (events around every launch, so its own time is not a
/// figure): what each kernel took.
pub(crate) fn profiled(
    cuda: &CudaBackend,
    f: impl FnOnce() -> Result<()>,
) -> Result<Vec<KernelTime>> {
    cuda.profile_start()?;
    let r = f();
    let times = cuda.profile_stop();
    r?;
    times
}

/// "mla_plan 2.1 us, mla_decode 50.3 us (x2), ..." per call.
pub(crate) fn kernel_summary(times: &[KernelTime], calls: usize) -> String {
    let calls = calls.max(1);
    times
        .iter()
        .map(|t| {
            let n = match t.launches as usize {
                n if n == calls => String::new(),
                n if n % calls == 0 => format!(" (x{})", n / calls),
                n => format!(" (x{:.2})", n as f64 / calls as f64),
            };
            format!("{} {:.1} us{n}", t.name, t.seconds / calls as f64 * 1e6)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The same as JSON: {"mla_plan": {"launches": .., "seconds": ..}, ...}
/// per call.
fn kernel_json(times: &[KernelTime], calls: usize) -> String {
    let calls = calls.max(1) as f64;
    let parts: Vec<String> = times
        .iter()
        .map(|t| {
            format!(
                "\"{}\":{{\"launches\":{},\"seconds\":{:e}}}",
                t.name,
                t.launches as f64 / calls,
                t.seconds / calls
            )
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn run_point(cuda: &CudaBackend, pt: &Point, reps: usize) -> Result<Figures> {
    let d_qk = 576;
    let shape = DecodeShape::new(pt.batch as i32, 1, pt.h_q as i32, d_qk, 512, 0.0, false)?;
    let layout = KvLayout::new(pt.format, d_qk as usize, BLOCK, "format")?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let blocks = pt.batch * pt.seqlen.div_ceil(BLOCK);
    let mut buf = Buffers {
        cuda,
        ptrs: Vec::new(),
    };
    let q = buf.put(&bf16_bytes(&mut rng, pt.batch * pt.h_q * d_qk as usize))?;
    let kv = buf.put(&cache_bytes(&mut rng, &layout, blocks))?;
    let out = buf.zeroed(pt.batch * pt.h_q * 512 * 2)?;
    let lse = buf.zeroed(pt.batch * pt.h_q * 4)?;
    let per_seq = pt.seqlen.div_ceil(BLOCK);
    let (keys, keys_per_seq) = match pt.topk {
        None => {
            // Shuffled block table: sequences' blocks interleave in memory.
            let mut ids: Vec<i32> = (0..blocks as i32).collect();
            for i in (1..ids.len()).rev() {
                let j = (rng.next() % (i as u64 + 1)) as usize;
                ids.swap(i, j);
            }
            let seqlens = vec![pt.seqlen as i32; pt.batch];
            (
                KeysDev::Dense(DenseDev {
                    block_table: buf.put_i32(&ids)?,
                    stride: per_seq,
                    seqlens: buf.put_i32(&seqlens)?,
                }),
                pt.seqlen,
            )
        }
        Some(topk) => {
            let idx: Vec<i32> = (0..pt.batch * topk)
                .map(|i| {
                    let b = i / topk;
                    (b * per_seq * BLOCK + (rng.next() % pt.seqlen as u64) as usize) as i32
                })
                .collect();
            (
                KeysDev::Sparse {
                    main: IndexedDev {
                        layout,
                        kv,
                        num_blocks: blocks,
                        indices: buf.put_i32(&idx)?,
                        topk,
                        topk_length: 0,
                    },
                    extra: None,
                },
                topk,
            )
        }
    };
    let a = DeviceDecode {
        shape,
        q_dtype: Dtype::Bf16,
        out_dtype: Dtype::Bf16,
        layout,
        q,
        kv,
        num_blocks: blocks,
        keys,
        sink: 0,
        out,
        lse,
        stream: 0,
    };
    let seconds = cuda.time_decode(&a, reps)?;
    let calls = 5;
    let kernels = profiled(cuda, || cuda.time_decode(&a, calls).map(|_| ()))?;
    let rows = (pt.batch * keys_per_seq) as f64;
    Ok(Figures {
        seconds,
        bytes: rows * layout.row_bytes as f64,
        flops: 2.0 * rows * pt.h_q as f64 * (576.0 + 512.0),
        kernels,
        calls,
    })
}

pub fn run(o: &Options) -> Result<()> {
    let engine = std::sync::Arc::new(Engine::new(&EngineOptions {
        backend: BackendRequest::Cuda,
        device_index: o.device,
        ..EngineOptions::default()
    })?);
    let cuda = engine
        .backend()
        .cuda()
        .ok_or_else(|| Error::internal("CUDA engine without a CUDA backend"))?;
    let p = cuda.props();
    println!(
        "device {}: {} (sm_{}{}, {} SMs, {:.0} GiB)",
        p.index,
        p.name,
        p.major,
        p.minor,
        p.sm_count,
        p.total_memory as f64 / (1u64 << 30) as f64
    );
    println!("why: {}", engine.info().reason);
    let copy = cuda.copy_bandwidth(1 << 30, 20)?;
    println!(
        "ceiling: device copy {:.0} GB/s (read + write, 1 GiB, median of 20)",
        copy * 1e-9
    );
    match o.matmul_tflops {
        Some(t) => println!("ceiling: bf16 matmul {t:.0} TFLOP/s (given by --matmul-tflops)"),
        None => println!("ceiling: bf16 matmul not given (--matmul-tflops): no % matmul column"),
    }
    println!(
        "{:>5} {:>6} {:>5} {:>8} {:>6} {:>10} {:>9} {:>7} {:>9} {:>9}",
        "batch", "N", "h_q", "format", "topk", "time us", "GB/s", "% copy", "TFLOP/s", "% matmul"
    );
    let mut json = Vec::new();
    for pt in &POINTS {
        let f = run_point(cuda, pt, o.reps)?;
        let gbs = f.bytes / f.seconds * 1e-9;
        let tf = f.flops / f.seconds * 1e-12;
        let pct_mm = o.matmul_tflops.map(|m| 100.0 * tf / m);
        println!(
            "{:>5} {:>6} {:>5} {:>8} {:>6} {:>10.1} {:>9.0} {:>6.1}% {:>9.1} {:>9}",
            pt.batch,
            pt.seqlen,
            pt.h_q,
            pt.format.name(),
            pt.topk.map_or("dense".to_string(), |t| t.to_string()),
            f.seconds * 1e6,
            gbs,
            100.0 * gbs * 1e9 / copy,
            tf,
            pct_mm.map_or("-".to_string(), |x| format!("{x:.1}%"))
        );
        println!("      per call: {}", kernel_summary(&f.kernels, f.calls));
        json.push(format!(
            "{{\"batch\":{},\"seqlen\":{},\"h_q\":{},\"format\":\"{}\",\"topk\":{},\"seconds\":{:e},\"gbytes_per_s\":{:.3},\"tflops\":{:.3},\"pct_copy\":{:.2}{},\"kernels\":{}}}",
            pt.batch,
            pt.seqlen,
            pt.h_q,
            pt.format.name(),
            pt.topk.map_or("null".to_string(), |t| t.to_string()),
            f.seconds,
            gbs,
            tf,
            100.0 * gbs * 1e9 / copy,
            pct_mm.map_or(String::new(), |x| format!(",\"pct_matmul\":{x:.2}")),
            kernel_json(&f.kernels, f.calls)
        ));
    }
    let projections = projection_points(cuda, copy, o.reps)?;
    let indexer = indexer_points(&engine, o.matmul_tflops, o.reps)?;
    if let Some(path) = &o.json {
        let text = format!(
            "{{\"device\":\"{}\",\"sm\":\"{}{}\",\"wgmma\":{},\"copy_gbytes_per_s\":{:.1},\"matmul_tflops\":{},\"points\":[{}],\"projections\":[{}],\"indexer\":[{}]}}\n",
            p.name,
            p.major,
            p.minor,
            cuda.uses_wgmma(),
            copy * 1e-9,
            o.matmul_tflops.map_or("null".to_string(), |t| format!("{t:.1}")),
            json.join(","),
            projections.join(","),
            indexer.join(",")
        );
        std::fs::write(path, text)
            .map_err(|e| Error::new(mlart::Status::Io, format!("--json {path}: {e}")))?;
    }
    Ok(())
}

/// The model's projection kernels alone (`mla_linear`, device-resident
/// activations) on DeepSeek-V3's two largest weights, bf16 and FP8, for a
/// decode step (1 token) and a 64-token pass: the weight stream against the
/// copy bandwidth. Returns the JSON objects.
fn projection_points(cuda: &CudaBackend, copy: f64, reps: usize) -> Result<Vec<String>> {
    use mlart::backend::cuda::linear::{LinearCall, WeightImage};
    println!(
        "\nprojections (weights streamed once per call; activations split hi+lo):\n{:>8} {:>6} {:>6} {:>5} {:>7} {:>10} {:>9} {:>7} {:>9}",
        "weight", "out", "in", "dtype", "tokens", "time us", "GB/s", "% copy", "TFLOP/s"
    );
    let mut rng = Rng(0x70726f6a);
    let mut json = Vec::new();
    for (name, out, inp) in [("q_a", 1536usize, 7168usize), ("o_proj", 7168, 16384)] {
        for fp8 in [false, true] {
            let img = if fp8 {
                let codes: Vec<u8> = (0..out * inp).map(|_| (rng.next() as u8) & 0x7e).collect();
                let scales = vec![1.0f32; out.div_ceil(128) * inp.div_ceil(128)];
                WeightImage::fp8(&codes, &scales, out, inp)?
            } else {
                WeightImage::bf16(&bf16_bytes(&mut rng, out * inp), out, inp)?
            };
            let w = cuda.upload_weight(&img)?;
            let timed = [1usize, 64]
                .iter()
                .map(|&t| {
                    Ok((
                        t,
                        cuda.time_linear(&w, &LinearCall::plain(t, out), true, reps)?,
                    ))
                })
                .collect::<Result<Vec<_>>>();
            cuda.free_weight(&w);
            for (tokens, secs) in timed? {
                let gbs = img.device_bytes() as f64 / secs * 1e-9;
                let tf = 2.0 * 2.0 * (tokens * out * inp) as f64 / secs * 1e-12;
                let dtype = if fp8 { "fp8" } else { "bf16" };
                println!(
                    "{name:>8} {out:>6} {inp:>6} {dtype:>5} {tokens:>7} {:>10.1} {gbs:>9.0} {:>6.1}% {tf:>9.1}",
                    secs * 1e6,
                    100.0 * gbs * 1e9 / copy
                );
                json.push(format!(
                    "{{\"weight\":\"{name}\",\"out\":{out},\"in\":{inp},\"dtype\":\"{dtype}\",\"tokens\":{tokens},\"seconds\":{secs:e},\"gbytes_per_s\":{gbs:.3},\"pct_copy\":{:.2},\"tflops\":{tf:.3}}}",
                    100.0 * gbs * 1e9 / copy
                ));
            }
        }
    }
    Ok(json)
}

/// DeepSeek-V3.2's indexer selection on the GPU (`KvPool::select_on_device`:
/// staged queries, `mla_index_score_mma`, `mla_index_topk`, the positions
/// downloaded) for one token of each of 1 or 64 sequences of N keys (forks
/// of one sequence, sharing its blocks): 64 heads of 128, top 2048. The
/// whole call is timed, host work included; its scores' rate is put against
/// the bf16 matmul ceiling. Returns the JSON objects.
fn indexer_points(
    engine: &std::sync::Arc<Engine>,
    matmul_tflops: Option<f64>,
    reps: usize,
) -> Result<Vec<String>> {
    use mlart::kv::{index_row_bytes, KvPool, PoolOptions};
    let (heads, dim, topk, bs) = (64usize, 128usize, 2048usize, 64usize);
    println!(
        "\nV3.2 indexer selection (64 heads x 128, top {topk}; whole call, host staging included):\n{:>8} {:>7} {:>10} {:>9} {:>9}",
        "tokens", "N", "time us", "TFLOP/s", "% matmul"
    );
    let mut rng = Rng(0x696e6478);
    let mut json = Vec::new();
    for n in [16384usize, 131072] {
        let pool = KvPool::new(
            engine.clone(),
            PoolOptions {
                format: KvFormat::F32,
                d_qk: 8,
                num_layers: 1,
                block_size: bs,
                num_blocks: n.div_ceil(bs) + 1,
                index_dim: dim,
            },
        )?;
        pool.create_seq(0)?;
        let irow = index_row_bytes(dim);
        let mut keys = vec![0u8; n * irow];
        for row in keys.chunks_exact_mut(irow) {
            for c in &mut row[..dim] {
                // Any E4M3 code but NaN (0x7f, 0xff).
                *c = ((rng.next() as u8) % 0x7f) | ((rng.next() as u8) & 0x80);
            }
            let scale = 1.0f32 / (1 + rng.next() % 64) as f32;
            row[dim..].copy_from_slice(&scale.to_le_bytes());
        }
        let cache = vec![0u8; n * 8 * 4];
        pool.append_batch_indexed(0, &[(0, n, &cache[..])], Dtype::F32, Some(&[&keys[..]]))?;
        for id in 1..64 {
            pool.fork(0, id)?;
        }
        for tokens in [1usize, 64] {
            let seqs: Vec<u64> = (0..tokens as u64).collect();
            let q: Vec<f32> = (0..tokens * heads * dim)
                .map(|_| mlart::format::fp8::e4m3_to_f32((rng.next() as u8) % 0x7f))
                .collect();
            let w: Vec<f32> = (0..tokens * heads)
                .map(|_| (rng.next() % 7) as f32 - 3.0)
                .collect();
            let (n_tokens, pos) = (vec![1usize; tokens], vec![n - 1; tokens]);
            let mut out = vec![0i32; tokens * topk];
            let mut times = Vec::with_capacity(reps.max(3));
            for _ in 0..reps.max(3) + 1 {
                let t0 = std::time::Instant::now();
                pool.select_on_device(0, &seqs, &n_tokens, &pos, &q, &w, heads, &mut out, 0)?;
                times.push(t0.elapsed().as_secs_f64());
            }
            // The first call grows the staging area.
            times.remove(0);
            times.sort_by(f64::total_cmp);
            let secs = times[times.len() / 2];
            let tf = 2.0 * (tokens * n * heads * dim) as f64 / secs * 1e-12;
            let pct = matmul_tflops.map(|m| 100.0 * tf / m);
            println!(
                "{tokens:>8} {n:>7} {:>10.1} {tf:>9.1} {:>9}",
                secs * 1e6,
                pct.map_or("-".to_string(), |x| format!("{x:.1}%"))
            );
            json.push(format!(
                "{{\"tokens\":{tokens},\"keys\":{n},\"heads\":{heads},\"dim\":{dim},\"topk\":{topk},\"seconds\":{secs:e},\"tflops\":{tf:.3}{}}}",
                pct.map_or(String::new(), |x| format!(",\"pct_matmul\":{x:.2}"))
            ));
        }
    }
    Ok(json)
}
