//! The CUDA backend against the CPU backend on the same random cases.
//!
//! The CPU engine is the oracle here: `decode_reference.rs` and
//! `sparse_reference.rs` hold it to a float64 reference at 1e-5. Each case
//! builds a paged cache (shuffled block tables, NaN-poisoned unused slots and
//! blocks), runs one `mlart_decode_paged` call on a CPU engine and the same
//! call on a CUDA engine twice: with host pointers (the engine stages them)
//! and with device pointers (`mlart_engine_mem_alloc/copy`). The GPU computes
//! with bf16 (f16 for F16 caches) tensor-core operands and f32 accumulation,
//! so outputs are compared at the bf16 tolerance, 1e-2 relative L2, per
//! sequence; queries that see no key must be exactly 0 with lse = +inf.
//!
//! Without a usable CUDA device every test is reported as skipped, with the
//! reason, and not counted as passed: this binary has its own harness
//! (`harness = false`) whose summary line reads
//! `test result: ok. P passed; F failed; S skipped`. These tests are the GPU
//! half of the suite; `scripts/gpu-check.sh` runs them on a GPU machine.
//!
//! Without a GPU the binary then runs the same suite again on the emulated
//! driver (`kernels/emu/fake_cuda.cpp`: device memory in host memory, the
//! kernels on the CPU warp emulator), as sm_80 and (the tests whose kernels
//! differ) as sm_90 with the wgmma kernels, reported as
//! `test NAME [emulated sm_XX]`. That runs all of the
//! backend's host code with the kernels, but it is not a GPU: the hardware
//! itself stays unverified until a GPU run. Emulated kernels are slow, so
//! those runs shorten the sequences ([`len`]).

mod common;

use common::{bf16_bits, case_seed, rel_l2, sample, take_error, Dt, Engine};
use mlart::ffi::decode::*;
use mlart::ffi::device::*;
use mlart::ffi::engine::*;
use mlart::ffi::format::*;
use mlart::ffi::types::*;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::Arc;

// ---------------------------------------------------------------------------
// Engines.
// ---------------------------------------------------------------------------

struct Gpu {
    ptr: *mut mlart_engine,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        mlart_engine_free(self.ptr);
    }
}

/// Whether this process runs on the emulated driver (set for the child
/// runs `main` starts).
fn emulated() -> bool {
    std::env::var_os("MLART_FAKE_CUDA").is_some()
}

/// A sequence length for a case: as given on a GPU, an eighth of it on the
/// emulated driver (whose kernels run ~10^5 times slower).
fn len(n: usize) -> usize {
    if emulated() {
        n.div_ceil(8)
    } else {
        n
    }
}

/// A CUDA engine, or why there is none.
fn gpu() -> Result<Gpu, String> {
    let mut opts = MaybeUninit::<mlart_engine_options>::uninit();
    mlart_engine_options_init(opts.as_mut_ptr());
    // SAFETY: initialized by mlart_engine_options_init.
    let mut opts = unsafe { opts.assume_init() };
    opts.backend = MLART_BACKEND_CUDA;
    let mut ptr = std::ptr::null_mut();
    match take_error(mlart_engine_create(&opts, &mut ptr)) {
        None => Ok(Gpu { ptr }),
        Some((MLART_STATUS_UNSUPPORTED, msg)) | Some((MLART_STATUS_NOT_FOUND, msg)) => Err(msg),
        Some((code, msg)) => panic!("creating a CUDA engine failed unexpectedly: {code}: {msg}"),
    }
}

/// What a test did: ran its checks, or could not (and why).
enum Outcome {
    Ran,
    Skipped(String),
}

/// Runs `body` with a CUDA engine, or says why the test is skipped.
fn with_gpu(body: impl FnOnce(&Gpu)) -> Outcome {
    match gpu() {
        Ok(g) => {
            body(&g);
            Outcome::Ran
        }
        Err(why) => Outcome::Skipped(why),
    }
}

// ---------------------------------------------------------------------------
// Cases.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Sparse {
    topk: usize,
    with_length: bool,
    /// (topk, block size) of an extra cache.
    extra: Option<(usize, usize)>,
}

#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    s_q: usize,
    h_q: usize,
    format: mlart_kv_format,
    block_size: usize,
    q: Dt,
    out: Dt,
    causal: bool,
    /// Dense: tokens per sequence. Sparse: tokens written per sequence
    /// (indices point into them).
    seqlens: Vec<usize>,
    sparse: Option<Sparse>,
    sink: bool,
    scale: f32,
}

impl Case {
    fn d_qk(&self) -> usize {
        // Plain formats: 512 for odd head counts, to cover both kernels.
        let plain_576 = self.format != MLART_KV_FORMAT_FP8_MODEL1 && self.h_q.is_multiple_of(2);
        if self.format == MLART_KV_FORMAT_FP8_V32 || plain_576 {
            576
        } else {
            512
        }
    }
}

/// One paged cache: bytes, block count, and where each sequence's tokens are.
struct Cache {
    bytes: Vec<u8>,
    num_blocks: usize,
    block_size: usize,
    /// Block table, `[batch, stride]`.
    table: Vec<i32>,
    stride: usize,
}

fn block_bytes(format: mlart_kv_format, d_qk: usize, bs: usize) -> usize {
    let mut n = 0usize;
    assert!(take_error(mlart_kv_block_bytes(format, d_qk as i32, bs as i32, &mut n)).is_none());
    n
}

fn row_bytes(format: mlart_kv_format, d_qk: usize) -> usize {
    let mut n = 0usize;
    assert!(take_error(mlart_kv_row_bytes(format, d_qk as i32, &mut n)).is_none());
    n
}

/// Fills every slot of `blocks` blocks with random rows, then poisons the
/// slots `used(block, slot)` says are unused (NaN in plain formats, 0xff
/// bytes, NaN codes and scales, in FP8 ones).
fn build_cache(
    rng: &mut SmallRng,
    format: mlart_kv_format,
    d_qk: usize,
    bs: usize,
    blocks: usize,
    used: &dyn Fn(usize, usize) -> bool,
) -> Vec<u8> {
    let bb = block_bytes(format, d_qk, bs);
    let mut cache = vec![0u8; bb * blocks];
    let src: Vec<f32> = (0..blocks * bs * d_qk).map(|_| sample(rng)).collect();
    assert!(take_error(mlart_kv_quantize(
        format,
        d_qk as i32,
        bs as i32,
        (blocks * bs) as i32,
        MLART_DTYPE_F32,
        src.as_ptr() as *const c_void,
        cache.as_mut_ptr() as *mut c_void,
    ))
    .is_none());
    let rb = row_bytes(format, d_qk);
    for b in 0..blocks {
        for s in 0..bs {
            if used(b, s) {
                continue;
            }
            let block = &mut cache[b * bb..(b + 1) * bb];
            if format == MLART_KV_FORMAT_FP8_MODEL1 {
                block[s * 576..(s + 1) * 576].fill(0xff);
                block[bs * 576 + s * 8..bs * 576 + s * 8 + 7].fill(0xff);
            } else if format == MLART_KV_FORMAT_FP8_V32 {
                block[s * rb..(s + 1) * rb].fill(0xff);
            } else {
                // All-ones is a NaN in f32, bf16 and f16.
                block[s * rb..(s + 1) * rb].fill(0xff);
            }
        }
    }
    cache
}

/// Dense cache: each sequence's blocks drawn from a shuffled pool with
/// spare blocks; slots past each length poisoned.
fn dense_cache(rng: &mut SmallRng, c: &Case) -> Cache {
    let bs = c.block_size;
    let stride = c
        .seqlens
        .iter()
        .map(|&l| l.div_ceil(bs))
        .max()
        .unwrap_or(0)
        .max(1)
        + 1;
    let need: usize = c.seqlens.iter().map(|&l| l.div_ceil(bs)).sum();
    let blocks = need + 3;
    let mut ids: Vec<i32> = (0..blocks as i32).collect();
    ids.shuffle(rng);
    let mut table = vec![-7i32; c.batch * stride];
    let mut owner = vec![None; blocks];
    let mut next = 0;
    for (b, &l) in c.seqlens.iter().enumerate() {
        for j in 0..l.div_ceil(bs) {
            let id = ids[next];
            next += 1;
            table[b * stride + j] = id;
            owner[id as usize] = Some((b, j));
        }
    }
    let seqlens = c.seqlens.clone();
    let used = move |blk: usize, slot: usize| match owner[blk] {
        Some((b, j)) => j * bs + slot < seqlens[b],
        None => false,
    };
    let bytes = build_cache(rng, c.format, c.d_qk(), bs, blocks, &used);
    Cache {
        bytes,
        num_blocks: blocks,
        block_size: bs,
        table,
        stride,
    }
}

/// Sparse cache of `blocks` blocks where a random third of the slots are
/// poisoned; returns it and the positions that hold real rows.
fn sparse_cache(
    rng: &mut SmallRng,
    format: mlart_kv_format,
    d_qk: usize,
    bs: usize,
    blocks: usize,
) -> (Vec<u8>, Vec<i32>) {
    let live: Vec<bool> = (0..blocks * bs)
        .map(|_| rng.random_range(0..3) != 0)
        .collect();
    let l2 = live.clone();
    let bytes = build_cache(rng, format, d_qk, bs, blocks, &move |b, s| l2[b * bs + s]);
    let pos = (0..blocks * bs)
        .filter(|&p| live[p])
        .map(|p| p as i32)
        .collect();
    (bytes, pos)
}

/// `n` picks from `live`, about one in eight -1; all -1 when nothing is
/// live (every sequence empty).
fn random_indices(rng: &mut SmallRng, n: usize, live: &[i32]) -> Vec<i32> {
    (0..n)
        .map(|_| {
            if live.is_empty() || rng.random_range(0..8) == 0 {
                -1
            } else {
                live[rng.random_range(0..live.len())]
            }
        })
        .collect()
}

/// Everything a call reads, in host memory.
struct Inputs {
    q: Vec<u8>,
    main: Cache,
    seqlens: Vec<i32>,
    indices: Vec<i32>,
    topk_length: Vec<i32>,
    extra: Option<Cache>,
    extra_indices: Vec<i32>,
    extra_topk_length: Vec<i32>,
    sink: Vec<f32>,
}

fn inputs(c: &Case, seed: u64) -> Inputs {
    let mut rng = SmallRng::seed_from_u64(seed);
    let d_qk = c.d_qk();
    let mut q = Vec::new();
    for _ in 0..c.batch * c.s_q * c.h_q * d_qk {
        c.q.push(sample(&mut rng), &mut q);
    }
    let sink = (0..c.h_q)
        .map(|h| match h % 5 {
            0 => f32::NEG_INFINITY,
            1 => 3.0,
            _ => rng.random_range(-2.0..2.0),
        })
        .collect();
    let rows = c.batch * c.s_q;
    match &c.sparse {
        None => {
            let main = dense_cache(&mut rng, c);
            Inputs {
                q,
                main,
                seqlens: c.seqlens.iter().map(|&l| l as i32).collect(),
                indices: Vec::new(),
                topk_length: Vec::new(),
                extra: None,
                extra_indices: Vec::new(),
                extra_topk_length: Vec::new(),
                sink,
            }
        }
        Some(sp) => {
            let blocks = c.seqlens.iter().sum::<usize>().div_ceil(c.block_size) + 2;
            let (bytes, live) = sparse_cache(&mut rng, c.format, d_qk, c.block_size, blocks);
            let indices = random_indices(&mut rng, rows * sp.topk, &live);
            let topk_length = (0..c.batch)
                .map(|b| match b % 4 {
                    0 => 0,
                    1 => sp.topk as i32,
                    _ => rng.random_range(0..=sp.topk as i32),
                })
                .collect();
            let (extra, extra_indices, extra_topk_length) = match sp.extra {
                None => (None, Vec::new(), Vec::new()),
                Some((xtopk, xbs)) => {
                    let xblocks = 3 + xtopk / xbs;
                    let (xbytes, xlive) = sparse_cache(&mut rng, c.format, d_qk, xbs, xblocks);
                    let xi = random_indices(&mut rng, rows * xtopk, &xlive);
                    let xl = (0..c.batch)
                        .map(|_| rng.random_range(0..=xtopk as i32))
                        .collect();
                    (
                        Some(Cache {
                            bytes: xbytes,
                            num_blocks: xblocks,
                            block_size: xbs,
                            table: Vec::new(),
                            stride: 0,
                        }),
                        xi,
                        xl,
                    )
                }
            };
            Inputs {
                q,
                main: Cache {
                    bytes,
                    num_blocks: blocks,
                    block_size: c.block_size,
                    table: Vec::new(),
                    stride: 0,
                },
                seqlens: Vec::new(),
                indices,
                topk_length,
                extra,
                extra_indices,
                extra_topk_length,
                sink,
            }
        }
    }
}

/// Pointers for one call: host memory as is, or device copies.
struct Placed {
    ptrs: Vec<*mut c_void>,
    engine: *mut mlart_engine,
}

impl Drop for Placed {
    fn drop(&mut self) {
        for &p in &self.ptrs {
            assert!(take_error(mlart_engine_mem_free(self.engine, p)).is_none());
        }
    }
}

impl Placed {
    /// Copies `bytes` to new device memory (NULL for an empty slice).
    fn put(&mut self, bytes: &[u8]) -> *mut c_void {
        if bytes.is_empty() {
            return std::ptr::null_mut();
        }
        let mut p = std::ptr::null_mut();
        assert!(take_error(mlart_engine_mem_alloc(self.engine, bytes.len(), &mut p)).is_none());
        self.ptrs.push(p);
        assert!(take_error(mlart_engine_mem_copy(
            self.engine,
            p,
            MLART_MEMORY_DEVICE,
            bytes.as_ptr() as *const c_void,
            MLART_MEMORY_HOST,
            bytes.len(),
        ))
        .is_none());
        p
    }

    fn get(&self, dst: &mut [u8], src: *const c_void) {
        assert!(take_error(mlart_engine_mem_copy(
            self.engine,
            dst.as_mut_ptr() as *mut c_void,
            MLART_MEMORY_HOST,
            src,
            MLART_MEMORY_DEVICE,
            dst.len(),
        ))
        .is_none());
    }
}

fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain i32/f32 data viewed as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

#[derive(Clone, Copy, PartialEq)]
enum Where {
    Host,
    Device,
}

/// Runs the case on `engine` and returns (out as f64, lse).
fn run(engine: *mut mlart_engine, c: &Case, inp: &Inputs, place: Where) -> (Vec<f64>, Vec<f32>) {
    let d_qk = c.d_qk();
    let out_len = c.batch * c.s_q * c.h_q * 512 * c.out.size();
    let lse_len = c.batch * c.h_q * c.s_q;
    let mut out = vec![0xffu8; out_len];
    let mut lse = vec![f32::NAN; lse_len];
    let mut a = MaybeUninit::<mlart_decode_args>::uninit();
    mlart_decode_args_init(a.as_mut_ptr());
    // SAFETY: initialized above.
    let mut a = unsafe { a.assume_init() };
    a.batch = c.batch as i32;
    a.s_q = c.s_q as i32;
    a.h_q = c.h_q as i32;
    a.d_qk = d_qk as i32;
    a.d_v = 512;
    a.softmax_scale = c.scale;
    a.causal = c.causal;
    a.q_dtype = c.q.dtype();
    a.out_dtype = c.out.dtype();
    a.kv_format = c.format;
    a.num_blocks = inp.main.num_blocks as i32;
    a.block_size = inp.main.block_size as i32;
    let mut pl = Placed {
        ptrs: Vec::new(),
        engine,
    };
    let mut put = |v: &[u8]| -> *mut c_void {
        match place {
            Where::Host if v.is_empty() => std::ptr::null_mut(),
            Where::Host => v.as_ptr() as *mut c_void,
            Where::Device => pl.put(v),
        }
    };
    a.q = put(&inp.q);
    a.kv = put(&inp.main.bytes);
    if let Some(sp) = &c.sparse {
        a.indices = put(bytes_of(&inp.indices)) as *const i32;
        a.topk = sp.topk as i32;
        if sp.with_length {
            a.topk_length = put(bytes_of(&inp.topk_length)) as *const i32;
        }
        if let Some(x) = &inp.extra {
            a.extra_kv = put(&x.bytes);
            a.extra_num_blocks = x.num_blocks as i32;
            a.extra_block_size = x.block_size as i32;
            a.extra_indices = put(bytes_of(&inp.extra_indices)) as *const i32;
            a.extra_topk = sp.extra.map_or(0, |x| x.0) as i32;
            a.extra_topk_length = put(bytes_of(&inp.extra_topk_length)) as *const i32;
        }
    } else {
        a.block_table = put(bytes_of(&inp.main.table)) as *const i32;
        a.block_table_stride = inp.main.stride as i32;
        a.seqlens = put(bytes_of(&inp.seqlens)) as *const i32;
    }
    if c.sink {
        a.attn_sink = put(bytes_of(&inp.sink)) as *const f32;
    }
    let (dout, dlse) = match place {
        Where::Host => (out.as_mut_ptr() as *mut c_void, lse.as_mut_ptr()),
        Where::Device => {
            let o = pl.put(&out);
            let l = pl.put(bytes_of(&lse));
            (o, l as *mut f32)
        }
    };
    a.memory = if place == Where::Host {
        MLART_MEMORY_HOST
    } else {
        MLART_MEMORY_DEVICE
    };
    a.out = dout;
    a.lse = dlse;
    if let Some((code, msg)) = take_error(mlart_decode_paged(engine, &a)) {
        panic!("decode failed: {code}: {msg}; {c:?}");
    }
    if place == Where::Device {
        pl.get(&mut out, dout);
        let mut lb = vec![0u8; lse_len * 4];
        pl.get(&mut lb, dlse as *const c_void);
        lse = lb
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
    }
    (c.out.read_all(&out), lse)
}

/// CPU vs both GPU paths for one case.
fn check_case(gpu: &Gpu, cpu: &Engine, c: &Case, seed: u64) {
    let inp = inputs(c, seed);
    let (want, want_lse) = run(cpu.ptr, c, &inp, Where::Host);
    for place in [Where::Host, Where::Device] {
        let (got, got_lse) = run(gpu.ptr, c, &inp, place);
        let what = format!(
            "{} pointers, seed {seed:#x}, {c:?}",
            if place == Where::Host {
                "host"
            } else {
                "device"
            }
        );
        if let Some(i) = got.iter().position(|x| !x.is_finite()) {
            panic!("out[{i}] = {} is not finite; {what}", got[i]);
        }
        let row = c.s_q * c.h_q * 512;
        for b in 0..c.batch {
            let s = b * row..(b + 1) * row;
            let (g, w) = (&got[s.clone()], &want[s]);
            if w.iter().all(|&x| x == 0.0) {
                assert!(g.iter().all(|&x| x == 0.0), "sequence {b}: want 0; {what}");
                continue;
            }
            // Rows the CPU leaves at exactly 0 see no key: the GPU must too.
            for (r, (gr, wr)) in g.chunks(512).zip(w.chunks(512)).enumerate() {
                if wr.iter().all(|&x| x == 0.0) {
                    assert!(
                        gr.iter().all(|&x| x == 0.0),
                        "seq {b} row {r}: want 0; {what}"
                    );
                }
            }
            let e = rel_l2(g, w);
            assert!(e <= 1e-2, "sequence {b}: rel L2 {e:.3e} > 1e-2; {what}");
        }
        for (j, (&g, &w)) in got_lse.iter().zip(&want_lse).enumerate() {
            if w == f32::INFINITY {
                assert_eq!(g, f32::INFINITY, "lse[{j}]; {what}");
            } else {
                // bf16 operands: the score error grows with |score|.
                let tol = 2e-2 + 4e-3 * w.abs();
                assert!((g - w).abs() <= tol, "lse[{j}] = {g}, want {w}; {what}");
            }
        }
    }
}

const FORMATS: [mlart_kv_format; 5] = [
    MLART_KV_FORMAT_BF16,
    MLART_KV_FORMAT_F16,
    MLART_KV_FORMAT_F32,
    MLART_KV_FORMAT_FP8_V32,
    MLART_KV_FORMAT_FP8_MODEL1,
];
const DTS: [Dt; 3] = [Dt::Bf16, Dt::F16, Dt::F32];

fn lengths(rng: &mut SmallRng, batch: usize, max: usize, bs: usize) -> Vec<usize> {
    let special = [0, 1, bs, bs + 1, max];
    (0..batch)
        .map(|b| {
            if b < special.len() && rng.random_bool(0.5) {
                special[b].min(max)
            } else {
                rng.random_range(0..=max)
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

/// Every format x q/out dtype x block size, dense, with and without causal MTP.
fn cuda_dense_matrix() -> Outcome {
    with_gpu(|g| {
        let cpu = Engine::new(2);
        let mut n = 0u64;
        for (fi, &format) in FORMATS.iter().enumerate() {
            for (bi, &bs) in [1usize, 64, 100].iter().enumerate() {
                for (hi, &h_q) in [1usize, 16, 64, 128].iter().enumerate() {
                    let seed = case_seed(61, n);
                    let mut rng = SmallRng::seed_from_u64(seed);
                    let batch = 1 + (n as usize * 3) % 6;
                    let s_q = [1, 2, 3][(fi + bi + hi) % 3];
                    let max = len(if h_q >= 64 { 700 } else { 2500 });
                    let c = Case {
                        batch,
                        s_q,
                        h_q,
                        format,
                        block_size: bs,
                        q: DTS[(fi + hi) % 3],
                        out: DTS[(bi + hi + 1) % 3],
                        causal: s_q > 1 && n.is_multiple_of(2),
                        seqlens: lengths(&mut rng, batch, max, bs),
                        sparse: None,
                        sink: n % 3 == 1,
                        scale: [0.0, 0.3, 4.0][n as usize % 3],
                    };
                    check_case(g, &cpu, &c, seed);
                    n += 1;
                }
            }
        }
        println!("cuda_dense_matrix: {n} cases");
    })
}

/// Long sequences: the plan splits them and the combine kernel merges.
fn cuda_split_kv() -> Outcome {
    with_gpu(|g| {
        let cpu = Engine::new(2);
        for (n, &(batch, len, h_q)) in [(1usize, 16384usize, 16usize), (2, 9000, 128), (3, 4097, 1)]
            .iter()
            .enumerate()
        {
            let seed = case_seed(62, n as u64);
            let c = Case {
                batch,
                s_q: 1,
                h_q,
                format: [
                    MLART_KV_FORMAT_BF16,
                    MLART_KV_FORMAT_FP8_V32,
                    MLART_KV_FORMAT_F16,
                ][n],
                block_size: 64,
                q: Dt::Bf16,
                out: Dt::Bf16,
                causal: false,
                seqlens: (0..batch).map(|b| self::len(len - b * 1000)).collect(),
                sparse: None,
                sink: n == 1,
                // 4.0: score logits of spread ~1, so a wrong score shows in
                // the output (at the default scale these random scores are
                // ~0.01 and the attention is nearly uniform).
                scale: [4.0, 4.0, 0.0][n],
            };
            check_case(g, &cpu, &c, seed);
        }
    })
}

/// Sparse indices (with -1 entries), topk_length, an extra cache and the sink.
fn cuda_sparse_matrix() -> Outcome {
    with_gpu(|g| {
        let cpu = Engine::new(2);
        let mut n = 0u64;
        for &format in &FORMATS {
            for (hi, &h_q) in [1usize, 16, 64, 128].iter().enumerate() {
                for extra in [false, true] {
                    let seed = case_seed(63, n);
                    let mut rng = SmallRng::seed_from_u64(seed);
                    let batch = 1 + n as usize % 4;
                    let topk = [64, 100, 2048, 33][(hi + extra as usize) % 4];
                    let c = Case {
                        batch,
                        s_q: 1 + n as usize % 2,
                        h_q,
                        format,
                        block_size: [64, 1, 100][n as usize % 3],
                        q: DTS[n as usize % 3],
                        out: DTS[(n as usize + 1) % 3],
                        causal: false,
                        seqlens: lengths(&mut rng, batch, len(3000), 64),
                        sparse: Some(Sparse {
                            topk,
                            with_length: !n.is_multiple_of(3),
                            extra: extra.then_some((96, [64, 100][n as usize % 2])),
                        }),
                        sink: n.is_multiple_of(2),
                        scale: [4.0, 0.0, 4.0][n as usize % 3],
                    };
                    check_case(g, &cpu, &c, seed);
                    n += 1;
                }
            }
        }
        println!("cuda_sparse_matrix: {n} cases");
    })
}

/// The dense BF16 case `device_dense_args` expects: 2 sequences, 16 heads.
fn dense_bf16_case(seqlens: Vec<usize>) -> Case {
    Case {
        batch: 2,
        s_q: 1,
        h_q: 16,
        format: MLART_KV_FORMAT_BF16,
        block_size: 64,
        q: Dt::Bf16,
        out: Dt::Bf16,
        causal: false,
        seqlens,
        sparse: None,
        sink: false,
        scale: 0.0,
    }
}

/// Dense BF16 args for 2 sequences x 16 heads (d_qk 576) over device
/// copies of `inp`; `out` is left to the caller.
fn device_dense_args(pl: &mut Placed, inp: &Inputs) -> mlart_decode_args {
    let mut a = MaybeUninit::<mlart_decode_args>::uninit();
    mlart_decode_args_init(a.as_mut_ptr());
    // SAFETY: initialized above.
    let mut a = unsafe { a.assume_init() };
    a.memory = MLART_MEMORY_DEVICE;
    a.batch = 2;
    a.h_q = 16;
    a.d_qk = 576;
    a.d_v = 512;
    a.num_blocks = inp.main.num_blocks as i32;
    a.q = pl.put(&inp.q);
    a.kv = pl.put(&inp.main.bytes);
    a.block_table = pl.put(bytes_of(&inp.main.table)) as *const i32;
    a.block_table_stride = inp.main.stride as i32;
    a.seqlens = pl.put(bytes_of(&inp.seqlens)) as *const i32;
    a
}

/// Bad device-resident block ids and indices are masked and reported as
/// INVALID_ARGUMENT after the (synchronous) call, never read.
fn cuda_device_memory_errors() -> Outcome {
    with_gpu(|g| {
        let c = dense_bf16_case(vec![100, 200]);
        let mut inp = inputs(&c, 9);
        inp.main.table[1] = 1_000_000;
        let mut pl = Placed {
            ptrs: Vec::new(),
            engine: g.ptr,
        };
        let mut a = device_dense_args(&mut pl, &inp);
        a.out = pl.put(&vec![0u8; 2 * 16 * 512 * 2]);
        let e = take_error(mlart_decode_paged(g.ptr, &a)).expect("bad block id must fail");
        assert_eq!(e.0, MLART_STATUS_INVALID_ARGUMENT, "{}", e.1);
        assert!(e.1.contains("block_table"), "{}", e.1);
        // Misaligned cache pointer: rejected before any launch.
        let good_kv = a.kv;
        a.kv = (a.kv as usize + 2) as *const c_void;
        let e = take_error(mlart_decode_paged(g.ptr, &a)).expect("misaligned kv must fail");
        assert!(e.1.contains("kv") && e.1.contains("aligned"), "{}", e.1);
        a.kv = good_kv;
        // A host pointer where device memory is promised, and a device
        // buffer too small for the call: named, never launched.
        let host_q = inp.q.clone();
        let dev_q = a.q;
        a.q = host_q.as_ptr() as *const c_void;
        let e = take_error(mlart_decode_paged(g.ptr, &a)).expect("host q must fail");
        assert_eq!(e.0, MLART_STATUS_INVALID_ARGUMENT, "{}", e.1);
        assert!(
            e.1.contains("q = ") && e.1.contains("not memory of a CUDA device"),
            "{}",
            e.1
        );
        a.q = dev_q;
        a.out = pl.put(&[0u8; 100]);
        let e = take_error(mlart_decode_paged(g.ptr, &a)).expect("short out must fail");
        assert!(
            e.1.contains("out = ") && e.1.contains("past the end"),
            "{}",
            e.1
        );
    })
}

/// The device plan equals its host twin (`launch::host_plan`).
fn cuda_plan_matches_host_twin() -> Outcome {
    use mlart::backend::cuda::args::{DenseDev, DeviceDecode, KeysDev};
    use mlart::backend::cuda::launch::host_plan;
    use mlart::decode::DecodeShape;
    use mlart::format::{Dtype, KvFormat, KvLayout};
    let engine = match mlart::Engine::new(&mlart::EngineOptions {
        backend: mlart::BackendRequest::Cuda,
        ..Default::default()
    }) {
        Ok(e) => e,
        Err(e) => return Outcome::Skipped(e.message),
    };
    let cuda = engine
        .backend()
        .cuda()
        .expect("a CUDA engine has a CUDA backend");
    let mut rng = SmallRng::seed_from_u64(case_seed(64, 0));
    for round in 0..20 {
        let batch = rng.random_range(1..300);
        let lens: Vec<i32> = (0..batch)
            .map(|_| match rng.random_range(0..4) {
                0 => 0,
                1 => rng.random_range(1..100),
                _ => rng.random_range(1..30000),
            })
            .collect();
        let h_q = [1, 16, 128][round % 3];
        let shape = DecodeShape::new(batch, 1, h_q, 576, 512, 0.0, false).unwrap();
        let stride = 30000usize.div_ceil(64);
        let seqlens = cuda.mem_alloc(4 * batch as usize).unwrap();
        cuda.mem_copy(seqlens, lens.as_ptr() as usize as u64, 4 * batch as usize)
            .unwrap();
        let a = DeviceDecode {
            shape,
            q_dtype: Dtype::Bf16,
            out_dtype: Dtype::Bf16,
            layout: KvLayout::new(KvFormat::Bf16, 576, 64, "kv_format").unwrap(),
            q: 0,
            kv: 0,
            num_blocks: 1,
            keys: KeysDev::Dense(DenseDev {
                block_table: 0,
                stride,
                seqlens,
            }),
            sink: 0,
            out: 0,
            lse: 0,
            stream: 0,
        };
        let (got, geo) = cuda.device_plan(&a).unwrap();
        cuda.mem_free(seqlens).unwrap();
        let keys: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
        let want = host_plan(&keys, geo.parts);
        assert_eq!(got.groups, want.groups, "round {round}");
        assert_eq!(got.items, want.items, "round {round}");
        assert_eq!(got.part_first, want.part_first, "round {round}");
        let items = got.items;
        assert!(items.len() <= geo.max_items);
    }
    Outcome::Ran
}

/// A CUDA engine and a CPU engine through the Rust API, or why there is no
/// CUDA engine.
fn rust_engines() -> Result<(std::sync::Arc<mlart::Engine>, std::sync::Arc<mlart::Engine>), String>
{
    let gpu = mlart::Engine::new(&mlart::EngineOptions {
        backend: mlart::BackendRequest::Cuda,
        ..Default::default()
    })
    .map_err(|e| e.message)?;
    let cpu = mlart::Engine::new(&mlart::EngineOptions {
        backend: mlart::BackendRequest::Cpu,
        ..Default::default()
    })
    .map_err(|e| e.message)?;
    Ok((Arc::new(gpu), Arc::new(cpu)))
}

/// A device-resident pool (CUDA engine) against a host pool (CPU engine)
/// through the same appends (new blocks, copy-on-write after a fork,
/// truncation, several layers and formats) and decodes (dense with causal
/// MTP, sparse on logical positions).
fn cuda_pool_matches_cpu_pool() -> Outcome {
    use mlart::decode::desc::DecodeOutput;
    use mlart::decode::DecodeShape;
    use mlart::format::{Dtype, KvFormat};
    use mlart::kv::{KvPool, PoolOptions, PoolSparse};
    let (gpu, cpu) = match rust_engines() {
        Ok(pair) => pair,
        Err(why) => return Outcome::Skipped(why),
    };
    let mut rng = SmallRng::seed_from_u64(case_seed(65, 0));
    for (fi, format) in [
        KvFormat::Bf16,
        KvFormat::F16,
        KvFormat::F32,
        KvFormat::Fp8V32,
        KvFormat::Fp8Model1,
    ]
    .into_iter()
    .enumerate()
    {
        let d_qk = if format == KvFormat::Fp8Model1 {
            512
        } else {
            576
        };
        let bs = [16, 64, 7][fi % 3];
        let opts = PoolOptions {
            format,
            d_qk,
            num_layers: 2,
            block_size: bs,
            num_blocks: 64,
            index_dim: 0,
        };
        let pools = [
            KvPool::new(cpu.clone(), opts).unwrap(),
            KvPool::new(gpu.clone(), opts).unwrap(),
        ];
        let dtype = [Dtype::Bf16, Dtype::F32][fi % 2];
        let rows = |rng: &mut SmallRng, n: usize| -> Vec<u8> {
            let mut v = Vec::new();
            for _ in 0..n * d_qk {
                let x = sample(rng);
                match dtype {
                    Dtype::F32 => v.extend_from_slice(&x.to_le_bytes()),
                    _ => v.extend_from_slice(&bf16_bits(x).to_le_bytes()),
                }
            }
            v
        };
        let (r1, r2, r3, r2b) = (
            rows(&mut rng, 37),
            rows(&mut rng, 5),
            rows(&mut rng, 20),
            rows(&mut rng, 9),
        );
        for p in &pools {
            p.create_seq(1).unwrap();
            p.create_seq(2).unwrap();
            for layer in 0..2 {
                p.append_batch(layer, &[(1, 37, &r1[..]), (2, 5, &r2[..])], dtype)
                    .unwrap();
            }
            p.fork(1, 3).unwrap();
            for layer in 0..2 {
                p.append(3, layer, 20, dtype, &r3).unwrap();
            }
            p.truncate(2, 3).unwrap();
            for layer in 0..2 {
                p.append(2, layer, 9, dtype, &r2b).unwrap();
            }
        }
        let (h_q, s_q) = (16, 2);
        let seqs = [1u64, 3, 2];
        let shape = DecodeShape::new(3, s_q, h_q, d_qk as i32, 512, 0.0, true).unwrap();
        let mut q = Vec::new();
        for _ in 0..shape.q_elems() {
            q.extend_from_slice(&bf16_bits(sample(&mut rng)).to_le_bytes());
        }
        let topk = 24;
        let lens = [37i32, 57, 12];
        let indices: Vec<i32> = (0..3 * s_q as usize * topk)
            .map(|i| {
                let b = i / (s_q as usize * topk);
                if i % 5 == 0 {
                    -1
                } else {
                    rng.random_range(0..lens[b])
                }
            })
            .collect();
        for layer in 0..2 {
            for sparse in [false, true] {
                let mut shape = shape;
                shape.causal = !sparse;
                let mut got = Vec::new();
                for p in &pools {
                    let mut out = vec![0u8; shape.out_elems() * 4];
                    let mut lse = vec![0f32; shape.lse_elems()];
                    let mut o =
                        DecodeOutput::new(&shape, Dtype::F32, &mut out, Some(&mut lse)).unwrap();
                    let sp = sparse.then_some(PoolSparse {
                        indices: &indices,
                        topk,
                        topk_length: None,
                    });
                    p.decode(layer, &seqs, shape, Dtype::Bf16, &q, sp, None, &mut o)
                        .unwrap();
                    got.push(Dt::F32.read_all(&out));
                }
                let e = rel_l2(&got[1], &got[0]);
                assert!(
                    e <= 1e-2,
                    "{format:?} layer {layer} sparse {sparse}: rel L2 {e:.3e}"
                );
            }
        }
    }
    Outcome::Ran
}

/// `mlart_kv_pool_decode` with the queries, output and lse in device memory
/// (a CUDA engine's pool): byte for byte what the same pool gives for host
/// memory, waited for (stream NULL) and on a caller's stream; dense causal
/// with two query tokens, sparse with `topk_length` and a sink (those stay
/// host memory). A CPU engine's pool refuses device memory by name, and a
/// device call needs `q` and `out`.
fn cuda_pool_decode_device_memory() -> Outcome {
    use cudarc::driver::result;
    use mlart::ffi::pool::*;
    with_gpu(|g| {
        let (d_qk, d_v, h_q, s_q, bs) = (576usize, 512usize, 16usize, 2usize, 16);
        let new_pool = |engine: *mut mlart_engine| {
            let mut o = MaybeUninit::<mlart_kv_pool_options>::uninit();
            mlart_kv_pool_options_init(o.as_mut_ptr());
            // SAFETY: initialized just above.
            let mut o = unsafe { o.assume_init() };
            o.kv_format = MLART_KV_FORMAT_BF16;
            o.d_qk = d_qk as i32;
            o.block_size = bs;
            o.num_blocks = 16;
            let mut p = std::ptr::null_mut();
            assert!(take_error(mlart_kv_pool_create(engine, &o, &mut p)).is_none());
            p
        };
        let pool = new_pool(g.ptr);
        let mut rng = SmallRng::seed_from_u64(case_seed(71, 0));
        let seqs = [5u64, 9];
        for (&id, n) in seqs.iter().zip([37usize, 12]) {
            assert!(take_error(mlart_kv_seq_create(pool, id)).is_none());
            let rows: Vec<f32> = (0..n * d_qk).map(|_| sample(&mut rng)).collect();
            let rows_ptr = rows.as_ptr() as *const c_void;
            let e = mlart_kv_append(pool, id, 0, n as i32, MLART_DTYPE_F32, rows_ptr);
            assert!(take_error(e).is_none());
        }
        let q: Vec<u8> = (0..seqs.len() * s_q * h_q * d_qk)
            .flat_map(|_| bf16_bits(sample(&mut rng)).to_le_bytes())
            .collect();
        let topk = 8usize;
        let indices: Vec<i32> = (0..seqs.len() * s_q * topk)
            .map(|i| {
                if i % 7 == 3 {
                    -1
                } else {
                    rng.random_range(0..12)
                }
            })
            .collect();
        let topk_length = [8i32, 5];
        let sink: Vec<f32> = (0..h_q).map(|_| sample(&mut rng)).collect();
        let (out_bytes, lse_n) = (seqs.len() * s_q * h_q * d_v * 2, seqs.len() * h_q * s_q);
        let args = |sparse: bool| {
            let mut a = MaybeUninit::<mlart_kv_pool_decode_args>::uninit();
            mlart_kv_pool_decode_args_init(a.as_mut_ptr());
            // SAFETY: initialized just above.
            let mut a = unsafe { a.assume_init() };
            a.batch = seqs.len() as i32;
            a.seq_ids = seqs.as_ptr();
            a.s_q = s_q as i32;
            a.h_q = h_q as i32;
            a.d_v = d_v as i32;
            a.causal = !sparse;
            if sparse {
                a.indices = indices.as_ptr();
                a.topk = topk as i32;
                a.topk_length = topk_length.as_ptr();
                a.attn_sink = sink.as_ptr();
            }
            a
        };
        let mut pl = Placed {
            ptrs: Vec::new(),
            engine: g.ptr,
        };
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking).unwrap();
        for sparse in [false, true] {
            let mut want = vec![0u8; out_bytes];
            let mut want_lse = vec![0f32; lse_n];
            let mut a = args(sparse);
            a.q = q.as_ptr() as *const c_void;
            a.out = want.as_mut_ptr() as *mut c_void;
            a.lse = want_lse.as_mut_ptr();
            assert!(take_error(mlart_kv_pool_decode(pool, &a)).is_none());
            for on_stream in [false, true] {
                let qd = pl.put(&q);
                let od = pl.put(&vec![0xffu8; out_bytes]);
                let ld = pl.put(&vec![0xffu8; 4 * lse_n]);
                let mut a = args(sparse);
                a.memory = MLART_MEMORY_DEVICE;
                a.q = qd;
                a.out = od;
                a.lse = ld as *mut f32;
                if on_stream {
                    a.stream = stream as *mut c_void;
                }
                assert!(take_error(mlart_kv_pool_decode(pool, &a)).is_none());
                if on_stream {
                    // SAFETY: our stream.
                    unsafe { result::stream::synchronize(stream) }.unwrap();
                }
                let mut got = vec![0u8; out_bytes];
                let mut got_lse = vec![0u8; 4 * lse_n];
                pl.get(&mut got, od);
                pl.get(&mut got_lse, ld);
                assert!(
                    got == want,
                    "sparse {sparse} stream {on_stream}: device-memory output differs"
                );
                assert!(
                    got_lse == bytes_of(&want_lse),
                    "sparse {sparse} stream {on_stream}: device-memory lse differs"
                );
            }
        }
        // A device call needs q and out.
        let mut a = args(false);
        a.memory = MLART_MEMORY_DEVICE;
        a.out = pl.put(&vec![0u8; out_bytes]);
        let (code, msg) = take_error(mlart_kv_pool_decode(pool, &a)).expect("q is NULL");
        assert_eq!(code, MLART_STATUS_NULL_POINTER, "{msg}");
        assert!(msg.contains("q"), "{msg}");
        // SAFETY: our stream, idle.
        unsafe { result::stream::destroy(stream) }.unwrap();
        mlart_kv_pool_free(pool);
        // A CPU engine's pool reads host memory only.
        let mut o = MaybeUninit::<mlart_engine_options>::uninit();
        mlart_engine_options_init(o.as_mut_ptr());
        // SAFETY: initialized just above.
        let mut o = unsafe { o.assume_init() };
        o.backend = MLART_BACKEND_CPU;
        let mut cpu = std::ptr::null_mut();
        assert!(take_error(mlart_engine_create(&o, &mut cpu)).is_none());
        let cpu_pool = new_pool(cpu);
        assert!(take_error(mlart_kv_seq_create(cpu_pool, 5)).is_none());
        assert!(take_error(mlart_kv_seq_create(cpu_pool, 9)).is_none());
        let mut a = args(false);
        a.memory = MLART_MEMORY_DEVICE;
        a.q = q.as_ptr() as *const c_void;
        let mut out = vec![0u8; out_bytes];
        a.out = out.as_mut_ptr() as *mut c_void;
        let (code, msg) = take_error(mlart_kv_pool_decode(cpu_pool, &a)).expect("refused");
        assert_eq!(code, MLART_STATUS_UNSUPPORTED, "{msg}");
        assert!(msg.contains("MLART_MEMORY_DEVICE"), "{msg}");
        mlart_kv_pool_free(cpu_pool);
        mlart_engine_free(cpu);
    })
}

/// DeepSeek-V3.2's indexer over a device pool (keys kept and scored on the
/// GPU: `mla_index_scatter`, `mla_index_score`, `mla_index_topk`) chooses
/// exactly what the CPU's `indexer::select` chooses over a host pool given
/// the same keys. The values are small integers times powers of two, so
/// every score is exact in f32 whatever the order of its sums, and the many
/// equal scores test the tie-break (the earlier position). Keys go in
/// through several appends, a fork whose next append copies a shared block
/// (copy-on-write of the keys), and a truncation; the queries are a decode
/// token, a prefill chunk, a sequence shorter than topk (all positions),
/// and one exactly topk + 1 long.
fn cuda_indexer_matches_cpu() -> Outcome {
    use mlart::format::fp8::{e4m3_to_f32, f32_to_e4m3};
    use mlart::format::{Dtype, KvFormat};
    use mlart::kv::{index_row_bytes, KvPool, PoolOptions};
    use mlart::model::level::Level;
    let (gpu, cpu) = match rust_engines() {
        Ok(pair) => pair,
        Err(why) => return Outcome::Skipped(why),
    };
    let mut rng = SmallRng::seed_from_u64(case_seed(66, 0));
    for (dim, heads, bs, topk) in [(128usize, 64usize, 64usize, 32usize), (64, 20, 7, 9)] {
        let opts = PoolOptions {
            format: KvFormat::F32,
            d_qk: 8,
            num_layers: 2,
            block_size: bs,
            num_blocks: 256,
            index_dim: dim,
        };
        let pools = [
            KvPool::new(cpu.clone(), opts).unwrap(),
            KvPool::new(gpu.clone(), opts).unwrap(),
        ];
        assert!(!pools[0].index_on_device() && pools[1].index_on_device());
        let irow = index_row_bytes(dim);
        // Keys: codes of integers in [-4, 4], scales 2^-k.
        let keys = |rng: &mut SmallRng, n: usize| -> Vec<u8> {
            let mut v = vec![0u8; n * irow];
            for row in v.chunks_exact_mut(irow) {
                for c in &mut row[..dim] {
                    *c = f32_to_e4m3(rng.random_range(-4i32..=4) as f32);
                }
                let s = 2f32.powi(-rng.random_range(0..4));
                row[dim..].copy_from_slice(&s.to_le_bytes());
            }
            v
        };
        let cache = vec![0u8; 400 * 8 * 4];
        let plan: [(u64, usize); 5] = [(1, 150), (2, 5), (1, 152), (4, topk + 1), (2, 3)];
        let mut data = Vec::new();
        for &(_, n) in &plan {
            data.push(keys(&mut rng, n));
        }
        let forked = keys(&mut rng, 30);
        for p in &pools {
            for id in [1, 2, 4] {
                p.create_seq(id).unwrap();
            }
            for layer in 0..2 {
                for (&(id, n), k) in plan.iter().zip(&data) {
                    p.append_batch_indexed(
                        layer,
                        &[(id, n, &cache[..n * 32])],
                        Dtype::F32,
                        Some(&[k]),
                    )
                    .unwrap();
                }
            }
            // Seq 3 shares seq 1's 302 tokens; its append copies the last,
            // partly filled block (with its keys) before writing.
            p.fork(1, 3).unwrap();
            for layer in 0..2 {
                p.append_batch_indexed(
                    layer,
                    &[(3, 30, &cache[..30 * 32])],
                    Dtype::F32,
                    Some(&[&forked]),
                )
                .unwrap();
            }
            p.truncate(2, 6).unwrap();
        }
        // Queries: seq 1's last token, seq 3's 12 last, seq 2's last (6
        // tokens), seq 4's last (topk + 1 candidates).
        let seqs = [1u64, 3, 2, 4];
        let n_tokens = [1usize, 12, 1, 1];
        let pos: Vec<usize> = [301usize]
            .into_iter()
            .chain(320..332)
            .chain([5, topk])
            .collect();
        let total = pos.len();
        let q: Vec<f32> = (0..total * heads * dim)
            .map(|_| e4m3_to_f32(f32_to_e4m3(rng.random_range(-3i32..=3) as f32)))
            .collect();
        let w: Vec<f32> = (0..total * heads)
            .map(|_| {
                let m = [-1.0f32, 1.0, 2.0, 0.5][rng.random_range(0..4)];
                m * 2f32.powi(-rng.random_range(0..3))
            })
            .collect();
        for layer in 0..2 {
            let mut want = vec![7i32; total * topk];
            let mut tok = 0;
            for (&id, &n) in seqs.iter().zip(&n_tokens) {
                pools[0]
                    .with_index_keys(id, layer, |k| {
                        for t in tok..tok + n {
                            mlart::model::indexer::select(
                                &k,
                                &q[t * heads * dim..(t + 1) * heads * dim],
                                &w[t * heads..(t + 1) * heads],
                                pos[t],
                                &mut want[t * topk..(t + 1) * topk],
                                Level::best(),
                            );
                        }
                    })
                    .unwrap();
                tok += n;
            }
            // In one pass, and in passes of one or two tokens (a token's
            // scores take 1.5 KB: 332 keys, rows of 384).
            for budget in [0, 1, 3100] {
                let mut got = vec![7i32; total * topk];
                pools[1]
                    .select_on_device(
                        layer, &seqs, &n_tokens, &pos, &q, &w, heads, &mut got, budget,
                    )
                    .unwrap();
                for t in 0..total {
                    assert_eq!(
                        got[t * topk..(t + 1) * topk],
                        want[t * topk..(t + 1) * topk],
                        "dim {dim} layer {layer} budget {budget} token {t} (position {})",
                        pos[t]
                    );
                }
            }
            // The short sequence keeps all of its positions.
            let t = total - 2;
            assert_eq!(&want[t * topk..t * topk + 7], &[0, 1, 2, 3, 4, 5, -1]);
        }
        // Keys are read only through a device selection.
        assert!(pools[1].with_index_keys(1, 0, |_| ()).is_err());
        // A position past a sequence's tokens is refused, not read.
        let mut out = vec![0i32; topk];
        let e = pools[1]
            .select_on_device(
                0,
                &[2],
                &[1],
                &[6],
                &q[..heads * dim],
                &w[..heads],
                heads,
                &mut out,
                0,
            )
            .unwrap_err();
        assert!(e.message.contains("position 6"), "{}", e.message);
    }
    Outcome::Ran
}

/// A device-memory decode on a caller stream is enqueue-only and can be
/// captured into a CUDA graph: the replayed graph gives the same bytes as a
/// synchronous call. Capturing a call whose workspace would have to grow is
/// refused with an error that says what to do.
fn cuda_graph_capture() -> Outcome {
    use cudarc::driver::{result, sys};
    with_gpu(|g| {
        let c = dense_bf16_case(vec![3000, 77]);
        let inp = inputs(&c, 11);
        let mut pl = Placed {
            ptrs: Vec::new(),
            engine: g.ptr,
        };
        let out_bytes = 2 * 16 * 512 * 2;
        let mut a = device_dense_args(&mut pl, &inp);
        a.out = pl.put(&vec![0u8; out_bytes]);
        assert!(take_error(mlart_decode_paged(g.ptr, &a)).is_none());
        let mut want = vec![0u8; out_bytes];
        pl.get(&mut want, a.out);
        let zero = vec![0u8; out_bytes];
        assert!(take_error(mlart_engine_mem_copy(
            g.ptr,
            a.out,
            MLART_MEMORY_DEVICE,
            zero.as_ptr() as *const c_void,
            MLART_MEMORY_HOST,
            out_bytes
        ))
        .is_none());
        // SAFETY: plain driver calls on a stream and graph made here; the
        // engine's context is current on this thread (mlart made it so).
        unsafe {
            let stream = result::stream::create(result::stream::StreamKind::NonBlocking).unwrap();
            result::stream::begin_capture(
                stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .unwrap();
            a.stream = stream as *mut c_void;
            let r = take_error(mlart_decode_paged(g.ptr, &a));
            let graph = result::stream::end_capture(stream).unwrap();
            assert!(r.is_none(), "captured decode failed: {r:?}");
            let exec = result::graph::instantiate(
                graph,
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            )
            .unwrap();
            result::graph::launch(exec, stream).unwrap();
            result::stream::synchronize(stream).unwrap();
            let mut got = vec![0u8; out_bytes];
            pl.get(&mut got, a.out);
            assert!(
                got == want,
                "graph replay differs from the synchronous call"
            );
            // A shape that needs a larger workspace cannot be captured.
            // (Its q and out buffers are large enough, and made before the
            // capture, so the refusal is the workspace's, not a range check's.)
            let mut huge = a;
            huge.s_q = 64;
            huge.causal = true;
            huge.q = pl.put(&vec![0u8; 2 * 64 * 16 * 576 * 2]);
            huge.out = pl.put(&vec![0u8; 2 * 64 * 16 * 512 * 2]);
            result::stream::begin_capture(
                stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .unwrap();
            let e = take_error(mlart_decode_paged(g.ptr, &huge));
            let graph2 = result::stream::end_capture(stream).unwrap();
            let (code, msg) = e.expect("growing the workspace during capture must fail");
            assert_eq!(code, MLART_STATUS_INVALID_ARGUMENT, "{msg}");
            assert!(
                msg.contains("captured") && msg.contains("outside the capture"),
                "{msg}"
            );
            result::graph::exec_destroy(exec).unwrap();
            result::graph::destroy(graph).unwrap();
            result::graph::destroy(graph2).unwrap();
            result::stream::destroy(stream).unwrap();
        }
    })
}

/// A one-layer random checkpoint of `preset` in a fresh temporary folder
/// (named by `tag`, the preset and the process), with YaRN.
fn checkpoint(
    tag: &str,
    preset: mlart::model::gen::Preset,
    dtype: mlart::model::gen::WeightDtype,
    seed: u64,
) -> std::path::PathBuf {
    use mlart::model::gen::{generate, GenOptions};
    let dir = std::env::temp_dir().join(format!("{tag}-{}-{}", preset.name(), std::process::id()));
    let opts = GenOptions {
        preset,
        dtype,
        layers: 1,
        seed,
        shards: 1,
        yarn: true,
    };
    generate(&dir, &opts).unwrap();
    dir
}

/// A model layer end to end on a GPU engine (pool in GPU memory, GPU
/// attention) against the same checkpoint on a CPU engine: prefill then a
/// decode step, bf16 and FP8 pools; DeepSeek-V3 and V3.2 (the same indexer
/// choices, then sparse attention on the GPU).
fn cuda_model_forward_matches_cpu() -> Outcome {
    use mlart::kv::{KvPool, PoolOptions};
    use mlart::model::gen::{Preset, WeightDtype};
    use mlart::model::{LoadOptions, Model};
    let (gpu, cpu) = match rust_engines() {
        Ok(pair) => pair,
        Err(why) => return Outcome::Skipped(why),
    };
    // V3 and V3.2 (whose indexer picks top-8 on the CPU for both engines,
    // then the GPU attends sparsely past 8 tokens), with DeepSeek's cache
    // rows (d_qk 576, d_v 512: the GPU kernels' shape).
    for preset in [Preset::Small, Preset::SmallV32] {
        let dir = checkpoint("mlart-cuda-model", preset, WeightDtype::Bf16, 3);
        let models = [
            Model::load(cpu.clone(), &dir, LoadOptions::default()).unwrap(),
            Model::load(gpu.clone(), &dir, LoadOptions::default()).unwrap(),
        ];
        let _ = std::fs::remove_dir_all(&dir);
        let c = &models[0].config;
        let hid = c.hidden_size;
        for format in [
            mlart::format::KvFormat::Bf16,
            mlart::format::KvFormat::Fp8V32,
        ] {
            if format == mlart::format::KvFormat::Fp8V32 && c.d_qk() != 576 {
                continue;
            }
            let popts = PoolOptions {
                format,
                d_qk: c.d_qk(),
                num_layers: 1,
                block_size: 16,
                num_blocks: 16,
                index_dim: c.indexer.map_or(0, |ix| ix.head_dim),
            };
            let pools = [
                KvPool::new(cpu.clone(), popts).unwrap(),
                KvPool::new(gpu.clone(), popts).unwrap(),
            ];
            let mut rng = SmallRng::seed_from_u64(case_seed(66, 0));
            for p in &pools {
                p.create_seq(1).unwrap();
                p.create_seq(2).unwrap();
            }
            let steps: [(&[usize], usize); 2] = [(&[20, 7], 27), (&[1, 1], 2)];
            for (n_tokens, total) in steps {
                let x: Vec<f32> = (0..total * hid).map(|_| sample(&mut rng)).collect();
                let topk = c.indexer.map_or(0, |ix| ix.topk);
                let mut sels = vec![vec![0i32; total * topk]; 2];
                let outs: Vec<Vec<f32>> = models
                    .iter()
                    .zip(&pools)
                    .zip(sels.iter_mut())
                    .map(|((m, p), sel)| {
                        let io = (topk > 0).then_some(&mut sel[..]);
                        m.forward_with(p, 0, &[1, 2], n_tokens, &x, io).unwrap()
                    })
                    .collect();
                assert_eq!(
                    sels[0], sels[1],
                    "{preset:?}: the engines' indexer choices differ"
                );
                let (a, b): (Vec<f64>, Vec<f64>) = (
                    outs[1].iter().map(|&v| v as f64).collect(),
                    outs[0].iter().map(|&v| v as f64).collect(),
                );
                let e = rel_l2(&a, &b);
                assert!(
                    e <= 2e-2,
                    "{preset:?} {format:?} n_tokens {n_tokens:?}: rel L2 {e:.3e}"
                );
            }
        }
    }
    Outcome::Ran
}

/// The projections on the GPU (`gpu_projections`, `mlart_linear` kernels):
/// layers with low-rank and direct queries (V3-like and V2-Lite), whose
/// whole forward stays on the GPU (`model::resident`: `mla_rows`, appends
/// from device rows, decodes of device queries), and a V3.2 layer whose
/// indexer stays on the GPU too (`mla_index_rows`, keys scattered from
/// device rows, scores and top-k into the sparse attention's slots, gathered
/// for calls of non-neighbours); bf16 and FP8 weights, both activation
/// modes, BF16, F32 and FP8_V32 caches, over prefill chunks of 16+ tokens
/// (64-token passes), mixed lengths, equal lengths that are not neighbours
/// and decode steps, against the same layer on a CPU engine. FP8 models
/// also run over a CPU engine's pool, where each projection is staged.
fn cuda_model_projections_on_gpu() -> Outcome {
    use mlart::format::KvFormat;
    use mlart::kv::{KvPool, PoolOptions};
    use mlart::model::gen::{Preset, WeightDtype};
    use mlart::model::linear::Activations;
    use mlart::model::{LoadOptions, Model};
    let (gpu, cpu) = match rust_engines() {
        Ok(pair) => pair,
        Err(why) => return Outcome::Skipped(why),
    };
    let shapes = [
        (Preset::Small, WeightDtype::Bf16),
        (Preset::Small, WeightDtype::Fp8),
        (Preset::V2Lite, WeightDtype::Bf16),
        (Preset::SmallV32, WeightDtype::Fp8),
    ];
    for (preset, dtype) in shapes {
        let dir = checkpoint(&format!("mlart-cuda-proj-{dtype:?}"), preset, dtype, 11);
        // The attention in f32 (F32 cache) and over FP8 rows quantized on
        // the GPU, besides bf16, on one model.
        let formats: &[KvFormat] = if (preset, dtype) == (Preset::Small, WeightDtype::Bf16) {
            &[KvFormat::Bf16, KvFormat::F32, KvFormat::Fp8V32]
        } else {
            &[KvFormat::Bf16]
        };
        // A pool on the CPU engine: the GPU model's projections stage their
        // activations (`model::device::project`) instead of staying resident.
        let pool_engines: &[bool] = if dtype == WeightDtype::Fp8 {
            &[true, false]
        } else {
            &[true]
        };
        let runs = [Activations::Precise, Activations::Bf16]
            .into_iter()
            .flat_map(|a| formats.iter().map(move |&f| (a, f)))
            .flat_map(|(a, f)| pool_engines.iter().map(move |&g| (a, f, g)));
        for (activations, format, gpu_pool) in runs {
            let load = |engine: &std::sync::Arc<mlart::Engine>, on_gpu| {
                let o = LoadOptions {
                    activations,
                    gpu_projections: Some(on_gpu),
                    ..LoadOptions::default()
                };
                Model::load(engine.clone(), &dir, o).unwrap()
            };
            let models = [load(&cpu, false), load(&gpu, true)];
            assert!(
                models[1].projections.starts_with("GPU"),
                "{preset:?} {dtype:?}: {}",
                models[1].projections
            );
            let c = &models[0].config;
            let hid = c.hidden_size;
            let popts = PoolOptions {
                format,
                d_qk: c.d_qk(),
                num_layers: 1,
                block_size: 16,
                num_blocks: 32,
                index_dim: c.indexer.map_or(0, |ix| ix.head_dim),
            };
            let pools = [
                KvPool::new(cpu.clone(), popts).unwrap(),
                KvPool::new(if gpu_pool { &gpu } else { &cpu }.clone(), popts).unwrap(),
            ];
            for p in &pools {
                for id in 1..=3 {
                    p.create_seq(id).unwrap();
                }
            }
            let mut rng = SmallRng::seed_from_u64(case_seed(67, 0));
            // Mixed chunk lengths; equal ones that are not neighbours
            // ([3, 1, 3]: the first and last are gathered into one call).
            let steps: [(&[usize], usize); 4] = [
                (&[70, 9, 5], 84),
                (&[1, 1, 1], 3),
                (&[3, 1, 3], 7),
                (&[1, 4, 1], 6),
            ];
            for (n_tokens, total) in steps {
                let x: Vec<f32> = (0..total * hid).map(|_| sample(&mut rng)).collect();
                // V3.2: the indexer runs on the GPU too (its projections,
                // its row steps, the scores and the top-k); GPU rounding
                // may flip a near-tie, not more.
                let topk = c.indexer.map_or(0, |ix| ix.topk);
                let mut sels = vec![vec![0i32; total * topk]; 2];
                let outs: Vec<Vec<f64>> = models
                    .iter()
                    .zip(&pools)
                    .zip(sels.iter_mut())
                    .map(|((m, p), sel)| {
                        let io = (topk > 0).then_some(&mut sel[..]);
                        let y = m.forward_with(p, 0, &[1, 2, 3], n_tokens, &x, io).unwrap();
                        y.iter().map(|&v| v as f64).collect()
                    })
                    .collect();
                let same = sels[0].iter().zip(&sels[1]).filter(|(a, b)| a == b).count();
                assert!(
                    10 * same >= 9 * sels[0].len(),
                    "{preset:?}: the indexer chose {same} of {} positions alike",
                    sels[0].len()
                );
                let e = rel_l2(&outs[1], &outs[0]);
                assert!(
                    e <= 2e-2,
                    "{preset:?} {dtype:?} {activations:?} {format:?} GPU pool {gpu_pool} n_tokens {n_tokens:?}: rel L2 {e:.3e}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    Outcome::Ran
}

/// `mlart_model_forward` with device memory (`args.memory`, `args.stream`)
/// writes the bytes the host-memory call gives on the same GPU engine (both
/// run the layer resident, with the same bf16 split of x made on the host
/// or on the device): F32, BF16 and F16 hidden states and outputs, a
/// prefill chunk and decode steps, with and without a caller stream, V3 and
/// V3.2 (with index_out). Then the named errors, which leave the pool as
/// it was: a pointer past its allocation, host memory, a model whose
/// projections are on the CPU, a capturing stream.
fn cuda_model_forward_device_memory() -> Outcome {
    use cudarc::driver::{result, sys};
    use mlart::ffi::model::*;
    use mlart::ffi::pool::*;
    use mlart::model::gen::{Preset, WeightDtype};
    with_gpu(|g| {
        for preset in [Preset::Small, Preset::SmallV32] {
            let dir = checkpoint("mlart-cuda-devmem", preset, WeightDtype::Fp8, 5);
            let path = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
            let load = |on_gpu: i32| {
                let mut o = MaybeUninit::<mlart_model_options>::uninit();
                mlart_model_options_init(o.as_mut_ptr());
                // SAFETY: initialized just above.
                let mut o = unsafe { o.assume_init() };
                o.gpu_projections = on_gpu;
                let mut m = std::ptr::null_mut();
                assert!(take_error(mlart_model_load(g.ptr, path.as_ptr(), &o, &mut m)).is_none());
                m
            };
            let (model, cpu_proj) = (load(1), load(0));
            let _ = std::fs::remove_dir_all(&dir);
            let props = |m: *mut mlart_model| {
                let mut p = MaybeUninit::<mlart_model_props>::uninit();
                mlart_model_props_init(p.as_mut_ptr());
                // SAFETY: initialized just above.
                let mut p = unsafe { p.assume_init() };
                assert!(take_error(mlart_model_info(m, &mut p)).is_none());
                p
            };
            let mp = props(model);
            assert_eq!(mp.projections_on_gpu, 1);
            assert_eq!(props(cpu_proj).projections_on_gpu, 0);
            let (hid, topk) = (mp.hidden_size as usize, mp.index_topk as usize);
            let pool = || {
                let mut o = MaybeUninit::<mlart_kv_pool_options>::uninit();
                mlart_kv_pool_options_init(o.as_mut_ptr());
                // SAFETY: initialized just above.
                let mut o = unsafe { o.assume_init() };
                o.d_qk = mp.d_qk;
                o.block_size = 16;
                o.num_blocks = 16;
                o.index_head_dim = mp.index_head_dim;
                let mut p = std::ptr::null_mut();
                assert!(take_error(mlart_kv_pool_create(g.ptr, &o, &mut p)).is_none());
                for id in [1, 2] {
                    assert!(take_error(mlart_kv_seq_create(p, id)).is_none());
                }
                p
            };
            // [host-memory calls, device-memory calls]
            let pools = [pool(), pool()];
            let len = |p: *mut mlart_kv_pool, id: u64| {
                let mut n = -1;
                assert!(take_error(mlart_kv_seq_length(p, id, 0, &mut n)).is_none());
                n
            };
            let mut pl = Placed {
                ptrs: Vec::new(),
                engine: g.ptr,
            };
            let stream = result::stream::create(result::stream::StreamKind::NonBlocking).unwrap();
            let seqs = [1u64, 2];
            let steps: [(&[i32], u32, u32, bool); 4] = [
                (&[12, 3], MLART_DTYPE_F32, MLART_DTYPE_F32, false),
                (&[1, 1], MLART_DTYPE_BF16, MLART_DTYPE_BF16, true),
                (&[2, 1], MLART_DTYPE_F16, MLART_DTYPE_F32, false),
                (&[1, 1], MLART_DTYPE_F32, MLART_DTYPE_F16, true),
            ];
            let mut rng = SmallRng::seed_from_u64(case_seed(69, 0));
            let to_bytes = |dt: u32, v: &[f32]| -> Vec<u8> {
                match dt {
                    MLART_DTYPE_F32 => bytes_of(v).to_vec(),
                    MLART_DTYPE_BF16 => v
                        .iter()
                        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                        .collect(),
                    _ => v
                        .iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .collect(),
                }
            };
            let esize = |dt: u32| if dt == MLART_DTYPE_F32 { 4 } else { 2 };
            let args = |n: &[i32], x_dtype, out_dtype| {
                let mut a = MaybeUninit::<mlart_forward_args>::uninit();
                mlart_forward_args_init(a.as_mut_ptr());
                // SAFETY: initialized just above.
                let mut a = unsafe { a.assume_init() };
                a.batch = 2;
                a.seq_ids = seqs.as_ptr();
                a.n_tokens = n.as_ptr();
                a.x_dtype = x_dtype;
                a.out_dtype = out_dtype;
                a
            };
            for (n, x_dtype, out_dtype, on_stream) in steps {
                let total: usize = n.iter().map(|&v| v as usize).sum();
                let xf: Vec<f32> = (0..total * hid).map(|_| sample(&mut rng)).collect();
                let x = to_bytes(x_dtype, &xf);
                let out_len = total * hid * esize(out_dtype);
                let mut want = vec![0u8; out_len];
                let mut sel = [vec![-7i32; total * topk], vec![-7i32; total * topk]];
                let mut a = args(n, x_dtype, out_dtype);
                a.x = x.as_ptr() as *const c_void;
                a.out = want.as_mut_ptr() as *mut c_void;
                if topk > 0 {
                    a.index_out = sel[0].as_mut_ptr();
                }
                assert!(take_error(mlart_model_forward(model, pools[0], &a)).is_none());
                let mut d = args(n, x_dtype, out_dtype);
                d.memory = MLART_MEMORY_DEVICE;
                d.x = pl.put(&x);
                d.out = pl.put(&vec![0xffu8; out_len]);
                if topk > 0 {
                    d.index_out = sel[1].as_mut_ptr();
                }
                if on_stream {
                    d.stream = stream as *mut c_void;
                }
                assert!(take_error(mlart_model_forward(model, pools[1], &d)).is_none());
                if on_stream {
                    // SAFETY: our stream.
                    unsafe { result::stream::synchronize(stream) }.unwrap();
                }
                let mut got = vec![0u8; out_len];
                pl.get(&mut got, d.out);
                assert!(
                    got == want,
                    "{preset:?} n {n:?} x {x_dtype} out {out_dtype} stream {on_stream}: device-memory output differs from the host-memory call's"
                );
                assert_eq!(sel[0], sel[1], "{preset:?}: index_out differs");
            }
            // Errors name the argument and leave both pools as they were.
            let lens = [len(pools[1], 1), len(pools[1], 2)];
            let n = [1, 1];
            let xf: Vec<f32> = (0..2 * hid).map(|_| sample(&mut rng)).collect();
            let x_host = bytes_of(&xf).to_vec();
            let base = || {
                let mut d = args(&n, MLART_DTYPE_F32, MLART_DTYPE_F32);
                d.memory = MLART_MEMORY_DEVICE;
                d
            };
            let x_dev = pl.put(&x_host);
            let out_dev = pl.put(&x_host);
            let short = pl.put(&x_host[..hid * 4]);
            let mut host_out = vec![0u8; 2 * hid * 4];
            let expect =
                |what: &str, m: *mut mlart_model, a: &mlart_forward_args, needles: &[&str]| {
                    match take_error(mlart_model_forward(m, pools[1], a)) {
                        None => panic!("{what}: succeeded"),
                        Some((code, msg)) => {
                            assert_eq!(code, MLART_STATUS_INVALID_ARGUMENT, "{what}: {msg}");
                            for s in needles {
                                assert!(msg.contains(s), "{what}: {msg:?} lacks {s:?}");
                            }
                        }
                    }
                };
            let mut a = base();
            a.out = out_dev;
            match take_error(mlart_model_forward(model, pools[1], &a)) {
                Some((MLART_STATUS_NULL_POINTER, msg)) => assert!(msg.contains('x'), "{msg}"),
                other => panic!("NULL x: {other:?}"),
            }
            a.x = x_dev;
            a.out = short;
            expect(
                "short out",
                model,
                &a,
                &["out = ", "past the end of its allocation"],
            );
            a.out = host_out.as_mut_ptr() as *mut c_void;
            expect(
                "host out",
                model,
                &a,
                &["out = ", "not memory of a CUDA device"],
            );
            let mut wide = x_host.clone();
            wide.extend_from_slice(&[0u8; 64]);
            let wide = pl.put(&wide);
            a.out = out_dev;
            // SAFETY: 8 bytes into an allocation 64 bytes longer than x.
            a.x = unsafe { (wide as *const u8).add(8) } as *const c_void;
            expect("misaligned x", model, &a, &["x = ", "16-byte aligned"]);
            a.x = x_dev;
            a.out = x_dev;
            expect("out is x", model, &a, &["overlaps"]);
            a.out = out_dev;
            expect(
                "CPU projections",
                cpu_proj,
                &a,
                &["MLART_MEMORY_DEVICE", "projections run on the CPU"],
            );
            // SAFETY: our stream; the capture is ended below.
            unsafe {
                result::stream::begin_capture(
                    stream,
                    sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
            }
            .unwrap();
            a.stream = stream as *mut c_void;
            expect(
                "capturing stream",
                model,
                &a,
                &["captured into a CUDA graph"],
            );
            // SAFETY: as above.
            let graph = unsafe { result::stream::end_capture(stream) }.unwrap();
            if !graph.is_null() {
                // SAFETY: the graph just captured (empty).
                unsafe { result::graph::destroy(graph) }.unwrap();
            }
            assert_eq!([len(pools[1], 1), len(pools[1], 2)], lens);
            // SAFETY: our stream, idle.
            unsafe { result::stream::destroy(stream) }.unwrap();
            drop(pl);
            for p in pools {
                mlart_kv_pool_free(p);
            }
            mlart_model_free(model);
            mlart_model_free(cpu_proj);
        }
    })
}

/// The driver work of one decode step of a layer kept on the GPU, counted
/// by the emulated driver (`fake_cuda_counts`; a real driver has no such
/// counters, so on a GPU this is skipped): with host memory, one upload of
/// the inputs, one of the append's slots, one of the attention's tables
/// (V3.2, whose indexer narrows the attention here: of the indexer's block
/// tables; its choice stays on the GPU as the sparse attention's slots),
/// one download and one wait; with device memory on a caller stream, no
/// download and no wait. A staged path would show six waits.
fn cuda_model_step_driver_work() -> Outcome {
    use mlart::kv::{KvPool, PoolOptions};
    use mlart::model::gen::{Preset, WeightDtype};
    use mlart::model::{LoadOptions, Model};
    if !emulated() {
        return Outcome::Skipped(
            "driver calls are counted by the emulated driver only".to_string(),
        );
    }
    let (gpu, _) = match rust_engines() {
        Ok(pair) => pair,
        Err(why) => return Outcome::Skipped(why),
    };
    let cuda = gpu.backend().cuda().expect("a CUDA engine");
    // SAFETY: finds the driver mlart already loaded (RTLD_NOLOAD loads
    // nothing) and looks the symbol up in it; NULL if absent.
    let sym = unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        assert!(!lib.is_null(), "the driver is loaded");
        libc::dlsym(lib, c"fake_cuda_counts".as_ptr())
    };
    assert!(
        !sym.is_null(),
        "the emulated driver exports fake_cuda_counts"
    );
    // SAFETY: the emulated driver's `void fake_cuda_counts(uint64_t[4])`.
    let counts_fn: extern "C" fn(*mut u64) = unsafe { std::mem::transmute(sym) };
    let counts = || {
        let mut c = [0u64; 4];
        counts_fn(c.as_mut_ptr());
        c
    };
    let delta = |a: [u64; 4], b: [u64; 4]| [b[0] - a[0], b[1] - a[1], b[2] - a[2], b[3] - a[3]];
    for preset in [Preset::Small, Preset::SmallV32] {
        let dir = checkpoint("mlart-cuda-count", preset, WeightDtype::Fp8, 8);
        let o = LoadOptions {
            gpu_projections: Some(true),
            ..LoadOptions::default()
        };
        let model = Model::load(gpu.clone(), &dir, o).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let c = &model.config;
        let hid = c.hidden_size;
        let pool = KvPool::new(
            gpu.clone(),
            PoolOptions {
                format: mlart::format::KvFormat::Bf16,
                d_qk: c.d_qk(),
                num_layers: 1,
                block_size: 16,
                num_blocks: 16,
                index_dim: c.indexer.map_or(0, |ix| ix.head_dim),
            },
        )
        .unwrap();
        pool.create_seq(1).unwrap();
        pool.create_seq(2).unwrap();
        let mut rng = SmallRng::seed_from_u64(case_seed(70, 0));
        let mut x = |n: usize| -> Vec<f32> { (0..n * hid).map(|_| sample(&mut rng)).collect() };
        // A prefill and a first step grow every buffer; the second step is
        // counted. Sequence 1 is then longer than V3.2's top-k (8): its
        // indexer narrows the attention.
        model.forward(&pool, 0, &[1, 2], &[9, 2], &x(11)).unwrap();
        model.forward(&pool, 0, &[1, 2], &[1, 1], &x(2)).unwrap();
        if let Some(ix) = c.indexer {
            assert!(ix.topk < 11, "the counted step must be narrowed");
        }
        let before = counts();
        model.forward(&pool, 0, &[1, 2], &[1, 1], &x(2)).unwrap();
        let [up, down, launches, waits] = delta(before, counts());
        println!("{preset:?} host memory: {up} uploads, {down} downloads, {launches} launches, {waits} waits");
        assert_eq!((up, down, waits), (3, 1, 1), "{preset:?} host memory");
        assert!(launches <= 32, "{preset:?}: {launches} launches");
        // The per-kernel profile (`mlart bench --model`'s breakdown) times
        // every one of those launches, under its kernel's name.
        cuda.profile_start().unwrap();
        model.forward(&pool, 0, &[1, 2], &[1, 1], &x(2)).unwrap();
        let times = cuda.profile_stop().unwrap();
        let profiled: u64 = times.iter().map(|t| t.launches).sum();
        println!("{preset:?} profile: {times:?}");
        assert_eq!(profiled, launches, "{preset:?}: launches profiled");
        for name in [
            "mla_rows",
            "mla_append",
            "mla_plan",
            "mla_decode",
            "mla_combine",
        ] {
            assert!(
                times.iter().any(|t| t.name == name),
                "{preset:?}: no {name} in the profile"
            );
        }
        assert!(times.iter().any(|t| t.name.starts_with("mla_linear")));
        if c.indexer.is_some() {
            for name in [
                "mla_index_rows",
                "mla_index_scatter",
                "mla_index_score_mma",
                "mla_index_topk",
            ] {
                assert!(
                    times.iter().any(|t| t.name == name),
                    "{preset:?}: no {name} in the profile"
                );
            }
        }
        assert!(times
            .iter()
            .all(|t| t.seconds.is_finite() && t.seconds >= 0.0));
        // Closed: nothing is timed any more.
        model.forward(&pool, 0, &[1, 2], &[1, 1], &x(2)).unwrap();
        assert!(cuda.profile_stop().unwrap().is_empty());
        // Device memory on a caller stream: no download, no wait.
        let xs = x(2);
        let bytes = 4 * xs.len();
        let (xd, yd) = (
            cuda.mem_alloc(bytes).unwrap(),
            cuda.mem_alloc(bytes).unwrap(),
        );
        cuda.mem_copy(xd, xs.as_ptr() as u64, bytes).unwrap();
        let stream = cudarc::driver::result::stream::create(
            cudarc::driver::result::stream::StreamKind::NonBlocking,
        )
        .unwrap();
        let f32 = mlart::format::Dtype::F32;
        let before = counts();
        model
            .forward_device(
                &pool,
                0,
                &[1, 2],
                &[1, 1],
                xd,
                f32,
                yd,
                f32,
                stream as u64,
                None,
            )
            .unwrap();
        let [up, down, launches, waits] = delta(before, counts());
        println!("{preset:?} device memory: {up} uploads, {down} downloads, {launches} launches, {waits} waits");
        assert_eq!(
            (up, down, waits),
            (3, 0, 0),
            "{preset:?} device memory on a caller stream"
        );
        // SAFETY: our stream, idle (the emulated driver runs work at once).
        unsafe { cudarc::driver::result::stream::destroy(stream) }.unwrap();
        cuda.mem_free(xd).unwrap();
        cuda.mem_free(yd).unwrap();
    }
    Outcome::Ran
}

/// The projection kernels through the backend's own calls
/// (`upload_weight`, `linear`, `time_linear`): an FP8 weight with
/// 128x128 block scales and a bf16 one, a decode call (K split over
/// blocks), a 40-token call (64-token passes) and a grouped call reading
/// rows at an offset, each against a float64 product of the same bytes.
fn cuda_linear_matches_float64() -> Outcome {
    use mlart::backend::cuda::linear::{split_bf16, LinearCall, WeightImage};
    use mlart::format::fp8::e4m3_to_f32;
    let (gpu, _) = match rust_engines() {
        Ok(pair) => pair,
        Err(why) => return Outcome::Skipped(why),
    };
    let cuda = gpu.backend().cuda().expect("a CUDA engine");
    let mut rng = SmallRng::seed_from_u64(case_seed(68, 0));
    let (rows, k) = (300usize, 512usize);
    let codes: Vec<u8> = (0..rows * k)
        .map(|_| rng.random_range(0..=0x7eu8) | (rng.random::<u8>() & 0x80))
        .collect();
    let scales: Vec<f32> = (0..rows.div_ceil(128) * k.div_ceil(128))
        .map(|_| rng.random_range(0.001f32..0.01))
        .collect();
    let bf16: Vec<u8> = (0..rows * k)
        .flat_map(|_| bf16_bits(sample(&mut rng)).to_le_bytes())
        .collect();
    let weights = [
        (WeightImage::fp8(&codes, &scales, rows, k).unwrap(), true),
        (WeightImage::bf16(&bf16, rows, k).unwrap(), false),
    ];
    let value = |fp8: bool, r: usize, c: usize| -> f64 {
        if fp8 {
            e4m3_to_f32(codes[r * k + c]) as f64
                * scales[(r / 128) * k.div_ceil(128) + c / 128] as f64
        } else {
            half::bf16::from_le_bytes([bf16[2 * (r * k + c)], bf16[2 * (r * k + c) + 1]]).to_f64()
        }
    };
    let calls = [
        LinearCall::plain(1, rows),
        LinearCall::plain(40, 200),
        LinearCall {
            tokens: 3,
            n_out: 64,
            groups: 3,
            w_row0: 20,
            w_group_rows: 90,
        },
    ];
    for (img, fp8) in &weights {
        let w = cuda.upload_weight(img).unwrap();
        for call in &calls {
            let x: Vec<f32> = (0..call.tokens * call.groups * k)
                .map(|_| sample(&mut rng))
                .collect();
            let (mut hi, mut lo) = (Vec::new(), Vec::new());
            split_bf16(&x, true, &mut hi, &mut lo);
            let mut y = vec![f32::NAN; call.tokens * call.groups * call.n_out];
            cuda.linear(&w, call, &hi, &lo, &mut y).unwrap();
            for t in 0..call.tokens {
                for g in 0..call.groups {
                    for n in 0..call.n_out {
                        let row = call.w_row0 + g * call.w_group_rows + n;
                        let xs = &x[(t * call.groups + g) * k..][..k];
                        let (mut want, mut mag) = (0f64, 0f64);
                        for (c, &xv) in xs.iter().enumerate() {
                            // The kernels see x as hi + lo: 16 of its bits.
                            let term = xv as f64 * value(*fp8, row, c);
                            want += term;
                            mag += term.abs();
                        }
                        let got = y[(t * call.groups + g) * call.n_out + n] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * mag,
                            "fp8 {fp8} {call:?}: y[{t}, {g}, {n}] = {got}, want {want}"
                        );
                    }
                }
            }
            let secs = cuda.time_linear(&w, call, true, 3).unwrap();
            assert!(secs.is_finite() && secs >= 0.0, "{secs}");
        }
        cuda.free_weight(&w);
    }
    Outcome::Ran
}

type Test = (&'static str, fn() -> Outcome);

/// The decode kernels in use follow `MLART_CUDA_WGMMA` (1 or 0; unset: the
/// build's default): on a compute capability 9.0 GPU with wgmma on, the
/// engine says its 64-row blocks run on wgmma, otherwise not. So a run of
/// this suite with `MLART_CUDA_WGMMA=1` really tests the wgmma kernels, and
/// one with `=0` tests mma.sync's.
fn cuda_wgmma_as_requested() -> Outcome {
    with_gpu(|g| {
        let mut props = MaybeUninit::<mlart_engine_props>::uninit();
        mlart_engine_props_init(props.as_mut_ptr());
        // SAFETY: initialized by mlart_engine_props_init.
        let mut props = unsafe { props.assume_init() };
        assert!(take_error(mlart_engine_info(g.ptr, &mut props)).is_none());
        // SAFETY: the engine wrote a NUL-terminated string into the array.
        let reason = unsafe { std::ffi::CStr::from_ptr(props.reason.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let mut dev = MaybeUninit::<mlart_device_props>::uninit();
        mlart_device_props_init(dev.as_mut_ptr());
        // SAFETY: initialized by mlart_device_props_init.
        let mut dev = unsafe { dev.assume_init() };
        assert!(take_error(mlart_device_info(props.device_index, &mut dev)).is_none());
        let hopper = (dev.compute_major, dev.compute_minor) == (9, 0);
        let requested = match std::env::var("MLART_CUDA_WGMMA").as_deref().map(str::trim) {
            Ok("1") => true,
            Ok("0") => false,
            _ => mlart::backend::cuda::WGMMA_BY_DEFAULT,
        };
        println!("    engine: {reason}");
        if let Ok((gpu, _)) = rust_engines() {
            let uses = gpu.backend().cuda().is_some_and(|c| c.uses_wgmma());
            assert_eq!(uses, hopper && requested, "CudaBackend::uses_wgmma");
        }
        assert_eq!(
            reason.contains("wgmma: on"),
            hopper && requested,
            "sm_{}{}, MLART_CUDA_WGMMA requested: {requested}; engine: {reason}",
            dev.compute_major,
            dev.compute_minor
        );
    })
}

/// The `_wg` kernels' two wgmma GEMMs alone (`CudaBackend::wgmma_probe`)
/// against host products, exactly (small integers): checks the layout
/// assumptions the kernels and the emulator share (descriptor LBO/SBO
/// roles, the transpose bit, the accumulator layout) on the hardware, on
/// any compute capability 9.0 GPU whether or not MLART_CUDA_WGMMA is set.
/// A failure prints which outputs differ, to tell a wrong layout from a
/// wrong advance.
fn cuda_wgmma_probe() -> Outcome {
    let (gpu, _) = match rust_engines() {
        Ok(pair) => pair,
        Err(why) => return Outcome::Skipped(why),
    };
    let Some(cuda) = gpu.backend().cuda() else {
        return Outcome::Skipped("not a CUDA engine".into());
    };
    let props = cuda.props();
    if (props.major, props.minor) != (9, 0) {
        return Outcome::Skipped(format!(
            "the wgmma probe needs compute capability 9.0, not {}.{}",
            props.major, props.minor
        ));
    }
    let mut rng = SmallRng::seed_from_u64(case_seed(90, 0));
    let mut mat = |n: usize| -> (Vec<u16>, Vec<f64>) {
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-4i32..=4) as f64).collect();
        (v.iter().map(|&x| bf16_bits(x as f32)).collect(), v)
    };
    let (q, qf) = mat(64 * 64);
    let (k, kf) = mat(32 * 256);
    let (p, pf) = mat(64 * 32);
    let (s, o) = cuda.wgmma_probe(&q, &k, &p).expect("wgmma probe");
    // S checks the K-major B operand, O the N-major one (the transpose
    // bit): each is reported on its own, with its first differences.
    let (mut bad_s, mut bad_o) = (Vec::new(), Vec::new());
    for r in 0..64 {
        for j in 0..32 {
            let want: f64 = (0..64).map(|d| qf[r * 64 + d] * kf[j * 256 + d]).sum();
            if s[r * 32 + j] as f64 != want {
                bad_s.push(format!("S[{r}][{j}] = {} want {want}", s[r * 32 + j]));
            }
        }
        for c in 0..256 {
            let want: f64 = (0..32).map(|t| pf[r * 32 + t] * kf[t * 256 + c]).sum();
            if o[r * 256 + c] as f64 != want {
                bad_o.push(format!("O[{r}][{c}] = {} want {want}", o[r * 256 + c]));
            }
        }
    }
    println!(
        "    wgmma probe: S (K-major B) {} of {} differ, O (N-major B) {} of {} differ",
        bad_s.len(),
        64 * 32,
        bad_o.len(),
        64 * 256
    );
    assert!(
        bad_s.is_empty() && bad_o.is_empty(),
        "wgmma probe outputs differ; first in S: {:?}; first in O: {:?}",
        &bad_s[..bad_s.len().min(8)],
        &bad_o[..bad_o.len().min(8)]
    );
    Outcome::Ran
}

fn main() {
    let tests: [Test; 16] = [
        ("cuda_wgmma_probe", cuda_wgmma_probe),
        ("cuda_wgmma_as_requested", cuda_wgmma_as_requested),
        ("cuda_dense_matrix", cuda_dense_matrix),
        ("cuda_split_kv", cuda_split_kv),
        ("cuda_sparse_matrix", cuda_sparse_matrix),
        ("cuda_device_memory_errors", cuda_device_memory_errors),
        ("cuda_plan_matches_host_twin", cuda_plan_matches_host_twin),
        ("cuda_pool_matches_cpu_pool", cuda_pool_matches_cpu_pool),
        (
            "cuda_pool_decode_device_memory",
            cuda_pool_decode_device_memory,
        ),
        ("cuda_indexer_matches_cpu", cuda_indexer_matches_cpu),
        ("cuda_graph_capture", cuda_graph_capture),
        (
            "cuda_model_forward_matches_cpu",
            cuda_model_forward_matches_cpu,
        ),
        (
            "cuda_model_projections_on_gpu",
            cuda_model_projections_on_gpu,
        ),
        ("cuda_linear_matches_float64", cuda_linear_matches_float64),
        (
            "cuda_model_forward_device_memory",
            cuda_model_forward_device_memory,
        ),
        ("cuda_model_step_driver_work", cuda_model_step_driver_work),
    ];
    // `cargo test -- NAME` filters like the standard harness does.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    println!("\nrunning {} tests", tests.len());
    for (name, f) in tests {
        if !filters.is_empty() && !filters.iter().any(|x| name.contains(x.as_str())) {
            continue;
        }
        match std::panic::catch_unwind(f) {
            Ok(Outcome::Ran) => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Ok(Outcome::Skipped(why)) => {
                skipped += 1;
                println!("test {name} ... skipped: {why}");
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED");
            }
        }
    }
    // No GPU here: the same suite on the emulated driver.
    if !emulated() && passed + failed == 0 && skipped > 0 {
        for (p, f, s) in run_emulated(&filters) {
            passed += p;
            failed += f;
            skipped += s;
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; {skipped} skipped\n",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed > 0 {
        std::process::exit(101);
    }
}

/// Builds the emulated driver and runs this binary on it as sm_80 and as
/// sm_90 (wgmma kernels on), relaying each child's test lines tagged
/// `[emulated sm_XX]`. Returns each run's (passed, failed, skipped).
fn run_emulated(filters: &[String]) -> Vec<(usize, usize, usize)> {
    use std::path::PathBuf;
    use std::process::Command;
    if mlart::backend::cuda::fatbin::fatbin().is_none() {
        println!("emulated GPU suite not run: this build has no CUDA kernels");
        return Vec::new();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fake-cuda");
    let lib = dir.join("libcuda.so.1");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    // With UBSan's alignment check, a kernel's vector access at an address a
    // GPU would fault on as misaligned (an arena offset of the host code,
    // say) stops the run; a compiler without UBSan builds it plain.
    let build = |sanitize: &[&str]| {
        Command::new(&cxx)
            .args(["-std=c++17", "-O1", "-shared", "-fPIC", "-w"])
            .args(sanitize)
            .arg("-I")
            .arg(root.join("kernels"))
            .arg(root.join("kernels/emu/fake_cuda.cpp"))
            .arg("-o")
            .arg(&lib)
            .status()
            .is_ok_and(|s| s.success())
    };
    let built = std::fs::create_dir_all(&dir).is_ok()
        && (build(&["-fsanitize=alignment", "-fno-sanitize-recover=alignment"])
            || {
                println!("note: {cxx} cannot build the emulated driver with -fsanitize=alignment; misaligned accesses go unchecked");
                build(&[])
            });
    if !built {
        println!("test emulated GPU driver (kernels/emu/fake_cuda.cpp) ... FAILED: {cxx} could not build it");
        return vec![(0, 1, 0)];
    }
    let _ = std::fs::remove_file(dir.join("libcuda.so"));
    let _ = std::os::unix::fs::symlink("libcuda.so.1", dir.join("libcuda.so"));
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    };
    let exe = std::env::current_exe().expect("this test binary's path");
    let mut runs = Vec::new();
    // As sm_90 only the tests whose kernels differ there (64-row blocks on
    // wgmma, and the probe) run again.
    let wgmma_tests: Vec<String> = [
        "cuda_wgmma_probe",
        "cuda_wgmma_as_requested",
        "cuda_dense_matrix",
        "cuda_split_kv",
        "cuda_sparse_matrix",
    ]
    .map(String::from)
    .into();
    for cc in ["80", "90"] {
        let which = if cc == "90" && filters.is_empty() {
            &wgmma_tests[..]
        } else {
            filters
        };
        println!("\n== the GPU suite on the emulated driver as sm_{cc} (CPU warp emulator: not a GPU verification)");
        let out = Command::new(&exe)
            .args(which)
            .env("LD_LIBRARY_PATH", &path)
            .env("MLART_FAKE_CUDA", "1")
            .env("MLART_FAKE_CUDA_CC", cc)
            .env("MLART_CUDA_WGMMA", if cc == "90" { "1" } else { "0" })
            .env_remove("MLART_BACKEND")
            .output()
            .expect("running this test binary on the emulated driver");
        let text = String::from_utf8_lossy(&out.stdout);
        let (mut p, mut f, mut s) = (0, 0, 0);
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("test ") {
                if line.starts_with("test result:") {
                    continue;
                }
                let tagged = rest.replacen(" ... ", &format!(" [emulated sm_{cc}] ... "), 1);
                println!("test {tagged}");
                if rest.contains(" ... ok") {
                    p += 1;
                } else if rest.contains(" ... skipped") {
                    s += 1;
                } else {
                    f += 1;
                }
            } else if !line.trim().is_empty() && !line.starts_with("running ") {
                println!("    {line}");
            }
        }
        if f > 0 || !out.status.success() {
            if f == 0 {
                println!(
                    "test emulated GPU suite [emulated sm_{cc}] ... FAILED: exit {:?}",
                    out.status.code()
                );
                f += 1;
            }
            // The panics' messages (the last part of the child's stderr).
            let err = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = err.lines().collect();
            for line in &lines[lines.len().saturating_sub(60)..] {
                println!("    {line}");
            }
        }
        runs.push((p, f, s));
    }
    runs
}
