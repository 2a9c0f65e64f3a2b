//! The model layer (`mlart_model_*`) through its C ABI, against an
//! independent float64 reference of DeepSeek's *naive* (non-absorbed) MLA
//! attention block.
//!
//! Checkpoints are written with `mlart::model::gen::generate` into a fresh
//! temporary directory per test. The reference reads the raw tensors back
//! itself (the `safetensors` crate, `serde_json` for config.json; FP8
//! weights dequantized here with their 128x128 block `weight_scale_inv`) and
//! recomputes, per token at position `p`:
//!
//! * `q = q_b(RMSNorm(q_a(x)))` or `q_proj(x)`, per head `[nope | rope]`;
//! * `kv = kv_a_proj_with_mqa(x)`, `c = RMSNorm(kv[:lora])`,
//!   `k_pe = RoPE(kv[lora:], p)`;
//! * full keys and values per head from `kv_b_proj · c`;
//! * causal softmax over the sequence's cached tokens, `o_proj`.
//!
//! RoPE (interleaved pairs, YaRN blending and mscale) and the softmax scale
//! are written from the DeepSeek / Hugging Face definitions, not from the
//! library. The engine computes the *absorbed* form through its KV pool.

mod common;

use common::{
    case_seed, e4m3_encode, e4m3_value, expect_error, expect_ok, normal, quantize_tile, rel_l2,
    take_error, Engine,
};
use half::{bf16, f16};
use mlart::ffi::model::*;
use mlart::ffi::pool::*;
use mlart::ffi::types::*;
use mlart::model::gen::{generate, GenOptions, Preset, WeightDtype};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::ptr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

// ---------------------------------------------------------------------------
// Temporary directories and checkpoints.
// ---------------------------------------------------------------------------

/// A directory under the system temp dir, unique to this process and call,
/// removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("mlart-test-model-{tag}-{}-{n}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).expect("remove a stale temp dir");
        }
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// A fresh subdirectory path (not created).
    fn sub(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn gen_opts(preset: Preset, dtype: WeightDtype, layers: usize, yarn: bool) -> GenOptions {
    GenOptions {
        preset,
        dtype,
        layers,
        seed: 7,
        shards: 1,
        yarn,
    }
}

fn make_checkpoint(dir: &Path, opts: &GenOptions) {
    if let Err(e) = generate(dir, opts) {
        panic!("generate {opts:?} into {}: {e:?}", dir.display());
    }
}

// ---------------------------------------------------------------------------
// Raw safetensors files (written by hand, read with the safetensors crate).
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct RawTensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// The tensors of one safetensors file, in data order.
fn read_safetensors(path: &Path) -> Vec<RawTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut v: Vec<(usize, RawTensor)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let off = t.data().as_ptr() as usize - bytes.as_ptr() as usize;
            (
                off,
                RawTensor {
                    name,
                    dtype: format!("{:?}", t.dtype()),
                    shape: t.shape().to_vec(),
                    data: t.data().to_vec(),
                },
            )
        })
        .collect();
    v.sort_by_key(|(o, _)| *o);
    v.into_iter().map(|(_, t)| t).collect()
}

/// 8-byte little-endian header length, the JSON header (padded with spaces
/// to a multiple of 8), then `data`; `len_override` replaces the length.
fn write_raw(path: &Path, header: &Value, data: &[u8], len_override: Option<u64>) {
    let mut h = serde_json::to_string(header).unwrap().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + data.len());
    out.extend_from_slice(&len_override.unwrap_or(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// A well-formed safetensors file of `tensors`, contiguous in the given order.
fn write_safetensors(path: &Path, tensors: &[RawTensor]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for t in tensors {
        let start = data.len();
        data.extend_from_slice(&t.data);
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, data.len()]}),
        );
    }
    write_raw(path, &Value::Object(header), &data, None);
}

// ---------------------------------------------------------------------------
// The float64 reference.
// ---------------------------------------------------------------------------

/// A `[rows, cols]` weight in f64.
struct Mat {
    cols: usize,
    w: Vec<f64>,
}

impl Mat {
    fn mv(&self, x: &[f64]) -> Vec<f64> {
        assert_eq!(x.len(), self.cols);
        self.w
            .chunks_exact(self.cols)
            .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }
}

/// Every tensor of a checkpoint directory (single file or index + shards).
struct RawCheckpoint {
    tensors: HashMap<String, RawTensor>,
}

impl RawCheckpoint {
    fn open(dir: &Path) -> RawCheckpoint {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
            let mut f: Vec<String> = v["weight_map"]
                .as_object()
                .unwrap()
                .values()
                .map(|s| s.as_str().unwrap().to_string())
                .collect();
            f.sort();
            f.dedup();
            f.into_iter().map(|s| dir.join(s)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors = HashMap::new();
        for f in files {
            for t in read_safetensors(&f) {
                tensors.insert(t.name.clone(), t);
            }
        }
        RawCheckpoint { tensors }
    }

    /// A tensor's elements as f64 (not dequantized).
    fn values(&self, name: &str) -> (Vec<usize>, Vec<f64>) {
        let t = self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference: no tensor {name}"));
        let d = &t.data;
        let v: Vec<f64> = match t.dtype.as_str() {
            "F32" => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            "BF16" => d
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes(b.try_into().unwrap()).to_f64())
                .collect(),
            "F16" => d
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes(b.try_into().unwrap()).to_f64())
                .collect(),
            "F8_E4M3" => d.iter().map(|&c| e4m3_value(c)).collect(),
            other => panic!("reference: {name} has dtype {other}"),
        };
        (t.shape.clone(), v)
    }

    /// A projection `[rows, cols]`, FP8 dequantized with its block scales:
    /// `w = e4m3(code) * scale_inv[row / 128][col / 128]`.
    fn mat(&self, name: &str, rows: usize, cols: usize) -> Mat {
        let (shape, mut w) = self.values(name);
        assert_eq!(shape, [rows, cols], "{name}");
        if self.tensors[name].dtype == "F8_E4M3" {
            let (sshape, s) = self.values(&format!("{name}_scale_inv"));
            let sc = cols.div_ceil(128);
            assert_eq!(sshape, [rows.div_ceil(128), sc]);
            for r in 0..rows {
                for c in 0..cols {
                    w[r * cols + c] *= s[(r / 128) * sc + c / 128];
                }
            }
        }
        Mat { cols, w }
    }

    fn vector(&self, name: &str, n: usize) -> Vec<f64> {
        let (shape, v) = self.values(name);
        assert_eq!(shape, [n], "{name}");
        v
    }
}

#[derive(Clone, Debug)]
struct RefYarn {
    factor: f64,
    orig: f64,
    beta_fast: f64,
    beta_slow: f64,
    mscale: f64,
    mscale_all_dim: f64,
}

#[derive(Clone, Debug)]
struct RefConfig {
    hidden: usize,
    heads: usize,
    q_lora: Option<usize>,
    lora: usize,
    nope: usize,
    rope: usize,
    v: usize,
    eps: f64,
    theta: f64,
    yarn: Option<RefYarn>,
    /// DeepSeek-V3.2's indexer: heads, head_dim, topk, power-of-two scales.
    indexer: Option<(usize, usize, usize, bool)>,
}

impl RefConfig {
    fn read(dir: &Path) -> RefConfig {
        let c: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let u = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("config {k}")) as usize;
        let f = |v: &Value, k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let yarn = c.get("rope_scaling").filter(|v| !v.is_null()).map(|r| {
            assert_eq!(r["type"], "yarn");
            RefYarn {
                factor: f(r, "factor", 1.0),
                orig: f(r, "original_max_position_embeddings", 0.0),
                beta_fast: f(r, "beta_fast", 32.0),
                beta_slow: f(r, "beta_slow", 1.0),
                mscale: f(r, "mscale", 1.0),
                mscale_all_dim: f(r, "mscale_all_dim", 0.0),
            }
        });
        RefConfig {
            hidden: u("hidden_size"),
            heads: u("num_attention_heads"),
            q_lora: c["q_lora_rank"].as_u64().map(|v| v as usize),
            lora: u("kv_lora_rank"),
            nope: u("qk_nope_head_dim"),
            rope: u("qk_rope_head_dim"),
            v: u("v_head_dim"),
            eps: f(&c, "rms_norm_eps", 1e-6),
            theta: f(&c, "rope_theta", 10000.0),
            yarn,
            indexer: (c["model_type"] == "deepseek_v32").then(|| {
                (
                    u("index_n_heads"),
                    u("index_head_dim"),
                    u("index_topk"),
                    c["quantization_config"]["scale_fmt"] == "ue8m0",
                )
            }),
        }
    }

    fn qk(&self) -> usize {
        self.nope + self.rope
    }

    fn softmax_scale(&self) -> f64 {
        let base = 1.0 / (self.qk() as f64).sqrt();
        match &self.yarn {
            Some(y) if y.factor > 1.0 => {
                let m = 0.1 * y.mscale_all_dim * y.factor.ln() + 1.0;
                base * m * m
            }
            _ => base,
        }
    }

    /// Per-pair rotation frequencies and the cos/sin multiplier.
    fn rope_tables(&self) -> (Vec<f64>, f64) {
        let d = self.rope as f64;
        let mut freq: Vec<f64> = (0..self.rope / 2)
            .map(|k| 1.0 / self.theta.powf(2.0 * k as f64 / d))
            .collect();
        let mut mult = 1.0;
        if let Some(y) = &self.yarn {
            let cd = |r: f64| {
                d * (y.orig / (r * 2.0 * std::f64::consts::PI)).ln() / (2.0 * self.theta.ln())
            };
            let low = cd(y.beta_fast).floor().max(0.0);
            let mut high = cd(y.beta_slow).ceil().min(d - 1.0);
            if low == high {
                high += 0.001;
            }
            for (k, f) in freq.iter_mut().enumerate() {
                let ramp = ((k as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let smooth = 1.0 - ramp;
                *f = *f / y.factor * (1.0 - smooth) + *f * smooth;
            }
            if y.factor > 1.0 {
                let ms = |m: f64| 0.1 * m * y.factor.ln() + 1.0;
                mult = ms(y.mscale) / ms(y.mscale_all_dim);
            }
        }
        (freq, mult)
    }
}

enum RefQ {
    Lora { a: Mat, norm: Vec<f64>, b: Mat },
    Direct(Mat),
}

struct RefLayer {
    q: RefQ,
    kv_a: Mat,
    kv_norm: Vec<f64>,
    kv_b: Mat,
    o: Mat,
    ix: Option<RefIndexer>,
}

/// DeepSeek-V3.2's indexer weights.
struct RefIndexer {
    wq_b: Mat,
    wk: Mat,
    k_norm_w: Vec<f64>,
    k_norm_b: Vec<f64>,
    weights_proj: Mat,
}

/// One cached token: full keys `[H, nope + rope]` and values `[H, v]`,
/// and (V3.2) its indexer key as E4M3 code values and their scale.
struct CachedToken {
    k: Vec<f64>,
    v: Vec<f64>,
    ik: Vec<f64>,
    ik_scale: f64,
}

/// The weights and tables of a reference model (shared by its caches).
struct RefModel {
    c: RefConfig,
    layers: HashMap<usize, RefLayer>,
    freq: Vec<f64>,
    rope_mult: f64,
    scale: f64,
}

/// How the reference stores its cache rows `[c | k_pe]` before computing
/// keys and values from them: exactly, or rounded as a pool format does.
#[derive(Clone, Copy, Debug, PartialEq)]
enum CacheRounding {
    Exact,
    Bf16,
    F16,
    /// FlashMLA V3.2: the latent in tiles of 128 as e4m3 with a power-of-two
    /// scale per tile, the rope part as bf16.
    Fp8V32,
}

impl CacheRounding {
    fn of(format: mlart_kv_format) -> CacheRounding {
        match format {
            MLART_KV_FORMAT_F32 => CacheRounding::Exact,
            MLART_KV_FORMAT_BF16 => CacheRounding::Bf16,
            MLART_KV_FORMAT_F16 => CacheRounding::F16,
            MLART_KV_FORMAT_FP8_V32 => CacheRounding::Fp8V32,
            f => panic!("no cache rounding for format {f}"),
        }
    }

    fn apply(self, latent: &mut [f64], k_pe: &mut [f64]) {
        let bf = |v: &mut f64| *v = bf16::from_f64(*v).to_f64();
        match self {
            CacheRounding::Exact => {}
            CacheRounding::Bf16 => latent.iter_mut().chain(k_pe.iter_mut()).for_each(bf),
            CacheRounding::F16 => latent
                .iter_mut()
                .chain(k_pe.iter_mut())
                .for_each(|v| *v = f16::from_f64(*v).to_f64()),
            CacheRounding::Fp8V32 => {
                assert_eq!(latent.len(), 512);
                for tile in latent.chunks_mut(128) {
                    let (codes, scale) = quantize_tile(tile);
                    for (v, c) in tile.iter_mut().zip(codes) {
                        *v = e4m3_value(c) * scale;
                    }
                }
                k_pe.iter_mut().for_each(bf);
            }
        }
    }
}

/// A reference model with its own cache.
struct Reference {
    m: Rc<RefModel>,
    rounding: CacheRounding,
    /// Round the projections' inputs to bf16 (MLART_ACTIVATIONS_BF16).
    bf16_activations: bool,
    /// (absolute layer, sequence) -> cached tokens, position = index.
    cache: HashMap<(usize, u64), Vec<CachedToken>>,
    /// V3.2: the engine's choice for the tokens of the next `forward`
    /// (`[total, topk]`), which the reference checks and attends over.
    selection: Vec<i32>,
    /// V3.2: the largest amount by which an unselected key's reference
    /// score exceeded a selected one's, relative to that query's score
    /// range (0 when the choice is exactly the reference's top-k).
    worst_choice: f64,
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

impl Reference {
    /// Reads `layers` (absolute indices) of the checkpoint in `dir`.
    fn load(dir: &Path, layers: &[usize]) -> Reference {
        let c = RefConfig::read(dir);
        let ck = RawCheckpoint::open(dir);
        let (h, hid) = (c.heads, c.hidden);
        let mut map = HashMap::new();
        for &i in layers {
            let p = format!("model.layers.{i}.self_attn.");
            let q = match c.q_lora {
                Some(r) => RefQ::Lora {
                    a: ck.mat(&format!("{p}q_a_proj.weight"), r, hid),
                    norm: ck.vector(&format!("{p}q_a_layernorm.weight"), r),
                    b: ck.mat(&format!("{p}q_b_proj.weight"), h * c.qk(), r),
                },
                None => RefQ::Direct(ck.mat(&format!("{p}q_proj.weight"), h * c.qk(), hid)),
            };
            map.insert(
                i,
                RefLayer {
                    q,
                    kv_a: ck.mat(
                        &format!("{p}kv_a_proj_with_mqa.weight"),
                        c.lora + c.rope,
                        hid,
                    ),
                    kv_norm: ck.vector(&format!("{p}kv_a_layernorm.weight"), c.lora),
                    kv_b: ck.mat(&format!("{p}kv_b_proj.weight"), h * (c.nope + c.v), c.lora),
                    o: ck.mat(&format!("{p}o_proj.weight"), hid, h * c.v),
                    ix: c.indexer.map(|(ih, id, _, _)| {
                        let x = format!("{p}indexer.");
                        RefIndexer {
                            wq_b: ck.mat(&format!("{x}wq_b.weight"), ih * id, c.q_lora.unwrap()),
                            wk: ck.mat(&format!("{x}wk.weight"), id, hid),
                            k_norm_w: ck.vector(&format!("{x}k_norm.weight"), id),
                            k_norm_b: ck.vector(&format!("{x}k_norm.bias"), id),
                            weights_proj: ck.mat(&format!("{x}weights_proj.weight"), ih, hid),
                        }
                    }),
                },
            );
        }
        let (freq, rope_mult) = c.rope_tables();
        let m = RefModel {
            scale: c.softmax_scale(),
            c,
            layers: map,
            freq,
            rope_mult,
        };
        Reference {
            m: Rc::new(m),
            rounding: CacheRounding::Exact,
            bf16_activations: false,
            cache: HashMap::new(),
            selection: Vec::new(),
            worst_choice: 0.0,
        }
    }

    /// The same weights with an empty cache whose rows are rounded as `r`.
    fn fresh(&self, rounding: CacheRounding) -> Reference {
        Reference {
            m: self.m.clone(),
            rounding,
            bf16_activations: self.bf16_activations,
            cache: HashMap::new(),
            selection: Vec::new(),
            worst_choice: 0.0,
        }
    }

    /// A projection's input as the engine takes it.
    fn act(&self, x: &[f64]) -> Vec<f64> {
        if self.bf16_activations {
            x.iter().map(|&v| bf16::from_f64(v).to_f64()).collect()
        } else {
            x.to_vec()
        }
    }

    /// DeepSeek's interleaved rotation of `x` (length rope) at `pos`.
    fn rope(&self, x: &mut [f64], pos: usize) {
        for k in 0..x.len() / 2 {
            let angle = pos as f64 * self.m.freq[k];
            let (s, c) = (
                angle.sin() * self.m.rope_mult,
                angle.cos() * self.m.rope_mult,
            );
            let (a, b) = (x[2 * k], x[2 * k + 1]);
            x[2 * k] = a * c - b * s;
            x[2 * k + 1] = a * s + b * c;
        }
    }

    fn len(&self, layer: usize, seq: u64) -> usize {
        self.cache.get(&(layer, seq)).map_or(0, |v| v.len())
    }

    /// DeepSeek's half-split (NeoX) rotation of the first `rope` elements
    /// of `x` at `pos`: pairs `(x[k], x[k + rope/2])` (V3.2's indexer).
    fn rope_half(&self, x: &mut [f64], pos: usize) {
        let half = self.m.c.rope / 2;
        for k in 0..half {
            let angle = pos as f64 * self.m.freq[k];
            let (s, c) = (
                angle.sin() * self.m.rope_mult,
                angle.cos() * self.m.rope_mult,
            );
            let (a, b) = (x[k], x[k + half]);
            x[k] = a * c - b * s;
            x[k + half] = a * s + b * c;
        }
    }

    /// V3.2's indexer for one token: its query code values per head
    /// `[ih, id]`, head weights `[ih]` (scales folded in), and its key's
    /// code values and scale.
    fn indexer_token(
        &self,
        ix: &RefIndexer,
        x: &[f64],
        qr: &[f64],
        pos: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, f64) {
        let (ih, id, _, pow2) = self.m.c.indexer.unwrap();
        // The Hadamard matrix H[r][c] = (-1)^popcount(r & c) / sqrt(id).
        let hadamard = |v: &[f64]| -> Vec<f64> {
            (0..id)
                .map(|r| {
                    (0..id)
                        .map(|c| {
                            if (r & c).count_ones() % 2 == 0 {
                                v[c]
                            } else {
                                -v[c]
                            }
                        })
                        .sum::<f64>()
                        / (id as f64).sqrt()
                })
                .collect()
        };
        let quantize = |v: &[f64]| -> (Vec<f64>, f64) {
            let amax = v.iter().fold(0f64, |m, a| m.max(a.abs())).max(1e-4);
            let s = if pow2 {
                2f64.powf((amax / 448.0).log2().ceil())
            } else {
                amax / 448.0
            };
            let codes = v
                .iter()
                .map(|&a| e4m3_value(e4m3_encode((a / s).clamp(-448.0, 448.0))))
                .collect();
            (codes, s)
        };
        let q = ix.wq_b.mv(&self.act(qr));
        let w = ix.weights_proj.mv(x);
        let mut qc = Vec::with_capacity(ih * id);
        let mut wt = Vec::with_capacity(ih);
        for h in 0..ih {
            let mut qh = q[h * id..(h + 1) * id].to_vec();
            self.rope_half(&mut qh, pos);
            let (codes, s) = quantize(&hadamard(&qh));
            qc.extend(codes);
            wt.push(w[h] / (ih as f64).sqrt() * s / (id as f64).sqrt());
        }
        let k = ix.wk.mv(x);
        let mean = k.iter().sum::<f64>() / id as f64;
        let var = k.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / id as f64;
        let mut k: Vec<f64> = k
            .iter()
            .zip(&ix.k_norm_w)
            .zip(&ix.k_norm_b)
            .map(|((v, g), b)| (v - mean) / (var + 1e-6).sqrt() * g + b)
            .collect();
        self.rope_half(&mut k, pos);
        let (kc, ks) = quantize(&hadamard(&k));
        (qc, wt, kc, ks)
    }

    /// One token of `seq` through `layer`: appends its keys/values, then
    /// attends causally over the sequence's cache; returns `[hidden]`.
    /// For a V3.2 model `sel` is the engine's choice of positions for this
    /// token (`[topk]`): it must be every position when there are at most
    /// topk, else a top-k of the reference's scores (its worst deviation is
    /// recorded); the attention then runs over it.
    fn token(&mut self, layer: usize, seq: u64, x: &[f64], sel: Option<&[i32]>) -> Vec<f64> {
        let m = self.m.clone();
        let c = &m.c;
        let (h, nope, v, qk) = (c.heads, c.nope, c.v, c.qk());
        let pos = self.len(layer, seq);
        let lw = &m.layers[&layer];
        let x = &self.act(x);
        let mut qr = Vec::new();
        let mut q = match &lw.q {
            RefQ::Lora { a, norm, b } => {
                qr = rms_norm(&a.mv(x), norm, c.eps);
                b.mv(&self.act(&qr))
            }
            RefQ::Direct(w) => w.mv(x),
        };
        let (iq, iw, ik, ik_scale) = match &lw.ix {
            Some(ix) => self.indexer_token(ix, x, &qr, pos),
            None => (Vec::new(), Vec::new(), Vec::new(), 0.0),
        };
        let kv = lw.kv_a.mv(x);
        let mut latent = rms_norm(&kv[..c.lora], &lw.kv_norm, c.eps);
        let mut k_pe = kv[c.lora..].to_vec();
        self.rope(&mut k_pe, pos);
        self.rounding.apply(&mut latent, &mut k_pe);
        // Naive MLA: per-head keys and values from the latent.
        let kvb = lw.kv_b.mv(&latent);
        let mut k = vec![0f64; h * qk];
        let mut vals = vec![0f64; h * v];
        for head in 0..h {
            let row = &kvb[head * (nope + v)..(head + 1) * (nope + v)];
            k[head * qk..head * qk + nope].copy_from_slice(&row[..nope]);
            k[head * qk + nope..(head + 1) * qk].copy_from_slice(&k_pe);
            vals[head * v..(head + 1) * v].copy_from_slice(&row[nope..]);
        }
        for head in 0..h {
            let mut pe = q[head * qk + nope..(head + 1) * qk].to_vec();
            self.rope(&mut pe, pos);
            q[head * qk + nope..(head + 1) * qk].copy_from_slice(&pe);
        }
        let cache = self.cache.entry((layer, seq)).or_default();
        cache.push(CachedToken {
            k,
            v: vals,
            ik,
            ik_scale,
        });
        // The positions attended to: all, or (V3.2) the engine's choice,
        // checked against the reference's indexer scores.
        let mut keep = vec![true; cache.len()];
        if let Some((_, id, topk, _)) = c.indexer {
            let sel = sel.expect("a V3.2 reference token needs the engine's selection");
            assert_eq!(sel.len(), topk);
            let n = pos + 1;
            if n <= topk {
                let want: Vec<i32> = (0..topk as i32)
                    .map(|i| if i < n as i32 { i } else { -1 })
                    .collect();
                assert_eq!(
                    sel,
                    &want[..],
                    "seq {seq} position {pos}: every earlier position"
                );
            } else {
                assert!(
                    sel.windows(2).all(|w| w[0] < w[1]) && sel[0] >= 0 && sel[topk - 1] < n as i32,
                    "seq {seq} position {pos}: selection {sel:?} is not {topk} ascending positions in [0, {n})"
                );
                let scores: Vec<f64> = cache
                    .iter()
                    .map(|t| {
                        t.ik_scale
                            * iq.chunks_exact(id)
                                .zip(&iw)
                                .map(|(qh, w)| {
                                    w * qh
                                        .iter()
                                        .zip(&t.ik)
                                        .map(|(a, b)| a * b)
                                        .sum::<f64>()
                                        .max(0.0)
                                })
                                .sum::<f64>()
                    })
                    .collect();
                keep = vec![false; n];
                for &p in sel {
                    keep[p as usize] = true;
                }
                let lo = (0..n)
                    .filter(|&i| keep[i])
                    .map(|i| scores[i])
                    .fold(f64::INFINITY, f64::min);
                let hi = (0..n)
                    .filter(|&i| !keep[i])
                    .map(|i| scores[i])
                    .fold(f64::NEG_INFINITY, f64::max);
                let range = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
                    - scores.iter().cloned().fold(f64::INFINITY, f64::min);
                let dev = ((hi - lo) / range.max(1e-300)).max(0.0);
                self.worst_choice = self.worst_choice.max(dev);
            }
        }
        let cache = &self.cache[&(layer, seq)];
        let mut attn = vec![0f64; h * v];
        for head in 0..h {
            let qh = &q[head * qk..(head + 1) * qk];
            let scores: Vec<f64> = cache
                .iter()
                .zip(&keep)
                .map(|(t, &kept)| {
                    if !kept {
                        return f64::NEG_INFINITY;
                    }
                    let kh = &t.k[head * qk..(head + 1) * qk];
                    qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f64>() * m.scale
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for (t, w) in cache.iter().zip(&e) {
                for d in 0..v {
                    attn[head * v + d] += w / z * t.v[head * v + d];
                }
            }
        }
        lw.o.mv(&self.act(&attn))
    }

    /// A batch as `mlart_model_forward` takes it: `x [sum(n), hidden]`
    /// sequence by sequence; returns `[sum(n), hidden]`.
    fn forward(&mut self, layer: usize, seqs: &[u64], n_tokens: &[usize], x: &[f32]) -> Vec<f64> {
        let hid = self.m.c.hidden;
        let mut out = Vec::with_capacity(x.len());
        let mut t = 0;
        for (&s, &n) in seqs.iter().zip(n_tokens) {
            for _ in 0..n {
                let xt: Vec<f64> = x[t * hid..(t + 1) * hid]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let sel = self
                    .m
                    .c
                    .indexer
                    .map(|(_, _, topk, _)| self.selection[t * topk..(t + 1) * topk].to_vec());
                out.extend(self.token(layer, s, &xt, sel.as_deref()));
                t += 1;
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// C ABI wrappers.
// ---------------------------------------------------------------------------

type Failure = (mlart_status, String);

struct Model {
    ptr: *mut mlart_model,
}

impl Drop for Model {
    fn drop(&mut self) {
        mlart_model_free(self.ptr);
    }
}

fn model_options() -> mlart_model_options {
    let mut o = MaybeUninit::<mlart_model_options>::uninit();
    mlart_model_options_init(o.as_mut_ptr());
    // SAFETY: initialized just above.
    unsafe { o.assume_init() }
}

fn load_with(
    engine: &Engine,
    dir: &Path,
    edit: impl FnOnce(&mut mlart_model_options),
) -> Result<Model, Failure> {
    let mut o = model_options();
    edit(&mut o);
    let path = CString::new(dir.to_str().unwrap()).unwrap();
    let mut out: *mut mlart_model = ptr::null_mut();
    match take_error(mlart_model_load(engine.ptr, path.as_ptr(), &o, &mut out)) {
        None => {
            assert!(!out.is_null());
            Ok(Model { ptr: out })
        }
        Some(f) => {
            assert!(out.is_null(), "out written by a failed load");
            Err(f)
        }
    }
}

#[track_caller]
fn load(engine: &Engine, dir: &Path) -> Model {
    match load_with(engine, dir, |_| {}) {
        Ok(m) => m,
        Err((s, msg)) => panic!("load {}: status {s}: {msg}", dir.display()),
    }
}

#[track_caller]
fn load_err(engine: &Engine, dir: &Path, status: mlart_status, needles: &[&str]) -> String {
    load_err_with(engine, dir, |_| {}, status, needles)
}

#[track_caller]
fn load_err_with(
    engine: &Engine,
    dir: &Path,
    edit: impl FnOnce(&mut mlart_model_options),
    status: mlart_status,
    needles: &[&str],
) -> String {
    match load_with(engine, dir, edit) {
        Ok(_) => panic!(
            "load {} succeeded, want {}",
            dir.display(),
            common::status_name(status)
        ),
        Err((code, msg)) => {
            assert_eq!(
                code,
                status,
                "load {}: got {} ({msg}), want {}",
                dir.display(),
                common::status_name(code),
                common::status_name(status)
            );
            for n in needles {
                assert!(msg.contains(n), "message {msg:?} does not mention {n:?}");
            }
            msg
        }
    }
}

fn info(m: &Model) -> mlart_model_props {
    let mut p = MaybeUninit::<mlart_model_props>::uninit();
    mlart_model_props_init(p.as_mut_ptr());
    // SAFETY: initialized just above.
    let mut p = unsafe { p.assume_init() };
    expect_ok("mlart_model_info", mlart_model_info(m.ptr, &mut p));
    p
}

struct Pool {
    ptr: *mut mlart_kv_pool,
}

impl Drop for Pool {
    fn drop(&mut self) {
        mlart_kv_pool_free(self.ptr);
    }
}

impl Pool {
    fn new(
        engine: &Engine,
        format: mlart_kv_format,
        d_qk: i32,
        layers: i32,
        block_size: i32,
        blocks: i32,
    ) -> Pool {
        let mut o = MaybeUninit::<mlart_kv_pool_options>::uninit();
        mlart_kv_pool_options_init(o.as_mut_ptr());
        // SAFETY: initialized just above.
        let mut o = unsafe { o.assume_init() };
        o.kv_format = format;
        o.d_qk = d_qk;
        o.num_layers = layers;
        o.block_size = block_size;
        o.num_blocks = blocks;
        let mut p = ptr::null_mut();
        expect_ok(
            "mlart_kv_pool_create",
            mlart_kv_pool_create(engine.ptr, &o, &mut p),
        );
        Pool { ptr: p }
    }

    fn with_seqs(self, ids: &[u64]) -> Pool {
        for &id in ids {
            expect_ok("mlart_kv_seq_create", mlart_kv_seq_create(self.ptr, id));
        }
        self
    }

    fn len(&self, seq: u64, layer: i32) -> i64 {
        let mut n = -1;
        expect_ok(
            "mlart_kv_seq_length",
            mlart_kv_seq_length(self.ptr, seq, layer, &mut n),
        );
        n
    }

    fn stats(&self) -> [i64; 6] {
        let mut s = MaybeUninit::<mlart_kv_pool_stats>::uninit();
        mlart_kv_pool_stats_init(s.as_mut_ptr());
        // SAFETY: initialized just above.
        let mut s = unsafe { s.assume_init() };
        expect_ok(
            "mlart_kv_pool_stats_get",
            mlart_kv_pool_stats_get(self.ptr, &mut s),
        );
        [
            s.blocks_total,
            s.blocks_used,
            s.blocks_free,
            s.sequences,
            s.bytes_per_block,
            s.bytes_total,
        ]
    }
}

fn forward_args() -> mlart_forward_args {
    let mut a = MaybeUninit::<mlart_forward_args>::uninit();
    mlart_forward_args_init(a.as_mut_ptr());
    // SAFETY: initialized just above.
    unsafe { a.assume_init() }
}

/// `mlart_model_forward` with f32 activations.
fn forward(
    m: &Model,
    pool: &Pool,
    layer: i32,
    seqs: &[u64],
    n_tokens: &[i32],
    x: &[f32],
) -> Result<Vec<f32>, Failure> {
    let total: i32 = n_tokens.iter().sum();
    let hid = x.len() / total.max(1) as usize;
    let mut out = vec![f32::NAN; total.max(0) as usize * hid];
    let mut a = forward_args();
    a.layer = layer;
    a.batch = seqs.len() as i32;
    a.seq_ids = seqs.as_ptr();
    a.n_tokens = n_tokens.as_ptr();
    a.x = x.as_ptr() as *const c_void;
    a.out = out.as_mut_ptr() as *mut c_void;
    match take_error(mlart_model_forward(m.ptr, pool.ptr, &a)) {
        None => Ok(out),
        Some(f) => {
            assert!(
                out.iter().all(|v| v.is_nan()),
                "out written by a failed forward"
            );
            Err(f)
        }
    }
}

#[track_caller]
fn forward_ok(
    m: &Model,
    pool: &Pool,
    layer: i32,
    seqs: &[u64],
    n_tokens: &[i32],
    x: &[f32],
) -> Vec<f32> {
    match forward(m, pool, layer, seqs, n_tokens, x) {
        Ok(y) => y,
        Err((s, msg)) => panic!(
            "forward layer {layer} {seqs:?} {n_tokens:?}: {} ({s}): {msg}",
            common::status_name(s)
        ),
    }
}

#[track_caller]
fn forward_err(
    what: &str,
    r: Result<Vec<f32>, Failure>,
    status: mlart_status,
    needles: &[&str],
) -> String {
    match r {
        Ok(_) => panic!("{what}: forward succeeded"),
        Err((code, msg)) => {
            assert_eq!(
                code,
                status,
                "{what}: got {} ({msg}), want {}",
                common::status_name(code),
                common::status_name(status)
            );
            for n in needles {
                assert!(
                    msg.contains(n),
                    "{what}: message {msg:?} does not mention {n:?}"
                );
            }
            msg
        }
    }
}

fn random_x(seed: u64, tokens: usize, hidden: usize) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(case_seed(0x6d6f_64656c, seed));
    (0..tokens * hidden)
        .map(|_| normal(&mut rng) as f32)
        .collect()
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Checks the engine output against the reference; returns the rel-L2.
#[track_caller]
fn compare(what: &str, got: &[f32], want: &[f64], tol: f64) -> f64 {
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    let e = rel_l2(&to_f64(got), want);
    println!("{what}: rel-L2 {e:.3e} (tolerance {tol:.0e})");
    assert!(e <= tol, "{what}: rel-L2 {e:.3e} > {tol:.0e}");
    e
}

/// Relative L2 of token `t`'s row.
fn row_rel(a: &[f32], b: &[f32], hid: usize, ta: usize, tb: usize) -> f64 {
    rel_l2(
        &to_f64(&a[ta * hid..(ta + 1) * hid]),
        &to_f64(&b[tb * hid..(tb + 1) * hid]),
    )
}

fn kv_format_name(f: mlart_kv_format) -> &'static str {
    match f {
        MLART_KV_FORMAT_F32 => "F32",
        MLART_KV_FORMAT_BF16 => "BF16",
        MLART_KV_FORMAT_F16 => "F16",
        MLART_KV_FORMAT_FP8_V32 => "FP8_V32",
        _ => "?",
    }
}

// ---------------------------------------------------------------------------
// Engine vs reference.
// ---------------------------------------------------------------------------

/// One forward of a schedule: layer, sequences, tokens per sequence.
type Step = (usize, Vec<u64>, Vec<i32>);

/// A pool format with two tolerances: against the exact reference, and
/// against the reference whose cache rows are rounded as the format does.
type PoolCase = (mlart_kv_format, f64, f64);

/// Runs `steps` through the engine (one pool per format in `pools`, each
/// with `pool_layers` layers, layer `l` using pool layer `l - first`) and
/// through the reference (layers `first..first + pool_layers` of `dir`),
/// checking each step's output and every pool length.
#[allow(clippy::too_many_arguments)]
fn run_schedule(
    what: &str,
    engine: &Engine,
    model: &Model,
    dir: &Path,
    first: usize,
    pool_layers: i32,
    pools: &[PoolCase],
    steps: &[Step],
    block_size: i32,
) {
    let layers: Vec<usize> = (first..first + pool_layers as usize).collect();
    let reference = Reference::load(dir, &layers);
    let _ = run_schedule_against(
        what,
        engine,
        model,
        reference,
        first,
        pool_layers,
        pools,
        steps,
        block_size,
    );
}

/// [`run_schedule`] against a given reference (layers `first..first +
/// pool_layers`, empty cache); returns each step's rel-L2 per pool format
/// against that reference.
#[allow(clippy::too_many_arguments)]
fn run_schedule_against(
    what: &str,
    engine: &Engine,
    model: &Model,
    mut exact: Reference,
    first: usize,
    pool_layers: i32,
    pools: &[PoolCase],
    steps: &[Step],
    block_size: i32,
) -> Vec<(mlart_kv_format, f64)> {
    let p = info(model);
    let hid = p.hidden_size as usize;
    let mut errors = Vec::new();
    let mut rounded: Vec<Reference> = pools
        .iter()
        .map(|&(fmt, _, _)| exact.fresh(CacheRounding::of(fmt)))
        .collect();
    let mut all_seqs: Vec<u64> = steps.iter().flat_map(|s| s.1.clone()).collect();
    all_seqs.sort();
    all_seqs.dedup();
    let pool_objs: Vec<Pool> = pools
        .iter()
        .map(|&(fmt, _, _)| {
            Pool::new(engine, fmt, p.d_qk, pool_layers, block_size, 256).with_seqs(&all_seqs)
        })
        .collect();
    for (k, (layer, seqs, n)) in steps.iter().enumerate() {
        let total: i32 = n.iter().sum();
        let x = random_x(k as u64 * 131 + *layer as u64, total as usize, hid);
        let nu: Vec<usize> = n.iter().map(|&v| v as usize).collect();
        let want = exact.forward(*layer, seqs, &nu, &x);
        for ((pool, &(fmt, tol, tol_rounded)), r) in
            pool_objs.iter().zip(pools).zip(rounded.iter_mut())
        {
            let got = forward_ok(model, pool, *layer as i32, seqs, n, &x);
            let case = format!(
                "{what} pool {} step {k} layer {layer} seqs {seqs:?} n {n:?}",
                kv_format_name(fmt)
            );
            compare(&case, &got, &want, tol);
            errors.push((fmt, rel_l2(&to_f64(&got), &want)));
            let want_r = r.forward(*layer, seqs, &nu, &x);
            compare(
                &format!("{case} (rounded rows)"),
                &got,
                &want_r,
                tol_rounded,
            );
            for &s in &all_seqs {
                for l in 0..pool_layers {
                    let abs = l as usize + first;
                    assert_eq!(
                        pool.len(s, l) as usize,
                        exact.len(abs, s),
                        "{what}: length of seq {s} in pool layer {l} after step {k}"
                    );
                }
            }
        }
    }
    errors
}

/// Prefill of three sequences of different lengths in one forward, a second
/// chunk in another order, then decode steps; on both layers.
fn standard_schedule(layers: &[usize]) -> Vec<Step> {
    let mut steps = Vec::new();
    let plan: [(Vec<u64>, Vec<i32>); 5] = [
        (vec![10, 11, 12], vec![1, 5, 3]),
        (vec![12, 10], vec![2, 4]),
        (vec![10, 11, 12], vec![1, 1, 1]),
        (vec![11], vec![1]),
        (vec![12, 11, 10], vec![1, 1, 1]),
    ];
    for (seqs, n) in plan {
        for &l in layers {
            steps.push((l, seqs.clone(), n.clone()));
        }
    }
    steps
}

/// F32 pools against the reference, whatever the weight dtype: the
/// reference reads the very values stored in the checkpoint (bf16, f16, f32,
/// or FP8 dequantized with its block scales), so only f32 arithmetic
/// separates the two (measured: a few 1e-7).
const EXACT: f64 = 1e-4;
/// BF16 / F16 pools against the exact reference (measured: 4.6e-3 with the
/// bf16 attention / 3e-4).
const ROUNDED_ROWS: f64 = 1e-2;
/// FP8_V32 pools (e4m3 latent) against the exact reference (measured: 3e-2).
const FP8_ROWS: f64 = 5e-2;
/// F16 pools against the reference whose rows are rounded the same way
/// (attention in f32). Not 1e-7: the engine's f32 latent and the
/// reference's f64 one can round to neighbouring values (measured: up to
/// 1.2e-4 at d_qk 576, 1e-7 on the tiny model).
const SAME_ROUNDING: f64 = 5e-4;
/// BF16 pools against rows rounded the same way. Over a bf16-valued cache
/// the attention takes bf16 queries and gives a bf16 latent output (with P
/// in bf16), as DeepSeek's reference does; the f64 reference keeps them
/// exact (measured: up to 3.5e-3 on single-token steps of the tiny model).
const SAME_ROUNDING_BF16: f64 = 6e-3;
/// FP8_V32 pools against rows quantized as FlashMLA does, with the bf16
/// attention above (measured: 2.2e-3; one e4m3 code landing on a
/// neighbour would add about 1e-3).
const SAME_FP8: f64 = 6e-3;

const F32_POOL: PoolCase = (MLART_KV_FORMAT_F32, EXACT, EXACT);
const BF16_POOL: PoolCase = (MLART_KV_FORMAT_BF16, ROUNDED_ROWS, SAME_ROUNDING_BF16);
const F16_POOL: PoolCase = (MLART_KV_FORMAT_F16, ROUNDED_ROWS, SAME_ROUNDING);
const FP8_V32_POOL: PoolCase = (MLART_KV_FORMAT_FP8_V32, FP8_ROWS, SAME_FP8);

#[test]
fn tiny_bf16_yarn_two_layers_matches_reference() {
    let dir = TempDir::new("tiny-bf16-yarn");
    let opts = gen_opts(Preset::Tiny, WeightDtype::Bf16, 2, true);
    make_checkpoint(dir.path(), &opts);
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    run_schedule(
        "tiny bf16 yarn",
        &engine,
        &model,
        dir.path(),
        0,
        2,
        &[F32_POOL, BF16_POOL],
        &standard_schedule(&[0, 1]),
        4,
    );
}

/// F32 pools with bf16 activations against a reference that rounds the
/// same inputs. Rounding mid-layer values (the normed q_a output, the
/// attention output) can land the engine's f32 value and the reference's
/// f64 one on neighbouring bf16 values: measured up to 5.3e-4 on a step
/// with such a flip, about 5e-8 on the others.
const BF16_ACT_F32: f64 = 1.5e-3;
/// BF16 pools with bf16 activations against rows rounded the same way
/// (measured: up to 3.4e-3, as with precise activations).
const BF16_ACT_BF16: f64 = SAME_ROUNDING_BF16;

/// MLART_ACTIVATIONS_BF16: the projections take their inputs rounded to
/// bf16. Against a reference that rounds the same inputs, FP8 and bf16
/// weights, F32 and BF16 pools, decode steps and prefill chunks (9 tokens
/// in a forward: the GEMM path). The two references differ by 2.7e-3; on
/// most steps the F32 pool must be within 1e-5 of the rounded reference,
/// so a model that ignored the option would fail.
#[test]
fn bf16_activations_match_reference() {
    for dtype in [WeightDtype::Bf16, WeightDtype::Fp8] {
        let dir = TempDir::new("tiny-bf16-activations");
        make_checkpoint(dir.path(), &gen_opts(Preset::Tiny, dtype, 2, true));
        let engine = Engine::new(2);
        let model = match load_with(&engine, dir.path(), |o| {
            o.activations = MLART_ACTIVATIONS_BF16
        }) {
            Ok(m) => m,
            Err((s, msg)) => panic!("load with bf16 activations: status {s}: {msg}"),
        };
        let mut reference = Reference::load(dir.path(), &[0, 1]);
        reference.bf16_activations = true;
        let hid = info(&model).hidden_size as usize;
        let x = random_x(99, 6, hid);
        let mut plain = reference.fresh(CacheRounding::Exact);
        plain.bf16_activations = false;
        let d = rel_l2(
            &plain.forward(0, &[1], &[6], &x),
            &reference
                .fresh(CacheRounding::Exact)
                .forward(0, &[1], &[6], &x),
        );
        assert!(d > 1e-3, "{dtype:?}: the references differ by only {d:.2e}");
        let errors = run_schedule_against(
            &format!("tiny {dtype:?} bf16 activations"),
            &engine,
            &model,
            reference,
            0,
            2,
            &[
                (MLART_KV_FORMAT_F32, BF16_ACT_F32, BF16_ACT_F32),
                (MLART_KV_FORMAT_BF16, ROUNDED_ROWS, BF16_ACT_BF16),
            ],
            &standard_schedule(&[0, 1]),
            4,
        );
        let mut f32_errors: Vec<f64> = errors
            .iter()
            .filter(|e| e.0 == MLART_KV_FORMAT_F32)
            .map(|e| e.1)
            .collect();
        f32_errors.sort_by(f64::total_cmp);
        let median = f32_errors[f32_errors.len() / 2];
        assert!(
            median <= 1e-5,
            "{dtype:?}: median F32-pool step error {median:.2e} (all: {f32_errors:?})"
        );
    }
}

/// A model is documented as usable from many threads at once on disjoint
/// sequences, and its per-call buffers are shared (reused through a lock):
/// four threads each prefill their own sequence of one pool (chunks of more
/// than four tokens: the GEMM path and its reused buffers) and decode it, on
/// both layers, with precise and with bf16 activations. Every output must
/// equal the same calls made one at a time.
#[test]
fn concurrent_forwards_on_one_model() {
    let dir = TempDir::new("tiny-concurrent");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::Tiny, WeightDtype::Fp8, 2, true),
    );
    let engine = Engine::new(2);
    const CLIENTS: u64 = 4;
    let ids: Vec<u64> = (0..CLIENTS).collect();
    for activations in [MLART_ACTIVATIONS_PRECISE, MLART_ACTIVATIONS_BF16] {
        let model = load_with(&engine, dir.path(), |o| o.activations = activations)
            .unwrap_or_else(|(s, m)| panic!("load: {s}: {m}"));
        let p = info(&model);
        let hid = p.hidden_size as usize;
        // Client c: a prefill of 6 + c tokens, then 4 decode steps, each
        // through layer 0 and then layer 1.
        let calls = |c: u64| -> Vec<(i32, i32, Vec<f32>)> {
            let mut v = Vec::new();
            for (k, n) in std::iter::once(6 + c as i32).chain([1; 4]).enumerate() {
                for layer in 0..2 {
                    let seed = c * 1000 + k as u64 * 10 + layer as u64;
                    v.push((layer, n, random_x(seed, n as usize, hid)));
                }
            }
            v
        };
        let run = |model: &Model, pool: &Pool, c: u64| -> Vec<Vec<f32>> {
            calls(c)
                .iter()
                .map(|(layer, n, x)| forward_ok(model, pool, *layer, &[c], &[*n], x))
                .collect()
        };
        let new_pool =
            || Pool::new(&engine, MLART_KV_FORMAT_BF16, p.d_qk, 2, 4, 64).with_seqs(&ids);
        let one_at_a_time = new_pool();
        let want: Vec<Vec<Vec<f32>>> = ids
            .iter()
            .map(|&c| run(&model, &one_at_a_time, c))
            .collect();

        /// The model and pool, shared by the client threads.
        struct Shared<'a>(&'a Model, &'a Pool);
        // SAFETY: mlart_model and mlart_kv_pool are documented thread-safe
        // for forwards on disjoint sequences, which is all the threads do.
        unsafe impl Sync for Shared<'_> {}
        let pool = new_pool();
        let shared = Shared(&model, &pool);
        let got: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
            let threads: Vec<_> = ids
                .iter()
                .map(|&c| {
                    let (shared, run) = (&shared, &run);
                    scope.spawn(move || run(shared.0, shared.1, c))
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("client thread panicked"))
                .collect()
        });
        for (c, (g, w)) in got.iter().zip(&want).enumerate() {
            for (k, (gk, wk)) in g.iter().zip(w).enumerate() {
                let e = rel_l2(&to_f64(gk), &to_f64(wk));
                assert!(
                    e <= 1e-6,
                    "activations {activations}: client {c} call {k}: rel-L2 {e:.2e} against the same call alone"
                );
            }
        }
        assert_eq!(pool.stats(), one_at_a_time.stats());
    }
}

/// The projections follow the engine's CPU kernel variant: forced to
/// scalar, avx2, avx512 and avx512bf16 (each where this CPU runs it;
/// skipped by name otherwise), `projection_isa` says so and the layer
/// matches the reference on FP8 and bf16 weights, decode steps and
/// prefill chunks, precise and bf16 activations.
#[test]
fn every_cpu_isa_matches_reference() {
    let dirs: Vec<(TempDir, WeightDtype)> = [WeightDtype::Bf16, WeightDtype::Fp8]
        .into_iter()
        .map(|dtype| {
            let dir = TempDir::new("tiny-isa");
            make_checkpoint(dir.path(), &gen_opts(Preset::Tiny, dtype, 1, true));
            (dir, dtype)
        })
        .collect();
    let mut ran = 0;
    for (isa, want) in [
        ("scalar", MLART_CPU_ISA_SCALAR),
        ("avx2", MLART_CPU_ISA_AVX2),
        ("avx512", MLART_CPU_ISA_AVX512),
        ("avx512bf16", MLART_CPU_ISA_AVX512_BF16),
    ] {
        let Some(engine) = Engine::with_isa(isa, 2) else {
            println!("SKIPPED model projections on {isa}: this CPU or build lacks it");
            continue;
        };
        for (dir, dtype) in &dirs {
            for activations in [MLART_ACTIVATIONS_PRECISE, MLART_ACTIVATIONS_BF16] {
                let model = load_with(&engine, dir.path(), |o| o.activations = activations)
                    .unwrap_or_else(|(s, m)| panic!("{isa}: load: {s}: {m}"));
                let p = info(&model);
                // The bf16 level also needs AVX512-VBMI; a CPU with
                // AVX512-BF16 but not VBMI runs the avx512 code.
                assert!(
                    p.projection_isa == want
                        || (want == MLART_CPU_ISA_AVX512_BF16
                            && p.projection_isa == MLART_CPU_ISA_AVX512),
                    "{isa}: projection_isa {}",
                    p.projection_isa
                );
                let mut reference = Reference::load(dir.path(), &[0]);
                reference.bf16_activations = activations == MLART_ACTIVATIONS_BF16;
                let f32_tol = if reference.bf16_activations {
                    BF16_ACT_F32
                } else {
                    EXACT
                };
                let _ = run_schedule_against(
                    &format!("{isa} {dtype:?} activations {activations}"),
                    &engine,
                    &model,
                    reference,
                    0,
                    1,
                    &[
                        (MLART_KV_FORMAT_F32, f32_tol, f32_tol),
                        (MLART_KV_FORMAT_BF16, ROUNDED_ROWS, SAME_ROUNDING_BF16),
                    ],
                    &standard_schedule(&[0]),
                    4,
                );
            }
        }
        ran += 1;
    }
    assert!(ran >= 1, "no CPU kernel variant ran");
}

/// A forward of more than one pass (512 tokens) runs each sequence in
/// passes, appending before attending: against the reference, with pool
/// lengths checked and decode steps after it.
/// Prefills in passes (600 + 530 tokens at once, decode steps, then 1030
/// more after 601) through a one-layer model, against the float64
/// reference over F32 and BF16 pools.
fn run_passes(what: &str, engine: &Engine, model: &Model, dir: &Path) {
    let steps: Vec<Step> = vec![
        (0, vec![1, 2], vec![600, 530]),
        (0, vec![2, 1], vec![1, 1]),
        (0, vec![1], vec![1030]),
    ];
    run_schedule(
        what,
        engine,
        model,
        dir,
        0,
        1,
        &[F32_POOL, BF16_POOL],
        &steps,
        64,
    );
}

#[test]
fn long_forward_runs_in_passes() {
    let dir = TempDir::new("tiny-passes");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::Tiny, WeightDtype::Bf16, 1, true),
    );
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    run_passes("tiny passes", &engine, &model, dir.path());
    // A pass that cannot get its blocks: every sequence goes back to its
    // length before the call (earlier passes appended already).
    let pool = Pool::new(&engine, MLART_KV_FORMAT_BF16, 80, 1, 64, 16).with_seqs(&[1, 2]);
    forward_ok(&model, &pool, 0, &[1, 2], &[3, 2], &random_x(1, 5, 256));
    let before = pool.stats();
    let r = forward(
        &model,
        &pool,
        0,
        &[1, 2],
        &[600, 530],
        &random_x(2, 1130, 256),
    );
    forward_err(
        "exhausted in a later pass",
        r,
        MLART_STATUS_POOL_EXHAUSTED,
        &["free blocks"],
    );
    assert_eq!((pool.len(1, 0), pool.len(2, 0)), (3, 2));
    assert_eq!(pool.stats(), before);
}

/// `mlart_model_options.kept_keys_bytes` reaches the model (its props
/// report it, 0 meaning the 1 GiB default) and long prompts stay right
/// whatever it keeps: nothing (a budget below one block's rows), part of
/// a context, or no limit.
#[test]
fn kept_keys_bytes_option() {
    let dir = TempDir::new("tiny-kept-keys");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::Tiny, WeightDtype::Bf16, 1, true),
    );
    let engine = Engine::new(2);
    let default = load(&engine, dir.path());
    assert_eq!(info(&default).kept_keys_bytes, 1 << 30);
    // Tiny: 4 heads of V, K_nope and k_pe (32 + 32 + 16) per position.
    let block_rows = 64 * 4 * 80;
    let mut outputs = Vec::new();
    for (bytes, what) in [
        (1u64, "none kept"),
        (10 * block_rows, "640 positions of f32 rows kept"),
        (u64::MAX, "no limit"),
    ] {
        let model = load_with(&engine, dir.path(), |o| o.kept_keys_bytes = bytes)
            .unwrap_or_else(|e| panic!("kept_keys_bytes = {bytes}: {e:?}"));
        assert_eq!(info(&model).kept_keys_bytes, bytes, "{what}");
        run_passes(&format!("kept keys: {what}"), &engine, &model, dir.path());
        let pool = Pool::new(&engine, MLART_KV_FORMAT_F32, 80, 1, 64, 64).with_seqs(&[1]);
        outputs.push(forward_ok(
            &model,
            &pool,
            0,
            &[1],
            &[1500],
            &random_x(9, 1500, 256),
        ));
    }
    // The budget changes only how the work is cut (passes, chunks merged
    // by lse). (That it is honoured is the unit test
    // `kept_keys_give_what_passes_without_them_give`.)
    for (o, what) in outputs[..2].iter().zip(["none kept", "640 positions"]) {
        let e = rel_l2(&to_f64(o), &to_f64(&outputs[2]));
        assert!(e <= 1e-5, "{what} against no limit: rel L2 {e:.2e}");
    }
}

#[test]
fn tiny_bf16_yarn_on_and_off_past_original_context() {
    let dir = TempDir::new("tiny-bf16-long");
    let engine = Engine::new(2);
    let mut last: Option<Vec<f32>> = None;
    for yarn in [false, true] {
        let sub = dir.sub(if yarn { "yarn" } else { "plain" });
        make_checkpoint(&sub, &gen_opts(Preset::Tiny, WeightDtype::Bf16, 1, yarn));
        let model = load(&engine, &sub);
        assert_eq!(info(&model).yarn, yarn);
        // A long prefill crosses the YaRN original context (256 positions),
        // then decode steps run at positions > 256.
        let steps: Vec<Step> = vec![
            (0, vec![1, 2], vec![270, 2]),
            (0, vec![1, 2], vec![1, 1]),
            (0, vec![1], vec![3]),
        ];
        run_schedule(
            &format!("tiny bf16 yarn={yarn}"),
            &engine,
            &model,
            &sub,
            0,
            1,
            &[F32_POOL, BF16_POOL],
            &steps,
            16,
        );
        // Same weights, same inputs: YaRN must change the result.
        let pool = Pool::new(&engine, MLART_KV_FORMAT_F32, 80, 1, 16, 32).with_seqs(&[1]);
        let y = forward_ok(&model, &pool, 0, &[1], &[300], &random_x(4, 300, 256));
        if let Some(prev) = last.take() {
            let d = rel_l2(&to_f64(&y), &to_f64(&prev));
            assert!(d > 1e-2, "YaRN on vs off differ by only {d:.3e}");
        }
        last = Some(y);
    }
}

#[test]
fn tiny_f32_and_f16_weights_match_reference() {
    let dir = TempDir::new("tiny-f32");
    let engine = Engine::new(2);
    for (dtype, yarn) in [(WeightDtype::F32, false), (WeightDtype::F16, true)] {
        let sub = dir.sub(dtype.name());
        make_checkpoint(&sub, &gen_opts(Preset::Tiny, dtype, 2, yarn));
        let model = load(&engine, &sub);
        run_schedule(
            &format!("tiny {} yarn={yarn}", dtype.name()),
            &engine,
            &model,
            &sub,
            0,
            2,
            &[F32_POOL, BF16_POOL, F16_POOL],
            &standard_schedule(&[1, 0]),
            4,
        );
    }
}

#[test]
fn tiny_fp8_weights_match_dequantized_reference() {
    // Tiny shapes (96, 80 rows; 256 columns) give partial 128x128 blocks.
    let dir = TempDir::new("tiny-fp8");
    let opts = gen_opts(Preset::Tiny, WeightDtype::Fp8, 2, true);
    make_checkpoint(dir.path(), &opts);
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    assert_eq!(info(&model).weight_dtype, MLART_DTYPE_FP8_E4M3);
    run_schedule(
        "tiny fp8",
        &engine,
        &model,
        dir.path(),
        0,
        2,
        &[F32_POOL, BF16_POOL],
        &standard_schedule(&[0, 1]),
        4,
    );
}

#[test]
fn tiny_sharded_checkpoint_matches_reference() {
    let dir = TempDir::new("tiny-shards");
    let mut opts = gen_opts(Preset::Tiny, WeightDtype::Fp8, 2, true);
    opts.shards = 3;
    make_checkpoint(dir.path(), &opts);
    assert!(dir.path().join("model.safetensors.index.json").exists());
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    run_schedule(
        "tiny fp8 3 shards",
        &engine,
        &model,
        dir.path(),
        0,
        2,
        &[F32_POOL],
        &[(1, vec![5, 6], vec![3, 1]), (0, vec![6], vec![2])],
        8,
    );
}

#[test]
fn v2_lite_matches_reference() {
    // hidden 2048, 16 heads, no q LoRA, d_qk 576: one layer, few tokens.
    // FP8_V32 pools quantize the latent to e4m3 with a power-of-two scale
    // per 128-tile: against the exact reference the error is a few 1e-2
    // (FP8_ROWS), against rows rounded the same way it is f32 noise.
    let dir = TempDir::new("v2lite");
    let engine = Engine::new(2);
    let steps: Vec<Step> = vec![
        (0, vec![1, 2, 3], vec![1, 3, 2]),
        (0, vec![3, 1, 2], vec![1, 1, 1]),
    ];
    for (dtype, yarn, pools) in [
        (
            WeightDtype::Bf16,
            true,
            vec![F32_POOL, BF16_POOL, FP8_V32_POOL],
        ),
        (WeightDtype::F32, false, vec![F32_POOL]),
        (WeightDtype::Fp8, true, vec![F32_POOL, FP8_V32_POOL]),
    ] {
        let sub = dir.sub(dtype.name());
        make_checkpoint(&sub, &gen_opts(Preset::V2Lite, dtype, 1, yarn));
        let model = load(&engine, &sub);
        let p = info(&model);
        assert_eq!((p.q_lora_rank, p.d_qk, p.hidden_size), (0, 576, 2048));
        run_schedule(
            &format!("v2-lite {} yarn={yarn}", dtype.name()),
            &engine,
            &model,
            &sub,
            0,
            1,
            &pools,
            &steps,
            64,
        );
        drop(model);
        let _ = std::fs::remove_dir_all(&sub);
    }
}

#[test]
fn layer_range_maps_to_pool_layer_zero() {
    let dir = TempDir::new("layer-range");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::Tiny, WeightDtype::Bf16, 2, true),
    );
    let engine = Engine::new(2);
    let full = load(&engine, dir.path());
    let second = load_with(&engine, dir.path(), |o| {
        o.first_layer = 1;
        o.num_layers = 1;
    })
    .unwrap();
    let p = info(&second);
    assert_eq!((p.num_layers, p.first_layer, p.loaded_layers), (2, 1, 1));
    let d = p.d_qk;
    let pool_full = Pool::new(&engine, MLART_KV_FORMAT_F32, d, 2, 4, 64).with_seqs(&[1, 2]);
    let pool_one = Pool::new(&engine, MLART_KV_FORMAT_F32, d, 1, 4, 64).with_seqs(&[1, 2]);
    let mut reference = Reference::load(dir.path(), &[1]);
    for (k, n) in [vec![3, 2], vec![1, 1]].into_iter().enumerate() {
        let x = random_x(900 + k as u64, n.iter().sum::<i32>() as usize, 256);
        let a = forward_ok(&full, &pool_full, 1, &[1, 2], &n, &x);
        let b = forward_ok(&second, &pool_one, 1, &[1, 2], &n, &x);
        let want = reference.forward(1, &[1, 2], &[n[0] as usize, n[1] as usize], &x);
        compare("first_layer=1 model", &b, &want, 1e-4);
        assert!(rel_l2(&to_f64(&a), &to_f64(&b)) <= 1e-6);
    }
    // Layer 1 of the full model used pool layer 1; layer 0 stayed empty.
    assert_eq!((pool_full.len(1, 0), pool_full.len(1, 1)), (0, 4));
    assert_eq!(pool_one.len(1, 0), 4);
    assert_eq!(pool_one.len(2, 0), 3);
    // The partial model has no layer 0.
    forward_err(
        "layer 0 not loaded",
        forward(&second, &pool_one, 0, &[1], &[1], &random_x(1, 1, 256)),
        MLART_STATUS_INVALID_ARGUMENT,
        &["layer"],
    );
}

#[test]
fn decode_token_by_token_equals_prefill() {
    let dir = TempDir::new("decode-prefill");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::Tiny, WeightDtype::F32, 2, true),
    );
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    let hid = 256;
    let n = 9;
    for layer in [0i32, 1] {
        let x = random_x(77 + layer as u64, n, hid);
        let prefill_pool = Pool::new(&engine, MLART_KV_FORMAT_F32, 80, 2, 4, 64).with_seqs(&[3]);
        let decode_pool = Pool::new(&engine, MLART_KV_FORMAT_F32, 80, 2, 4, 64).with_seqs(&[3]);
        let mixed_pool = Pool::new(&engine, MLART_KV_FORMAT_F32, 80, 2, 4, 64).with_seqs(&[3]);
        let all = forward_ok(&model, &prefill_pool, layer, &[3], &[n as i32], &x);
        assert_eq!(prefill_pool.len(3, layer), n as i64);
        assert_eq!(prefill_pool.len(3, 1 - layer), 0);
        let mut steps = Vec::new();
        for t in 0..n {
            let y = forward_ok(
                &model,
                &decode_pool,
                layer,
                &[3],
                &[1],
                &x[t * hid..(t + 1) * hid],
            );
            assert_eq!(decode_pool.len(3, layer), t as i64 + 1);
            steps.extend(y);
        }
        // A prefill of 4 then chunks of 3 and 2.
        let mut mixed = Vec::new();
        let mut t = 0;
        for c in [4usize, 3, 2] {
            mixed.extend(forward_ok(
                &model,
                &mixed_pool,
                layer,
                &[3],
                &[c as i32],
                &x[t * hid..(t + c) * hid],
            ));
            t += c;
            assert_eq!(mixed_pool.len(3, layer), t as i64);
        }
        for t in 0..n {
            let e = row_rel(&all, &steps, hid, t, t);
            assert!(
                e <= 1e-4,
                "layer {layer} token {t}: decode vs prefill {e:.3e}"
            );
            let e = row_rel(&all, &mixed, hid, t, t);
            assert!(
                e <= 1e-4,
                "layer {layer} token {t}: chunks vs prefill {e:.3e}"
            );
        }
    }
}

#[test]
fn bf16_activations_in_and_out() {
    let dir = TempDir::new("bf16-act");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::Tiny, WeightDtype::Bf16, 1, true),
    );
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    let pool = Pool::new(&engine, MLART_KV_FORMAT_F32, 80, 1, 4, 64).with_seqs(&[1, 2]);
    let mut reference = Reference::load(dir.path(), &[0]);
    let x = random_x(5, 4, 256);
    let xr: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    let xb: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let mut out = vec![0u16; 4 * 256];
    let seqs = [1u64, 2];
    let n = [3i32, 1];
    let mut a = forward_args();
    a.layer = 0;
    a.batch = 2;
    a.seq_ids = seqs.as_ptr();
    a.n_tokens = n.as_ptr();
    a.x_dtype = MLART_DTYPE_BF16;
    a.x = xb.as_ptr() as *const c_void;
    a.out_dtype = MLART_DTYPE_BF16;
    a.out = out.as_mut_ptr() as *mut c_void;
    expect_ok("forward bf16", mlart_model_forward(model.ptr, pool.ptr, &a));
    let got: Vec<f32> = out.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
    let want = reference.forward(0, &seqs, &[3, 1], &xr);
    compare("bf16 in/out", &got, &want, 1e-2);
}

// ---------------------------------------------------------------------------
// mlart_model_info, progress, conversion.
// ---------------------------------------------------------------------------

#[test]
fn model_info_fields() {
    let dir = TempDir::new("info");
    let engine = Engine::new(1);

    let tiny = dir.sub("tiny");
    make_checkpoint(&tiny, &gen_opts(Preset::Tiny, WeightDtype::Bf16, 2, true));
    let m = load(&engine, &tiny);
    let p = info(&m);
    assert_eq!(
        p.struct_size as usize,
        std::mem::size_of::<mlart_model_props>()
    );
    assert_eq!(
        (p.num_layers, p.first_layer, p.loaded_layers),
        (2, 0, 2),
        "layers"
    );
    assert_eq!(p.activations, MLART_ACTIVATIONS_PRECISE);
    assert!(
        [
            MLART_CPU_ISA_SCALAR,
            MLART_CPU_ISA_AVX2,
            MLART_CPU_ISA_AVX512,
            MLART_CPU_ISA_AVX512_BF16
        ]
        .contains(&p.projection_isa),
        "projection_isa {}",
        p.projection_isa
    );
    // A caller built against the 0.1 header passes the 136-byte layout:
    // only those bytes are written, the fields appended since keep what
    // they held.
    let mut old = MaybeUninit::<mlart_model_props>::uninit();
    mlart_model_props_init(old.as_mut_ptr());
    // SAFETY: initialized just above.
    let mut old = unsafe { old.assume_init() };
    old.struct_size = 136;
    old.activations = 0xdead;
    old.projection_isa = 0xbeef;
    expect_ok(
        "mlart_model_info (0.1 layout)",
        mlart_model_info(m.ptr, &mut old),
    );
    assert_eq!(
        (old.struct_size, old.activations, old.projection_isa),
        (136, 0xdead, 0xbeef)
    );
    assert_eq!(
        (old.hidden_size, old.bytes_loaded),
        (p.hidden_size, p.bytes_loaded)
    );
    // The 0.4/0.5 layout (160 bytes) likewise, before `kept_keys_bytes`.
    old.struct_size = 160;
    old.kept_keys_bytes = 0xdead;
    expect_ok(
        "mlart_model_info (0.5 layout)",
        mlart_model_info(m.ptr, &mut old),
    );
    assert_eq!(
        (old.projection_isa, old.kept_keys_bytes),
        (p.projection_isa, 0xdead)
    );
    assert_eq!(
        (
            p.hidden_size,
            p.num_heads,
            p.q_lora_rank,
            p.kv_lora_rank,
            p.qk_nope_head_dim,
            p.qk_rope_head_dim,
            p.v_head_dim,
            p.d_qk
        ),
        (256, 4, 96, 64, 32, 16, 32, 80)
    );
    assert_eq!(p.rope_theta, 10000.0);
    assert!(p.yarn);
    assert_eq!(
        (
            p.yarn_factor,
            p.yarn_original_max_position,
            p.yarn_beta_fast,
            p.yarn_beta_slow,
            p.yarn_mscale,
            p.yarn_mscale_all_dim
        ),
        (4.0, 256, 32.0, 1.0, 1.0, 1.0)
    );
    let m2 = (0.1 * 4f64.ln() + 1.0).powi(2);
    assert!((p.softmax_scale - m2 / 48f64.sqrt()).abs() < 1e-12);
    assert_eq!(p.weight_dtype, MLART_DTYPE_BF16);
    assert!(p.bytes_loaded > 0);
    let bf16_bytes = p.bytes_loaded;

    // Converted to F32 at load: the same outputs, twice the projection bytes.
    let mf = load_with(&engine, &tiny, |o| {
        o.convert_weights = true;
        o.weight_dtype = MLART_DTYPE_F32;
    })
    .unwrap();
    let pf = info(&mf);
    assert_eq!(pf.weight_dtype, MLART_DTYPE_F32);
    assert!(
        pf.bytes_loaded > bf16_bytes,
        "{} vs {bf16_bytes}",
        pf.bytes_loaded
    );
    let x = random_x(3, 3, 256);
    let pa = Pool::new(&engine, MLART_KV_FORMAT_F32, 80, 2, 4, 16).with_seqs(&[1]);
    let pb = Pool::new(&engine, MLART_KV_FORMAT_F32, 80, 2, 4, 16).with_seqs(&[1]);
    let ya = forward_ok(&m, &pa, 1, &[1], &[3], &x);
    let yb = forward_ok(&mf, &pb, 1, &[1], &[3], &x);
    assert!(rel_l2(&to_f64(&ya), &to_f64(&yb)) <= 1e-6);
    // Converting to FP8 is not an in-memory compute type.
    load_err_with(
        &engine,
        &tiny,
        |o| {
            o.convert_weights = true;
            o.weight_dtype = MLART_DTYPE_FP8_E4M3;
        },
        MLART_STATUS_UNSUPPORTED,
        &["weight_dtype"],
    );
    // Bad struct_size.
    let mut bad = MaybeUninit::<mlart_model_props>::uninit();
    mlart_model_props_init(bad.as_mut_ptr());
    // SAFETY: initialized just above.
    let mut bad = unsafe { bad.assume_init() };
    for size in [0u32, 4, 132, 140, 152] {
        bad.struct_size = size;
        expect_error(
            &format!("info struct_size {size}"),
            mlart_model_info(m.ptr, &mut bad),
            MLART_STATUS_INVALID_ARGUMENT,
            &[&format!("out->struct_size = {size}"), "136 or 144"],
        );
    }
    expect_error(
        "info NULL model",
        mlart_model_info(ptr::null(), &mut bad),
        MLART_STATUS_NULL_POINTER,
        &["model"],
    );
    expect_error(
        "info NULL out",
        mlart_model_info(m.ptr, ptr::null_mut()),
        MLART_STATUS_NULL_POINTER,
        &["out"],
    );

    // V2-Lite without YaRN, FP8 (one layer of a two-layer checkpoint).
    let lite = dir.sub("lite");
    make_checkpoint(&lite, &gen_opts(Preset::V2Lite, WeightDtype::Fp8, 2, false));
    let ml = load_with(&engine, &lite, |o| {
        o.first_layer = 1;
    })
    .unwrap();
    let p = info(&ml);
    assert_eq!(
        (
            p.num_layers,
            p.first_layer,
            p.loaded_layers,
            p.hidden_size,
            p.num_heads,
            p.q_lora_rank,
            p.kv_lora_rank,
            p.d_qk
        ),
        (2, 1, 1, 2048, 16, 0, 512, 576)
    );
    assert!(!p.yarn);
    assert_eq!(p.yarn_factor, 0.0);
    assert!((p.softmax_scale - 1.0 / 192f64.sqrt()).abs() < 1e-12);
    assert_eq!(p.weight_dtype, MLART_DTYPE_FP8_E4M3);
    assert!(p.bytes_loaded > 0);
    // FP8 converted to BF16 at load.
    let mb = load_with(&engine, &lite, |o| {
        o.first_layer = 1;
        o.convert_weights = true;
        o.weight_dtype = MLART_DTYPE_BF16;
    })
    .unwrap();
    assert_eq!(info(&mb).weight_dtype, MLART_DTYPE_BF16);

    // V2-Lite's YaRN parameters (mscale 0.707).
    let lite_y = dir.sub("lite-yarn");
    make_checkpoint(
        &lite_y,
        &gen_opts(Preset::V2Lite, WeightDtype::Bf16, 1, true),
    );
    let p = info(&load(&engine, &lite_y));
    assert!(p.yarn);
    assert_eq!(
        (
            p.yarn_factor,
            p.yarn_original_max_position,
            p.yarn_mscale_all_dim
        ),
        (40.0, 4096, 0.707)
    );
    let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
    assert!((p.softmax_scale - m * m / 192f64.sqrt()).abs() < 1e-12);
}

#[derive(Default)]
struct Progress {
    calls: Vec<(f32, String)>,
    cancel_at: Option<usize>,
}

extern "C" fn record_progress(fraction: f32, stage: *const c_char, ud: *mut c_void) -> bool {
    // SAFETY: ud is the &mut Progress the test passed, unused elsewhere
    // during the load.
    let p = unsafe { &mut *(ud as *mut Progress) };
    // SAFETY: stage is a NUL-terminated string valid during the call.
    let s = unsafe { CStr::from_ptr(stage) }
        .to_string_lossy()
        .into_owned();
    p.calls.push((fraction, s));
    p.cancel_at != Some(p.calls.len())
}

#[test]
fn progress_callback_and_cancel() {
    let dir = TempDir::new("progress");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::Tiny, WeightDtype::Fp8, 2, true),
    );
    let engine = Engine::new(1);
    let mut prog = Progress::default();
    let ud = &mut prog as *mut Progress as *mut c_void;
    let m = load_with(&engine, dir.path(), |o| {
        o.progress = Some(record_progress);
        o.progress_user_data = ud;
    })
    .unwrap();
    drop(m);
    let calls = std::mem::take(&mut prog.calls);
    assert!(calls.len() >= 2, "{calls:?}");
    for w in calls.windows(2) {
        assert!(w[1].0 > w[0].0, "fractions not increasing: {calls:?}");
    }
    assert!(calls[0].0 > 0.0);
    assert_eq!(calls.last().unwrap().0, 1.0, "{calls:?}");
    assert!(calls.iter().all(|(_, s)| !s.is_empty()));
    assert!(
        calls.iter().any(|(_, s)| s.contains("o_proj")),
        "stages name tensors: {calls:?}"
    );
    let total = calls.len();

    for cancel_at in [1, total / 2, total] {
        prog.cancel_at = Some(cancel_at);
        let ud = &mut prog as *mut Progress as *mut c_void;
        load_err_with(
            &engine,
            dir.path(),
            |o| {
                o.progress = Some(record_progress);
                o.progress_user_data = ud;
            },
            MLART_STATUS_CANCELLED,
            &["cancel"],
        );
        assert_eq!(prog.calls.len(), cancel_at, "no call after the cancel");
        prog.calls.clear();
    }
}

// ---------------------------------------------------------------------------
// Malformed checkpoints.
// ---------------------------------------------------------------------------

/// Copies config.json of `src` into a new directory `name` of `tmp`.
fn with_config(tmp: &TempDir, src: &Path, name: &str) -> PathBuf {
    let d = tmp.sub(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    d
}

#[test]
fn malformed_checkpoints_give_named_errors() {
    let tmp = TempDir::new("malformed");
    let good = tmp.sub("good");
    make_checkpoint(&good, &gen_opts(Preset::Tiny, WeightDtype::Bf16, 2, true));
    let fp8 = tmp.sub("fp8");
    make_checkpoint(&fp8, &gen_opts(Preset::Tiny, WeightDtype::Fp8, 1, true));
    let engine = Engine::new(1);
    let tensors = read_safetensors(&good.join("model.safetensors"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(good.join("config.json")).unwrap()).unwrap();

    // The directory and config.json.
    load_err(&engine, &tmp.sub("nope"), MLART_STATUS_IO, &["config.json"]);
    let d = tmp.sub("no-config");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(good.join("model.safetensors"), d.join("model.safetensors")).unwrap();
    load_err(&engine, &d, MLART_STATUS_IO, &["config.json"]);
    std::fs::write(d.join("config.json"), "{\"model_type\": \"deepseek_v3\",").unwrap();
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["config.json"]);
    std::fs::write(d.join("config.json"), b"{\"model_type\": \"\xff\xfe\"}").unwrap();
    load_err(
        &engine,
        &d,
        MLART_STATUS_FORMAT,
        &["config.json", "not UTF-8"],
    );
    let mut c = config.clone();
    c["model_type"] = json!("llama");
    std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    load_err(&engine, &d, MLART_STATUS_UNSUPPORTED, &["llama"]);
    let mut c = config.clone();
    c.as_object_mut().unwrap().remove("kv_lora_rank");
    std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["kv_lora_rank"]);
    let mut c = config.clone();
    c["rope_scaling"]["type"] = json!("linear");
    std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    load_err(&engine, &d, MLART_STATUS_UNSUPPORTED, &["linear"]);
    // Dimensions whose products would wrap around (found by a fuzzing
    // run: with wrapped head counts matching the tensors, the load passed
    // and forwards failed as internal errors).
    for (key, value, needle) in [
        (
            "num_attention_heads",
            json!(9223372036854775812u64),
            "num_attention_heads = 9223372036854775812 exceeds 2147483647",
        ),
        (
            "kv_lora_rank",
            json!(18446744073709551614u64),
            "kv_lora_rank = 18446744073709551614 exceeds",
        ),
        (
            "q_lora_rank",
            json!(4294967296u64),
            "q_lora_rank = 4294967296 exceeds",
        ),
        (
            "num_attention_heads",
            json!(1u64 << 30),
            "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim) = 1073741824 * ",
        ),
    ] {
        let mut c = config.clone();
        c[key] = value;
        std::fs::write(d.join("config.json"), c.to_string()).unwrap();
        load_err(&engine, &d, MLART_STATUS_FORMAT, &[needle]);
    }

    // The safetensors file itself.
    let d = with_config(&tmp, &good, "no-weights");
    load_err(&engine, &d, MLART_STATUS_IO, &["model.safetensors"]);
    let st = d.join("model.safetensors");
    for len in [0usize, 5] {
        std::fs::write(&st, vec![0u8; len]).unwrap();
        load_err(&engine, &d, MLART_STATUS_FORMAT, &["model.safetensors"]);
    }
    // Cut short inside the data.
    let full = std::fs::read(good.join("model.safetensors")).unwrap();
    std::fs::write(&st, &full[..full.len() - 100]).unwrap();
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["model.safetensors"]);
    // Cut short inside the header.
    std::fs::write(&st, &full[..64]).unwrap();
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["model.safetensors"]);
    // A header length beyond the file.
    let one = json!({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}});
    write_raw(&st, &one, &[0u8; 8], Some(1 << 20));
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["model.safetensors"]);
    write_raw(&st, &one, &[0u8; 8], Some(u64::MAX));
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["model.safetensors"]);
    // Overlapping data_offsets.
    let overlap = json!({
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    });
    write_raw(&st, &overlap, &[0u8; 24], None);
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["model.safetensors"]);
    // data_offsets past the end of the file.
    let past = json!({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}});
    write_raw(&st, &past, &[0u8; 8], None);
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["model.safetensors"]);
    // A size that disagrees with dtype and shape.
    let wrong = json!({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}});
    write_raw(&st, &wrong, &[0u8; 16], None);
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["model.safetensors"]);
    // Not JSON.
    write_raw(&st, &json!("x"), &[], None);
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["model.safetensors"]);

    // Valid files with the wrong content.
    let kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight";
    let mut t = tensors.clone();
    let i = t.iter().position(|x| x.name == kv_a).unwrap();
    t[i].shape = vec![t[i].shape[1], t[i].shape[0]];
    write_safetensors(&st, &t);
    load_err(&engine, &d, MLART_STATUS_FORMAT, &[kv_a, "shape"]);
    let norm = "model.layers.1.self_attn.q_a_layernorm.weight";
    let mut t = tensors.clone();
    let i = t.iter().position(|x| x.name == norm).unwrap();
    t[i].shape = vec![t[i].shape[0] / 2, 2];
    write_safetensors(&st, &t);
    load_err(&engine, &d, MLART_STATUS_FORMAT, &[norm, "shape"]);

    let o1 = "model.layers.1.self_attn.o_proj.weight";
    let t: Vec<RawTensor> = tensors.iter().filter(|x| x.name != o1).cloned().collect();
    write_safetensors(&st, &t);
    load_err(&engine, &d, MLART_STATUS_NOT_FOUND, &[o1]);
    // Only the requested layers need to be present.
    let m = load_with(&engine, &d, |o| o.num_layers = 1).unwrap();
    assert_eq!(info(&m).loaded_layers, 1);
    drop(m);

    let kvn = "model.layers.0.self_attn.kv_a_layernorm.weight";
    let mut t = tensors.clone();
    let i = t.iter().position(|x| x.name == kvn).unwrap();
    // The norm as I32 (shape kept, 4 bytes per element).
    t[i].dtype = "I32".into();
    t[i].data = vec![0u8; 4 * t[i].shape[0]];
    write_safetensors(&st, &t);
    load_err(&engine, &d, MLART_STATUS_UNSUPPORTED, &[kvn, "I32"]);
    // An FP8 norm is not supported either.
    let mut t = tensors.clone();
    let i = t.iter().position(|x| x.name == kvn).unwrap();
    t[i].dtype = "F8_E4M3".into();
    t[i].data = vec![0x38u8; t[i].shape[0]];
    write_safetensors(&st, &t);
    load_err(&engine, &d, MLART_STATUS_UNSUPPORTED, &[kvn]);

    // Sharded: an index naming a missing shard, and broken indexes.
    let d = with_config(&tmp, &good, "index");
    let (first, second) = tensors.split_at(tensors.len() / 2);
    write_safetensors(&d.join("a.safetensors"), first);
    let mut map = serde_json::Map::new();
    for t in first {
        map.insert(t.name.clone(), json!("a.safetensors"));
    }
    for t in second {
        map.insert(t.name.clone(), json!("b.safetensors"));
    }
    let index = d.join("model.safetensors.index.json");
    std::fs::write(&index, json!({"weight_map": map}).to_string()).unwrap();
    load_err(&engine, &d, MLART_STATUS_IO, &["b.safetensors"]);
    write_safetensors(&d.join("b.safetensors"), second);
    let m = load(&engine, &d);
    assert_eq!(info(&m).loaded_layers, 2);
    drop(m);
    std::fs::write(&index, "{\"weight_map\": ").unwrap();
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["index.json"]);
    std::fs::write(&index, "{\"metadata\": {}}").unwrap();
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["weight_map"]);
    let mut bad = map.clone();
    bad.insert(kv_a.into(), json!("../good/model.safetensors"));
    std::fs::write(&index, json!({"weight_map": bad}).to_string()).unwrap();
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["weight_map"]);

    // FP8 weights without their scales, or with scales of the wrong shape.
    let fp8_tensors = read_safetensors(&fp8.join("model.safetensors"));
    let d = with_config(&tmp, &fp8, "fp8-no-scale");
    let qb = "model.layers.0.self_attn.q_b_proj.weight";
    let t: Vec<RawTensor> = fp8_tensors
        .iter()
        .filter(|x| x.name != format!("{qb}_scale_inv"))
        .cloned()
        .collect();
    write_safetensors(&d.join("model.safetensors"), &t);
    load_err(&engine, &d, MLART_STATUS_NOT_FOUND, &[qb, "scale_inv"]);
    let mut t = fp8_tensors.clone();
    let i = t
        .iter()
        .position(|x| x.name == format!("{qb}_scale_inv"))
        .unwrap();
    t[i].shape = vec![t[i].shape[0] * t[i].shape[1]];
    write_safetensors(&d.join("model.safetensors"), &t);
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["scale_inv", "shape"]);

    // Layer ranges.
    load_err_with(
        &engine,
        &good,
        |o| o.first_layer = 2,
        MLART_STATUS_INVALID_ARGUMENT,
        &["first_layer"],
    );
    load_err_with(
        &engine,
        &good,
        |o| o.first_layer = -1,
        MLART_STATUS_INVALID_ARGUMENT,
        &["first_layer"],
    );
    load_err_with(
        &engine,
        &good,
        |o| {
            o.first_layer = 1;
            o.num_layers = 2;
        },
        MLART_STATUS_INVALID_ARGUMENT,
        &["num_layers"],
    );
    load_err_with(
        &engine,
        &good,
        |o| o.num_layers = -3,
        MLART_STATUS_INVALID_ARGUMENT,
        &["num_layers"],
    );
    let size = std::mem::size_of::<mlart_model_options>() as u32;
    for bad in [0, 4, 36, 44, 52, 60, size + 8, u32::MAX] {
        load_err_with(
            &engine,
            &good,
            |o| o.struct_size = bad,
            MLART_STATUS_INVALID_ARGUMENT,
            &[
                &format!("options->struct_size = {bad}"),
                &format!("expects 40 or 48 or 56 or {size}"),
                "mlart_model_options_init",
            ],
        );
    }
    // A binary built before `activations` was appended passes the 40-byte
    // layout: the library must not read past it (here the bytes after it
    // hold a value that would be rejected) and uses the default.
    assert_eq!(size, 64);
    let old = load_with(&engine, &good, |o| {
        o.struct_size = 40;
        o.activations = 0xdead;
    });
    assert!(old.is_ok(), "40-byte options: {:?}", old.err());
    // The 0.4 layout (48 bytes, before `gpu_projections`) likewise.
    let old = load_with(&engine, &good, |o| {
        o.struct_size = 48;
        o.reserved0 = 0xdead;
        o.gpu_projections = 0xdead;
    });
    assert!(old.is_ok(), "48-byte options: {:?}", old.err());
    // The 0.5 layout (56 bytes, before `kept_keys_bytes`): the library
    // keeps its default rather than the bytes past it.
    let old = load_with(&engine, &good, |o| {
        o.struct_size = 56;
        o.reserved1 = 0xdead;
        o.kept_keys_bytes = 7;
    })
    .expect("56-byte options");
    assert_eq!(info(&old).kept_keys_bytes, 1 << 30);
    load_err_with(
        &engine,
        &good,
        |o| o.gpu_projections = 2,
        MLART_STATUS_INVALID_ARGUMENT,
        &[
            "options->gpu_projections = 2",
            "-1 (default), 0 (CPU) or 1 (GPU)",
        ],
    );
    // A CPU engine ignores it; the projections stay on the CPU.
    let cpu = load_with(&engine, &good, |o| o.gpu_projections = 1).expect("gpu_projections = 1");
    assert_eq!(info(&cpu).projections_on_gpu, 0);
    load_err_with(
        &engine,
        &good,
        |o| o.activations = 2,
        MLART_STATUS_INVALID_ARGUMENT,
        &["options->activations = 2", "PRECISE=0, BF16=1"],
    );

    // NULL arguments.
    let path = CString::new(good.to_str().unwrap()).unwrap();
    let mut out: *mut mlart_model = ptr::null_mut();
    expect_error(
        "NULL path",
        mlart_model_load(engine.ptr, ptr::null(), ptr::null(), &mut out),
        MLART_STATUS_NULL_POINTER,
        &["path"],
    );
    expect_error(
        "NULL out",
        mlart_model_load(engine.ptr, path.as_ptr(), ptr::null(), ptr::null_mut()),
        MLART_STATUS_NULL_POINTER,
        &["out"],
    );
    expect_error(
        "NULL engine",
        mlart_model_load(ptr::null_mut(), path.as_ptr(), ptr::null(), &mut out),
        MLART_STATUS_NULL_POINTER,
        &["engine"],
    );
    assert!(out.is_null());
    // NULL options = the defaults.
    expect_ok(
        "NULL options",
        mlart_model_load(engine.ptr, path.as_ptr(), ptr::null(), &mut out),
    );
    assert!(!out.is_null());
    mlart_model_free(out);
    mlart_model_free(ptr::null_mut());
}

// ---------------------------------------------------------------------------
// Forward errors and rollback.
// ---------------------------------------------------------------------------

#[test]
fn forward_errors_leave_the_pool_unchanged() {
    let dir = TempDir::new("fwd-errors");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::Tiny, WeightDtype::Bf16, 2, true),
    );
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    let hid = 256;
    let x = random_x(11, 8, hid);
    let pool = Pool::new(&engine, MLART_KV_FORMAT_BF16, 80, 2, 4, 64).with_seqs(&[1, 2]);
    forward_ok(&model, &pool, 0, &[1, 2], &[2, 1], &x[..3 * hid]);
    let before = pool.stats();
    let lens = |p: &Pool| [(1, 0), (1, 1), (2, 0), (2, 1)].map(|(s, l): (u64, i32)| p.len(s, l));
    let lens_before = lens(&pool);

    let r = |pool: &Pool, layer, seqs: &[u64], n: &[i32]| {
        let total = n.iter().map(|&v| v.max(0)).sum::<i32>().max(1) as usize;
        forward(&model, pool, layer, seqs, n, &x[..total * hid])
    };
    let wrong_d = Pool::new(&engine, MLART_KV_FORMAT_F32, 576, 2, 4, 8).with_seqs(&[1]);
    forward_err(
        "pool d_qk",
        r(&wrong_d, 0, &[1], &[1]),
        MLART_STATUS_INVALID_ARGUMENT,
        &["d_qk", "576", "80"],
    );
    let one_layer = Pool::new(&engine, MLART_KV_FORMAT_F32, 80, 1, 4, 8).with_seqs(&[1]);
    forward_err(
        "pool layers",
        r(&one_layer, 1, &[1], &[1]),
        MLART_STATUS_INVALID_ARGUMENT,
        &["layer"],
    );
    forward_err(
        "layer not loaded",
        r(&pool, 2, &[1], &[1]),
        MLART_STATUS_INVALID_ARGUMENT,
        &["layer"],
    );
    forward_err(
        "negative layer",
        r(&pool, -1, &[1], &[1]),
        MLART_STATUS_INVALID_ARGUMENT,
        &["layer"],
    );
    forward_err(
        "missing seq",
        r(&pool, 0, &[1, 99], &[1, 1]),
        MLART_STATUS_NOT_FOUND,
        &["99"],
    );
    forward_err(
        "duplicate seq",
        r(&pool, 0, &[2, 1, 2], &[1, 1, 1]),
        MLART_STATUS_INVALID_ARGUMENT,
        &["twice"],
    );
    forward_err(
        "n_tokens 0",
        r(&pool, 0, &[1, 2], &[1, 0]),
        MLART_STATUS_INVALID_ARGUMENT,
        &["n_tokens[1]"],
    );
    forward_err(
        "n_tokens negative",
        r(&pool, 0, &[1], &[-2]),
        MLART_STATUS_INVALID_ARGUMENT,
        &["n_tokens[0]"],
    );

    // Raw argument errors.
    let seqs = [1u64, 2];
    let n = [1i32, 1];
    let mut out = vec![f32::NAN; 2 * hid];
    let base = || {
        let mut a = forward_args();
        a.layer = 0;
        a.batch = 2;
        a.seq_ids = seqs.as_ptr();
        a.n_tokens = n.as_ptr();
        a.x = x.as_ptr() as *const c_void;
        a
    };
    let cases: Vec<(&str, mlart_forward_args, mlart_status, &str)> = vec![
        (
            "NULL x",
            mlart_forward_args {
                x: ptr::null(),
                ..base()
            },
            MLART_STATUS_NULL_POINTER,
            "x",
        ),
        (
            "NULL out",
            mlart_forward_args {
                out: ptr::null_mut(),
                ..base()
            },
            MLART_STATUS_NULL_POINTER,
            "out",
        ),
        (
            "NULL seq_ids",
            mlart_forward_args {
                seq_ids: ptr::null(),
                out: out.as_mut_ptr() as *mut c_void,
                ..base()
            },
            MLART_STATUS_NULL_POINTER,
            "seq_ids",
        ),
        (
            "NULL n_tokens",
            mlart_forward_args {
                n_tokens: ptr::null(),
                out: out.as_mut_ptr() as *mut c_void,
                ..base()
            },
            MLART_STATUS_NULL_POINTER,
            "n_tokens",
        ),
        (
            "batch 0",
            mlart_forward_args {
                batch: 0,
                out: out.as_mut_ptr() as *mut c_void,
                ..base()
            },
            MLART_STATUS_INVALID_ARGUMENT,
            "batch",
        ),
        (
            "struct_size",
            mlart_forward_args {
                struct_size: 8,
                out: out.as_mut_ptr() as *mut c_void,
                ..base()
            },
            MLART_STATUS_INVALID_ARGUMENT,
            "struct_size",
        ),
        (
            "x_dtype FP8",
            mlart_forward_args {
                x_dtype: MLART_DTYPE_FP8_E4M3,
                out: out.as_mut_ptr() as *mut c_void,
                ..base()
            },
            MLART_STATUS_UNSUPPORTED,
            "x_dtype",
        ),
        (
            "out_dtype 77",
            mlart_forward_args {
                out_dtype: 77,
                out: out.as_mut_ptr() as *mut c_void,
                ..base()
            },
            MLART_STATUS_INVALID_ARGUMENT,
            "out_dtype",
        ),
        (
            "out overlaps x",
            mlart_forward_args {
                out: x.as_ptr() as *mut c_void,
                ..base()
            },
            MLART_STATUS_INVALID_ARGUMENT,
            "out",
        ),
        (
            "memory 7",
            mlart_forward_args {
                memory: 7,
                out: out.as_mut_ptr() as *mut c_void,
                ..base()
            },
            MLART_STATUS_INVALID_ARGUMENT,
            "memory = 7",
        ),
        (
            "device memory on a CPU engine",
            mlart_forward_args {
                memory: MLART_MEMORY_DEVICE,
                out: out.as_mut_ptr() as *mut c_void,
                ..base()
            },
            MLART_STATUS_UNSUPPORTED,
            "memory = MLART_MEMORY_DEVICE but this engine runs on the CPU",
        ),
    ];
    for (what, a, status, needle) in cases {
        expect_error(
            what,
            mlart_model_forward(model.ptr, pool.ptr, &a),
            status,
            &[needle],
        );
    }
    assert!(
        out.iter().all(|v| v.is_nan()),
        "out written by failed calls"
    );
    let a = mlart_forward_args {
        out: out.as_mut_ptr() as *mut c_void,
        ..base()
    };
    expect_error(
        "NULL args",
        mlart_model_forward(model.ptr, pool.ptr, ptr::null()),
        MLART_STATUS_NULL_POINTER,
        &["args"],
    );
    expect_error(
        "NULL model",
        mlart_model_forward(ptr::null_mut(), pool.ptr, &a),
        MLART_STATUS_NULL_POINTER,
        &["model"],
    );
    expect_error(
        "NULL pool",
        mlart_model_forward(model.ptr, ptr::null_mut(), &a),
        MLART_STATUS_NULL_POINTER,
        &["pool"],
    );
    assert_eq!(pool.stats(), before);
    assert_eq!(lens(&pool), lens_before);

    // The 0.4 layout (72 bytes, before `memory`): bytes past it, here an
    // invalid memory kind, are not read, so x and out are host memory.
    let mut y04 = vec![f32::NAN; 2 * hid];
    let old = mlart_forward_args {
        struct_size: 72,
        memory: 0xdead,
        stream: std::ptr::dangling_mut::<c_void>(),
        out: y04.as_mut_ptr() as *mut c_void,
        ..base()
    };
    expect_ok(
        "0.4 forward args",
        mlart_model_forward(model.ptr, pool.ptr, &old),
    );
    assert!(y04.iter().all(|v| v.is_finite()));
    // Undo it: every layer back to its length before.
    for (s, len) in [(1, lens_before[0]), (2, lens_before[2])] {
        expect_ok("truncate", mlart_kv_seq_truncate(pool.ptr, s, len));
    }
    assert_eq!(lens(&pool), lens_before);

    // The pool still works, and continues where it was.
    let mut reference = Reference::load(dir.path(), &[0]);
    reference.forward(0, &[1, 2], &[2, 1], &x[..3 * hid]);
    let y = forward_ok(&model, &pool, 0, &[2, 1], &[1, 1], &x[3 * hid..5 * hid]);
    let want = reference.forward(0, &[2, 1], &[1, 1], &x[3 * hid..5 * hid]);
    compare("after errors", &y, &want, 1e-2);
}

#[test]
fn pool_exhausted_rolls_back_earlier_sequences() {
    let dir = TempDir::new("rollback");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::Tiny, WeightDtype::F32, 2, false),
    );
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    let hid = 256;
    let x = random_x(21, 16, hid);
    // 4 blocks of 4 tokens.
    let pool = Pool::new(&engine, MLART_KV_FORMAT_F32, 80, 2, 4, 4).with_seqs(&[1, 2, 3]);
    // seq 1: 3 tokens in layer 1 (one block); seq 2: 2 tokens in layer 0.
    forward_ok(&model, &pool, 1, &[1], &[3], &x[..3 * hid]);
    forward_ok(&model, &pool, 0, &[2], &[2], &x[..2 * hid]);
    let snapshot = |p: &Pool| {
        let mut v = p.stats().to_vec();
        for s in [1u64, 2, 3] {
            v.push(p.len(s, 0));
            v.push(p.len(s, 1));
        }
        v
    };
    let before = snapshot(&pool);
    assert_eq!(before[1], 2, "blocks used");

    // seq 1 takes 6 tokens in layer 0 (one more block), seq 2 two more
    // (its block has room), then seq 3 wants 9 (3 blocks, 1 left): the
    // whole forward fails and the earlier appends are undone.
    let x17 = random_x(22, 17, hid);
    forward_err(
        "pool exhausted",
        forward(&model, &pool, 0, &[1, 2, 3], &[6, 2, 9], &x17),
        MLART_STATUS_POOL_EXHAUSTED,
        &["seq_id 3"],
    );
    assert_eq!(snapshot(&pool), before, "pool changed by a failed forward");

    // The pool still gives the reference's results afterwards.
    let mut reference = Reference::load(dir.path(), &[0, 1]);
    reference.forward(1, &[1], &[3], &x[..3 * hid]);
    reference.forward(0, &[2], &[2], &x[..2 * hid]);
    let y = forward_ok(&model, &pool, 0, &[2, 1], &[2, 1], &x17[..3 * hid]);
    let want = reference.forward(0, &[2, 1], &[2, 1], &x17[..3 * hid]);
    compare("after rollback", &y, &want, 1e-4);
}

/// A forward whose batch does not fit (an earlier sequence would need a
/// copy-on-write copy of a block it shares with a fork, a later one a new
/// block) fails with POOL_EXHAUSTED before anything changes: the pool
/// checks the whole batch under one lock, so no copy is left behind.
#[test]
fn pool_exhausted_after_copy_on_write_rolls_back() {
    let dir = TempDir::new("rollback-cow");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::Tiny, WeightDtype::F32, 1, false),
    );
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    let hid = 256;
    // 4 blocks of 4 tokens; seq 2 holds 2 tokens (one block) shared with
    // its fork, seq 4.
    let pool = Pool::new(&engine, MLART_KV_FORMAT_F32, 80, 1, 4, 4).with_seqs(&[2, 3]);
    forward_ok(&model, &pool, 0, &[2], &[2], &random_x(31, 2, hid));
    expect_ok("fork", mlart_kv_seq_fork(pool.ptr, 2, 4));
    let snapshot = |p: &Pool| {
        let mut v = p.stats().to_vec();
        v.extend([2u64, 3, 4].map(|s| p.len(s, 0)));
        v
    };
    let before = snapshot(&pool);
    assert_eq!(before[1], 1, "blocks used");
    // seq 2's token goes into the shared block (copied: 2 free left), then
    // seq 3 wants 3 blocks.
    forward_err(
        "pool exhausted after a copy-on-write",
        forward(&model, &pool, 0, &[2, 3], &[1, 9], &random_x(32, 10, hid)),
        MLART_STATUS_POOL_EXHAUSTED,
        &["seq_id 3"],
    );
    assert_eq!(snapshot(&pool), before, "pool changed by a failed forward");
}

// ---------------------------------------------------------------------------
// DeepSeek-V3.2: the sparse-attention indexer.
// ---------------------------------------------------------------------------

/// A pool with indexer keys of `index_head_dim` elements.
fn indexed_pool(
    engine: &Engine,
    format: mlart_kv_format,
    layers: i32,
    block_size: i32,
    index_head_dim: i32,
) -> Result<Pool, Failure> {
    let mut o = MaybeUninit::<mlart_kv_pool_options>::uninit();
    mlart_kv_pool_options_init(o.as_mut_ptr());
    // SAFETY: initialized just above.
    let mut o = unsafe { o.assume_init() };
    o.kv_format = format;
    o.d_qk = 80;
    o.num_layers = layers;
    o.block_size = block_size;
    o.num_blocks = 256;
    o.index_head_dim = index_head_dim;
    let mut p = ptr::null_mut();
    match take_error(mlart_kv_pool_create(engine.ptr, &o, &mut p)) {
        None => Ok(Pool { ptr: p }),
        Some(f) => Err(f),
    }
}

/// `mlart_model_forward` of a V3.2 model with `index_out`: the output and
/// the positions each token attended to `[total, topk]`.
fn forward_indexed(
    m: &Model,
    pool: &Pool,
    layer: i32,
    seqs: &[u64],
    n_tokens: &[i32],
    x: &[f32],
) -> (Vec<f32>, Vec<i32>) {
    let topk = info(m).index_topk as usize;
    let total: i32 = n_tokens.iter().sum();
    let hid = x.len() / total as usize;
    let mut out = vec![f32::NAN; total as usize * hid];
    let mut sel = vec![i32::MIN; total as usize * topk];
    let mut a = forward_args();
    a.layer = layer;
    a.batch = seqs.len() as i32;
    a.seq_ids = seqs.as_ptr();
    a.n_tokens = n_tokens.as_ptr();
    a.x = x.as_ptr() as *const c_void;
    a.out = out.as_mut_ptr() as *mut c_void;
    a.index_out = sel.as_mut_ptr();
    expect_ok(
        "mlart_model_forward",
        mlart_model_forward(m.ptr, pool.ptr, &a),
    );
    assert!(!sel.contains(&i32::MIN), "index_out not written in full");
    (out, sel)
}

/// How far the engine's top-k may stray from the reference's scores,
/// relative to a query's score range: only E4M3 codes that land on a
/// neighbour (the engine rounds f32 values, the reference f64 ones) move a
/// score, by about a thousandth of the range (measured: see the test
/// output); a wrong rotation, pairing or scale would move it by far more.
const CHOICE_TOL: f64 = 1e-2;

/// The tiny V3.2 model (top-8 indexer) in `dir` on `engine` against the
/// float64 reference: a prefill chunk that crosses top-k inside itself (13
/// tokens), a shorter one (5) in the same forward, a two-token chunk, then
/// decode steps that take the second sequence past top-k; F32 and BF16
/// pools; both layers.
fn v32_against_reference(what: &str, engine: &Engine, dir: &Path, bf16_activations: bool) {
    let model = load_with(engine, dir, |o| {
        if bf16_activations {
            o.activations = MLART_ACTIVATIONS_BF16;
        }
    })
    .unwrap_or_else(|(s, m)| panic!("{what}: load: {s}: {m}"));
    let p = info(&model);
    assert_eq!(
        (p.index_n_heads, p.index_head_dim, p.index_topk),
        (4, 32, 8)
    );
    let topk = 8;
    let hid = p.hidden_size as usize;
    let mut exact = Reference::load(dir, &[0, 1]);
    exact.bf16_activations = bf16_activations;
    let f32_tol = if bf16_activations {
        BF16_ACT_F32
    } else {
        EXACT
    };
    for &(fmt, tol, tol_rounded) in &[(MLART_KV_FORMAT_F32, f32_tol, f32_tol), BF16_POOL] {
        let mut r_exact = exact.fresh(CacheRounding::Exact);
        let mut r_rounded = exact.fresh(CacheRounding::of(fmt));
        let pool = indexed_pool(engine, fmt, 2, 4, 32)
            .unwrap()
            .with_seqs(&[10, 11]);
        let plan: [(Vec<u64>, Vec<i32>); 6] = [
            (vec![10, 11], vec![13, 5]),
            (vec![11, 10], vec![2, 1]),
            (vec![10, 11], vec![1, 1]),
            (vec![10, 11], vec![1, 1]),
            (vec![11], vec![3]),
            (vec![10, 11], vec![1, 1]),
        ];
        let mut sparse_rows = 0;
        for (k, (seqs, n)) in plan.iter().enumerate() {
            for layer in [0usize, 1] {
                let total: i32 = n.iter().sum();
                let x = random_x(900 + k as u64 * 7 + layer as u64, total as usize, hid);
                let (got, sel) = forward_indexed(&model, &pool, layer as i32, seqs, n, &x);
                sparse_rows += sel
                    .chunks(topk)
                    .filter(|r| !r.contains(&-1) && r[topk - 1] >= topk as i32)
                    .count();
                let nu: Vec<usize> = n.iter().map(|&v| v as usize).collect();
                let case = format!(
                    "{what} pool {} step {k} layer {layer} seqs {seqs:?} n {n:?}",
                    kv_format_name(fmt)
                );
                for r in [&mut r_exact, &mut r_rounded] {
                    r.selection = sel.clone();
                }
                let want = r_exact.forward(layer, seqs, &nu, &x);
                compare(&case, &got, &want, tol);
                let want = r_rounded.forward(layer, seqs, &nu, &x);
                compare(&format!("{case} (rounded rows)"), &got, &want, tol_rounded);
                for &s in seqs {
                    assert_eq!(pool.len(s, layer as i32) as usize, r_exact.len(layer, s));
                }
            }
        }
        println!(
            "{what} {}: {sparse_rows} tokens chose among more than top-k; worst choice {:.2e} of a score range",
            kv_format_name(fmt),
            r_exact.worst_choice
        );
        assert!(
            sparse_rows >= 20,
            "{what}: only {sparse_rows} sparse choices"
        );
        assert!(
            r_exact.worst_choice <= CHOICE_TOL,
            "{what}: the engine's top-k strays {:.3e} of a score range from the reference's",
            r_exact.worst_choice
        );
    }
}

/// V3.2 against the reference with bf16 and FP8 weights (ue8m0 scales for
/// the indexer's codes), precise and bf16 activations, on every CPU kernel
/// variant this machine runs (the indexer's scores follow the model's
/// vector code); variants it lacks are reported as skipped.
#[test]
fn v32_sparse_attention_matches_reference() {
    let dirs: Vec<(TempDir, WeightDtype)> = [WeightDtype::Bf16, WeightDtype::Fp8]
        .into_iter()
        .map(|dtype| {
            let dir = TempDir::new("v32");
            make_checkpoint(dir.path(), &gen_opts(Preset::TinyV32, dtype, 2, true));
            (dir, dtype)
        })
        .collect();
    let mut ran = 0;
    for isa in ["scalar", "avx2", "avx512", "avx512bf16"] {
        let Some(engine) = Engine::with_isa(isa, 2) else {
            println!("SKIPPED V3.2 on {isa}: this CPU or build lacks it");
            continue;
        };
        for (dir, dtype) in &dirs {
            for bf16_act in [false, true] {
                let what = format!("v3.2 {isa} {} bf16-activations {bf16_act}", dtype.name());
                v32_against_reference(&what, &engine, dir.path(), bf16_act);
            }
        }
        ran += 1;
    }
    assert!(ran >= 1, "no CPU kernel variant ran");
}

/// V3.2: a 600-token prefill (two passes of at most 512) selects and
/// computes what token-by-token decoding does, and what chunks of 7 do.
/// The choice depends only on the token and the keys before it, so the
/// selections must be identical; the outputs agree to f32 rounding.
#[test]
fn v32_decode_token_by_token_equals_prefill() {
    let dir = TempDir::new("v32-prefill");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::TinyV32, WeightDtype::F32, 1, true),
    );
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    let (hid, topk, n) = (256, 8, 600);
    let x = random_x(4242, n, hid);
    let pools: Vec<Pool> = (0..3)
        .map(|_| {
            indexed_pool(&engine, MLART_KV_FORMAT_F32, 1, 16, 32)
                .unwrap()
                .with_seqs(&[5])
        })
        .collect();
    let (all, all_sel) = forward_indexed(&model, &pools[0], 0, &[5], &[n as i32], &x);
    let mut steps = Vec::new();
    let mut step_sel = Vec::new();
    for t in 0..n {
        let (y, s) = forward_indexed(&model, &pools[1], 0, &[5], &[1], &x[t * hid..(t + 1) * hid]);
        steps.extend(y);
        step_sel.extend(s);
    }
    let mut chunks = Vec::new();
    let mut chunk_sel = Vec::new();
    for c0 in (0..n).step_by(7) {
        let c = 7.min(n - c0);
        let (y, s) = forward_indexed(
            &model,
            &pools[2],
            0,
            &[5],
            &[c as i32],
            &x[c0 * hid..(c0 + c) * hid],
        );
        chunks.extend(y);
        chunk_sel.extend(s);
    }
    assert_eq!(
        all_sel, step_sel,
        "prefill and token-by-token choices differ"
    );
    assert_eq!(all_sel, chunk_sel, "prefill and chunked choices differ");
    // Late tokens choose among hundreds of keys, and not just the latest.
    let last = &all_sel[(n - 1) * topk..];
    assert!(last[0] < 500, "token {} chose {last:?}", n - 1);
    for t in 0..n {
        for (what, other) in [("decode", &steps), ("chunks", &chunks)] {
            let e = row_rel(&all, other, hid, t, t);
            assert!(e <= 1e-4, "token {t}: {what} vs prefill {e:.3e}");
        }
    }
}

/// V3.2 pools: forking shares the indexer keys (copy-on-write copies them
/// with the block), so a forked sequence continues exactly as the original
/// would; the pool reports the keys' bytes.
#[test]
fn v32_fork_copies_indexer_keys() {
    let dir = TempDir::new("v32-fork");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::TinyV32, WeightDtype::Bf16, 1, true),
    );
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    let hid = 256;
    let pool = indexed_pool(&engine, MLART_KV_FORMAT_BF16, 1, 4, 32)
        .unwrap()
        .with_seqs(&[1]);
    let plain = Pool::new(&engine, MLART_KV_FORMAT_BF16, 80, 1, 4, 256);
    // Per block: 4 rows of 80 bf16 plus 4 indexer keys of 32 codes + scale.
    assert_eq!(pool.stats()[4], plain.stats()[4] + 4 * 36);
    let prompt = random_x(1, 14, hid);
    forward_indexed(&model, &pool, 0, &[1], &[14], &prompt);
    expect_ok("fork", mlart_kv_seq_fork(pool.ptr, 1, 2));
    // The original goes on with other tokens (its partly filled last block
    // is copied on write), then the fork continues with the same tokens a
    // fresh copy of the prompt does.
    forward_indexed(&model, &pool, 0, &[1], &[3], &random_x(2, 3, hid));
    let fresh = indexed_pool(&engine, MLART_KV_FORMAT_BF16, 1, 4, 32)
        .unwrap()
        .with_seqs(&[9]);
    forward_indexed(&model, &fresh, 0, &[9], &[14], &prompt);
    for k in 0..3u64 {
        let x = random_x(10 + k, 2, hid);
        let (a, sa) = forward_indexed(&model, &pool, 0, &[2], &[2], &x);
        let (b, sb) = forward_indexed(&model, &fresh, 0, &[9], &[2], &x);
        assert_eq!(sa, sb, "step {k}: the fork chose other positions");
        assert_eq!(a, b, "step {k}: the fork's output differs");
    }
}

/// V3.2 errors name the argument: a pool without (or with the wrong)
/// indexer keys, indexer keys for a V3 model, `index_out` for a V3 model, a
/// plain append to an indexed pool, a bad `index_head_dim`; a failed
/// forward leaves the pool unchanged. Older struct layouts still work.
#[test]
fn v32_errors_and_struct_versions() {
    let dir = TempDir::new("v32-errors");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::TinyV32, WeightDtype::Bf16, 1, true),
    );
    let v3dir = TempDir::new("v32-errors-v3");
    make_checkpoint(
        v3dir.path(),
        &gen_opts(Preset::Tiny, WeightDtype::Bf16, 1, true),
    );
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    let v3 = load(&engine, v3dir.path());
    let x = random_x(3, 2, 256);

    let plain = Pool::new(&engine, MLART_KV_FORMAT_BF16, 80, 1, 4, 64).with_seqs(&[1]);
    forward_err(
        "V3.2 model, pool without indexer keys",
        forward(&model, &plain, 0, &[1], &[2], &x),
        MLART_STATUS_INVALID_ARGUMENT,
        &["index_head_dim = 0", "index_head_dim = 32"],
    );
    let wrong = indexed_pool(&engine, MLART_KV_FORMAT_BF16, 1, 4, 64)
        .unwrap()
        .with_seqs(&[1]);
    forward_err(
        "V3.2 model, pool with 64-element keys",
        forward(&model, &wrong, 0, &[1], &[2], &x),
        MLART_STATUS_INVALID_ARGUMENT,
        &["index_head_dim = 64", "index_head_dim = 32"],
    );
    let indexed = indexed_pool(&engine, MLART_KV_FORMAT_BF16, 1, 4, 32)
        .unwrap()
        .with_seqs(&[1]);
    forward_err(
        "V3 model, pool with indexer keys",
        forward(&v3, &indexed, 0, &[1], &[2], &x),
        MLART_STATUS_INVALID_ARGUMENT,
        &[
            "index_head_dim = 32",
            "deepseek_v3",
            "no sparse-attention indexer",
        ],
    );
    assert_eq!(
        (plain.len(1, 0), wrong.len(1, 0), indexed.len(1, 0)),
        (0, 0, 0)
    );

    // index_out on a model without an indexer.
    let mut sel = vec![0i32; 64];
    let mut out = vec![f32::NAN; 2 * 256];
    let mut a = forward_args();
    a.batch = 1;
    let (ids, n) = ([1u64], [2i32]);
    a.seq_ids = ids.as_ptr();
    a.n_tokens = n.as_ptr();
    a.x = x.as_ptr() as *const c_void;
    a.out = out.as_mut_ptr() as *mut c_void;
    a.index_out = sel.as_mut_ptr();
    expect_error(
        "index_out on V3",
        mlart_model_forward(v3.ptr, plain.ptr, &a),
        MLART_STATUS_INVALID_ARGUMENT,
        &["index_out", "no sparse-attention indexer"],
    );
    // index_out aliasing out.
    a.index_out = out.as_mut_ptr() as *mut i32;
    expect_error(
        "index_out overlapping out",
        mlart_model_forward(model.ptr, indexed.ptr, &a),
        MLART_STATUS_INVALID_ARGUMENT,
        &["index_out overlaps out"],
    );
    assert_eq!(indexed.len(1, 0), 0);
    // The 0.3 layout of mlart_forward_args (64 bytes, no index_out) works.
    a.index_out = sel.as_mut_ptr();
    sel.fill(7);
    a.struct_size = 64;
    expect_ok(
        "0.3 forward args",
        mlart_model_forward(model.ptr, indexed.ptr, &a),
    );
    assert!(
        sel.iter().all(|&v| v == 7),
        "index_out written for a 0.3 caller"
    );
    assert_eq!(indexed.len(1, 0), 2);

    // A plain append to an indexed pool.
    let rows = [0u16; 80];
    expect_error(
        "append to an indexed pool",
        mlart_kv_append(
            indexed.ptr,
            1,
            0,
            1,
            MLART_DTYPE_BF16,
            rows.as_ptr() as *const c_void,
        ),
        MLART_STATUS_INVALID_ARGUMENT,
        &["index_head_dim = 32", "forward"],
    );
    assert_eq!(indexed.len(1, 0), 2);

    // Bad index_head_dim values.
    for bad in [-1, 129] {
        let e = indexed_pool(&engine, MLART_KV_FORMAT_BF16, 1, 4, bad)
            .err()
            .expect("accepted");
        assert_eq!(e.0, MLART_STATUS_INVALID_ARGUMENT);
        assert!(e.1.contains(&format!("index_head_dim = {bad}")), "{}", e.1);
    }
    // The 0.3 layout of mlart_kv_pool_options (24 bytes) makes a pool
    // without indexer keys; its bytes past 24 are not read.
    #[repr(C)]
    struct Padded {
        o: mlart_kv_pool_options,
        poison: [u8; 16],
    }
    let mut po = MaybeUninit::<mlart_kv_pool_options>::uninit();
    mlart_kv_pool_options_init(po.as_mut_ptr());
    // SAFETY: initialized just above.
    let mut po = Padded {
        o: unsafe { po.assume_init() },
        poison: [0xff; 16],
    };
    po.o.struct_size = 24;
    po.o.d_qk = 80;
    po.o.num_blocks = 8;
    po.o.index_head_dim = 77;
    let mut p = ptr::null_mut();
    expect_ok(
        "0.3 pool options",
        mlart_kv_pool_create(engine.ptr, &po.o, &mut p),
    );
    let old = Pool { ptr: p }.with_seqs(&[1]);
    expect_ok(
        "append to a 0.3 pool",
        mlart_kv_append(
            old.ptr,
            1,
            0,
            1,
            MLART_DTYPE_BF16,
            rows.as_ptr() as *const c_void,
        ),
    );
    assert_eq!(po.poison, [0xff; 16]);

    // Model props: a 0.3 caller (144 bytes) gets nothing past them.
    #[repr(C)]
    struct PaddedProps {
        p: mlart_model_props,
    }
    let mut pp = MaybeUninit::<mlart_model_props>::uninit();
    mlart_model_props_init(pp.as_mut_ptr());
    // SAFETY: initialized just above.
    let mut pp = PaddedProps {
        p: unsafe { pp.assume_init() },
    };
    pp.p.struct_size = 144;
    pp.p.index_topk = -5;
    expect_ok("0.3 props", mlart_model_info(model.ptr, &mut pp.p));
    assert_eq!(pp.p.index_topk, -5, "written past a 0.3 struct");
    assert_eq!(pp.p.d_qk, 80);
    let v3p = info(&v3);
    assert_eq!(
        (v3p.index_n_heads, v3p.index_head_dim, v3p.index_topk),
        (0, 0, 0)
    );
}

/// config.json and tensor errors of a V3.2 checkpoint name what is wrong.
#[test]
fn v32_malformed_checkpoints_give_named_errors() {
    let tmp = TempDir::new("v32-malformed");
    let src = tmp.path().join("src");
    make_checkpoint(&src, &gen_opts(Preset::TinyV32, WeightDtype::Bf16, 1, true));
    let engine = Engine::new(1);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let with_cfg = |name: &str, edit: &dyn Fn(&mut Value)| -> PathBuf {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
        let mut c = cfg.clone();
        edit(&mut c);
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        dir
    };
    let d = with_cfg("no-topk", &|c| {
        c.as_object_mut().unwrap().remove("index_topk");
    });
    load_err(
        &engine,
        &d,
        MLART_STATUS_FORMAT,
        &["index_topk", "deepseek_v32"],
    );
    let d = with_cfg("odd-dim", &|c| c["index_head_dim"] = json!(48));
    load_err(
        &engine,
        &d,
        MLART_STATUS_FORMAT,
        &["index_head_dim = 48", "power of two"],
    );
    let d = with_cfg("no-lora", &|c| c["q_lora_rank"] = Value::Null);
    load_err(&engine, &d, MLART_STATUS_FORMAT, &["q_lora_rank"]);
    // A missing indexer tensor is named.
    let dir = tmp.path().join("no-wk");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let kept: Vec<RawTensor> = read_safetensors(&src.join("model.safetensors"))
        .into_iter()
        .filter(|t| !t.name.ends_with("indexer.wk.weight"))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &kept);
    load_err(
        &engine,
        &dir,
        MLART_STATUS_NOT_FOUND,
        &["model.layers.0.self_attn.indexer.wk.weight"],
    );
}

/// V3.2 speculative-decode rollback: tokens truncated away leave no trace
/// in the indexer's keys; what follows matches a pool that never had them.
#[test]
fn v32_truncate_then_continue_matches_fresh() {
    let dir = TempDir::new("v32-truncate");
    make_checkpoint(
        dir.path(),
        &gen_opts(Preset::TinyV32, WeightDtype::Bf16, 1, true),
    );
    let engine = Engine::new(2);
    let model = load(&engine, dir.path());
    let hid = 256;
    let prompt = random_x(21, 12, hid);
    let a = indexed_pool(&engine, MLART_KV_FORMAT_F32, 1, 4, 32)
        .unwrap()
        .with_seqs(&[1]);
    let b = indexed_pool(&engine, MLART_KV_FORMAT_F32, 1, 4, 32)
        .unwrap()
        .with_seqs(&[1]);
    forward_indexed(&model, &a, 0, &[1], &[12], &prompt);
    forward_indexed(&model, &b, 0, &[1], &[12], &prompt);
    // Three draft tokens on `a`, rejected.
    forward_indexed(&model, &a, 0, &[1], &[3], &random_x(22, 3, hid));
    expect_ok("truncate", mlart_kv_seq_truncate(a.ptr, 1, 12));
    assert_eq!(a.len(1, 0), 12);
    for k in 0..4u64 {
        let x = random_x(30 + k, 1, hid);
        let (ya, sa) = forward_indexed(&model, &a, 0, &[1], &[1], &x);
        let (yb, sb) = forward_indexed(&model, &b, 0, &[1], &[1], &x);
        assert_eq!(sa, sb, "step {k}: choices differ after the rollback");
        assert_eq!(ya, yb, "step {k}: outputs differ after the rollback");
    }
}
