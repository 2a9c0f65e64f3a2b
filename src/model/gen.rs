//! Random-weight checkpoints in the Hugging Face DeepSeek layout.
//!
//! [`generate`] writes `config.json` plus one `model.safetensors` or
//! `model-0000K-of-0000N.safetensors` shards with a
//! `model.safetensors.index.json`, holding the MLA attention projections of
//! every layer and a few tensors a loader must skip (embedding, an MLP
//! projection, the input layernorm). Values are deterministic in the seed:
//! each tensor row draws from its own splitmix64 stream keyed by
//! (seed, tensor name, row), so the bytes do not depend on the thread count,
//! the shard count or the file order. [`reference_weight`] regenerates a
//! tensor's exact f32 values for comparison with what a loader reads.
//!
//! FP8 follows DeepSeek-V3: each 2-D projection `.weight` is `F8_E4M3` with a
//! sibling `.weight_scale_inv` (`F32`, one per 128x128 block, partial at the
//! edges) where `scale_inv = max|w| / 448` and `w ≈ e4m3 * scale_inv`.
//!
//! Tensors are streamed to disk in bands of 128 rows: no f32 copy of the
//! whole model is held, so a one-layer V3 checkpoint needs tens of MB.

use crate::error::{Error, Result, Status};
use crate::format::fp8::f32_to_e4m3;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// DeepSeek-V3 FP8 block edge (rows and columns).
pub const FP8_BLOCK: usize = 128;
const E4M3_MAX: f32 = 448.0;

/// Model shape to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// A small DeepSeek-V3-like shape for tests (hidden 256, 4 heads).
    Tiny,
    /// DeepSeek-V2-Lite attention (no q LoRA, 16 heads).
    V2Lite,
    /// DeepSeek-V3 / R1 attention (128 heads).
    V3,
    /// [`Preset::Tiny`] with DeepSeek-V3.2's sparse-attention indexer
    /// (4 indexer heads of 32, top-8), so tests reach the sparse path.
    TinyV32,
    /// DeepSeek-V3.2 attention: V3's, plus the indexer (64 heads of 128,
    /// top-2048).
    V32,
    /// [`Preset::Tiny`]'s projections with DeepSeek's cache rows (kv_lora
    /// 512, rope 64: d_qk 576, d_v 512), the shape the GPU kernels take:
    /// the smallest model a CUDA engine runs.
    Small,
    /// [`Preset::Small`] with the V3.2 indexer (4 heads of 64, top-8).
    SmallV32,
}

impl Preset {
    /// `"tiny"`, `"v2-lite"` (also `v2lite`, `v2_lite`), `"v3"`,
    /// `"tiny-v3.2"` (also `tiny-v32`), `"v3.2"` (also `v32`), `"small"` or
    /// `"small-v3.2"` (also `small-v32`), any case.
    pub fn parse(s: &str) -> Option<Preset> {
        match s.to_ascii_lowercase().as_str() {
            "tiny" => Some(Preset::Tiny),
            "v2-lite" | "v2lite" | "v2_lite" => Some(Preset::V2Lite),
            "v3" => Some(Preset::V3),
            "tiny-v3.2" | "tiny-v32" | "tiny_v32" => Some(Preset::TinyV32),
            "v3.2" | "v32" => Some(Preset::V32),
            "small" => Some(Preset::Small),
            "small-v3.2" | "small-v32" | "small_v32" => Some(Preset::SmallV32),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::V2Lite => "v2-lite",
            Preset::V3 => "v3",
            Preset::TinyV32 => "tiny-v3.2",
            Preset::V32 => "v3.2",
            Preset::Small => "small",
            Preset::SmallV32 => "small-v3.2",
        }
    }

    /// The attention dimensions of this preset.
    pub fn dims(self) -> PresetDims {
        match self {
            Preset::Small => PresetDims {
                kv_lora_rank: 512,
                qk_rope_head_dim: 64,
                ..Preset::Tiny.dims()
            },
            Preset::SmallV32 => PresetDims {
                model_type: "deepseek_v32",
                indexer: Some(IndexerDims {
                    heads: 4,
                    head_dim: 64,
                    topk: 8,
                }),
                ..Preset::Small.dims()
            },
            Preset::TinyV32 => PresetDims {
                model_type: "deepseek_v32",
                indexer: Some(IndexerDims {
                    heads: 4,
                    head_dim: 32,
                    topk: 8,
                }),
                ..Preset::Tiny.dims()
            },
            Preset::V32 => PresetDims {
                model_type: "deepseek_v32",
                indexer: Some(IndexerDims {
                    heads: 64,
                    head_dim: 128,
                    topk: 2048,
                }),
                ..Preset::V3.dims()
            },
            Preset::Tiny => PresetDims {
                model_type: "deepseek_v3",
                indexer: None,
                hidden: 256,
                heads: 4,
                q_lora_rank: Some(96),
                kv_lora_rank: 64,
                qk_nope_head_dim: 32,
                qk_rope_head_dim: 16,
                v_head_dim: 32,
                max_position_embeddings: 2048,
                yarn_factor: 4,
                yarn_original_max_position_embeddings: 256,
                yarn_mscale: 1.0,
                yarn_mscale_all_dim: 1.0,
            },
            Preset::V2Lite => PresetDims {
                model_type: "deepseek_v2",
                indexer: None,
                hidden: 2048,
                heads: 16,
                q_lora_rank: None,
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128,
                max_position_embeddings: 163840,
                yarn_factor: 40,
                yarn_original_max_position_embeddings: 4096,
                yarn_mscale: 0.707,
                yarn_mscale_all_dim: 0.707,
            },
            Preset::V3 => PresetDims {
                model_type: "deepseek_v3",
                indexer: None,
                hidden: 7168,
                heads: 128,
                q_lora_rank: Some(1536),
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128,
                max_position_embeddings: 163840,
                yarn_factor: 40,
                yarn_original_max_position_embeddings: 4096,
                yarn_mscale: 1.0,
                yarn_mscale_all_dim: 1.0,
            },
        }
    }
}

/// Attention dimensions and rope settings of a [`Preset`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PresetDims {
    pub model_type: &'static str,
    /// DeepSeek-V3.2's indexer; `None` for V2/V3.
    pub indexer: Option<IndexerDims>,
    pub hidden: usize,
    pub heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub max_position_embeddings: usize,
    pub yarn_factor: usize,
    pub yarn_original_max_position_embeddings: usize,
    pub yarn_mscale: f64,
    pub yarn_mscale_all_dim: f64,
}

/// `index_n_heads`, `index_head_dim`, `index_topk` of a V3.2 preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexerDims {
    pub heads: usize,
    pub head_dim: usize,
    pub topk: usize,
}

/// Rows of the (skipped) embedding table.
pub const GEN_VOCAB: usize = 64;
/// Rows of the (skipped) `mlp.gate_proj.weight` of every layer.
pub const GEN_INTERMEDIATE: usize = 32;

/// How the weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    Bf16,
    F16,
    F32,
    /// Projections as F8_E4M3 with 128x128 block `weight_scale_inv`; norms
    /// and the embedding stay BF16.
    Fp8,
}

impl WeightDtype {
    /// `bf16`, `f16`/`fp16`, `f32`/`fp32`, `fp8`/`f8`/`e4m3`, any case.
    pub fn parse(s: &str) -> Option<WeightDtype> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Some(WeightDtype::Bf16),
            "f16" | "fp16" | "float16" => Some(WeightDtype::F16),
            "f32" | "fp32" | "float32" => Some(WeightDtype::F32),
            "fp8" | "f8" | "e4m3" | "f8_e4m3" => Some(WeightDtype::Fp8),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
            WeightDtype::F32 => "f32",
            WeightDtype::Fp8 => "fp8",
        }
    }
}

/// What [`generate`] writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenOptions {
    pub preset: Preset,
    pub dtype: WeightDtype,
    /// `num_hidden_layers`; at least 1.
    pub layers: usize,
    pub seed: u64,
    /// 1: a single `model.safetensors`; more: shards plus an index.
    pub shards: usize,
    /// false: `rope_scaling` is omitted from config.json.
    pub yarn: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            preset: Preset::Tiny,
            dtype: WeightDtype::Bf16,
            layers: 2,
            seed: 0,
            shards: 1,
            yarn: true,
        }
    }
}

/// One file [`generate_report`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenFile {
    pub path: PathBuf,
    pub tensors: usize,
    /// File size in bytes (header included).
    pub bytes: u64,
}

/// Summary of a generated checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenReport {
    /// config.json, the safetensors files, then the index if any.
    pub files: Vec<GenFile>,
    /// Number of tensors in all safetensors files.
    pub tensors: usize,
    /// Sum of tensor data bytes (the index's `total_size`).
    pub tensor_bytes: u64,
    /// Elements of the attention tensors (projections and their norms).
    pub attention_params: u64,
}

/// Writes a random-weight checkpoint into `dir` (created if missing).
pub fn generate(dir: &Path, opts: &GenOptions) -> Result<()> {
    generate_report(dir, opts).map(|_| ())
}

/// [`generate`], returning what was written.
pub fn generate_report(dir: &Path, opts: &GenOptions) -> Result<GenReport> {
    if opts.layers == 0 {
        return Err(Error::invalid("layers = 0: need at least one layer"));
    }
    let specs = tensor_specs(opts);
    let units = units_of(&specs);
    if opts.shards == 0 || opts.shards > units.len() {
        return Err(Error::invalid(format!(
            "shards = {}: must be in [1, {}] for this model",
            opts.shards,
            units.len()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err("create directory", dir, e))?;

    let mut files = Vec::new();
    let config_path = dir.join("config.json");
    let config = serde_json::to_string_pretty(&config_json(opts))
        .map_err(|e| Error::internal(format!("config.json: {e}")))?;
    write_file(&config_path, format!("{config}\n").as_bytes())?;
    files.push(GenFile {
        bytes: file_len(&config_path)?,
        path: config_path,
        tensors: 0,
    });

    let shard_of_unit = assign_shards(&units, &specs, opts.shards);
    let file_name = |k: usize| {
        if opts.shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, opts.shards)
        }
    };
    let mut weight_map = serde_json::Map::new();
    for k in 0..opts.shards {
        let members: Vec<usize> = units
            .iter()
            .zip(&shard_of_unit)
            .filter(|(_, &s)| s == k)
            .flat_map(|(u, _)| u.iter().copied())
            .collect();
        let name = file_name(k);
        let path = dir.join(&name);
        write_shard(&path, &specs, &members, opts.seed)?;
        for &m in &members {
            weight_map.insert(specs[m].name.clone(), Value::String(name.clone()));
        }
        files.push(GenFile {
            bytes: file_len(&path)?,
            path,
            tensors: members.len(),
        });
    }

    let tensor_bytes: u64 = specs.iter().map(|s| s.byte_len() as u64).sum();
    if opts.shards > 1 {
        let index = json!({
            "metadata": { "total_size": tensor_bytes },
            "weight_map": weight_map,
        });
        let path = dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::internal(format!("index: {e}")))?;
        write_file(&path, format!("{text}\n").as_bytes())?;
        files.push(GenFile {
            bytes: file_len(&path)?,
            path,
            tensors: 0,
        });
    }
    let attention_params = specs
        .iter()
        .filter(|s| s.attention && s.kind != Kind::ScaleInv)
        .map(|s| s.numel() as u64)
        .sum();
    Ok(GenReport {
        files,
        tensors: specs.len(),
        tensor_bytes,
        attention_params,
    })
}

/// The exact f32 values [`generate`] draws for tensor `name` under `opts`
/// (before rounding to the stored dtype), row-major `[out, in]`; `None` if
/// the checkpoint has no such tensor or it is a `weight_scale_inv`.
pub fn reference_weight(opts: &GenOptions, name: &str) -> Option<Vec<f32>> {
    let spec = tensor_specs(opts).into_iter().find(|s| s.name == name)?;
    if spec.kind == Kind::ScaleInv {
        return None;
    }
    let (rows, cols) = spec.rows_cols();
    let mut out = vec![0f32; rows * cols];
    fill_rows(&spec, opts.seed, 0, &mut out);
    Some(out)
}

// ---------------------------------------------------------------------------
// Tensor list.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `[out, in]` projection: N(0, 1) / sqrt(in).
    Proj,
    /// 1-D norm: 1 + 0.1 N(0, 1).
    Norm,
    /// Embedding table: N(0, 1) / sqrt(hidden).
    Embed,
    /// A projection kept in the plain dtype even in an FP8 checkpoint
    /// (V3.2's `indexer.weights_proj`): N(0, 1) / sqrt(in).
    PlainProj,
    /// 1-D bias: 0.1 N(0, 1).
    Bias,
    /// FP8 block scales of the preceding projection.
    ScaleInv,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StDtype {
    Bf16,
    F16,
    F32,
    F8E4m3,
}

impl StDtype {
    fn size(self) -> usize {
        match self {
            StDtype::F32 => 4,
            StDtype::Bf16 | StDtype::F16 => 2,
            StDtype::F8E4m3 => 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            StDtype::Bf16 => "BF16",
            StDtype::F16 => "F16",
            StDtype::F32 => "F32",
            StDtype::F8E4m3 => "F8_E4M3",
        }
    }
}

#[derive(Clone, Debug)]
struct Spec {
    name: String,
    shape: Vec<usize>,
    kind: Kind,
    dtype: StDtype,
    /// Part of the attention a loader reads.
    attention: bool,
    /// For a ScaleInv: the shape of the weight it scales.
    weight_shape: Vec<usize>,
}

impl Spec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn byte_len(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => unreachable!("generated tensors are 1-D or 2-D"),
        }
    }
}

fn tensor_specs(opts: &GenOptions) -> Vec<Spec> {
    let d = opts.preset.dims();
    let h = d.heads;
    let qk = d.qk_nope_head_dim + d.qk_rope_head_dim;
    let plain = match opts.dtype {
        WeightDtype::Bf16 | WeightDtype::Fp8 => StDtype::Bf16,
        WeightDtype::F16 => StDtype::F16,
        WeightDtype::F32 => StDtype::F32,
    };
    let mut specs = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, kind: Kind, attention: bool| {
        if kind == Kind::Proj && opts.dtype == WeightDtype::Fp8 {
            let scale_shape = vec![shape[0].div_ceil(FP8_BLOCK), shape[1].div_ceil(FP8_BLOCK)];
            specs.push(Spec {
                name: name.clone(),
                shape: shape.clone(),
                kind,
                dtype: StDtype::F8E4m3,
                attention,
                weight_shape: Vec::new(),
            });
            specs.push(Spec {
                name: format!("{name}_scale_inv"),
                shape: scale_shape,
                kind: Kind::ScaleInv,
                dtype: StDtype::F32,
                attention,
                weight_shape: shape,
            });
        } else {
            specs.push(Spec {
                name,
                shape,
                kind,
                dtype: plain,
                attention,
                weight_shape: Vec::new(),
            });
        }
    };
    push(
        "model.embed_tokens.weight".into(),
        vec![GEN_VOCAB, d.hidden],
        Kind::Embed,
        false,
    );
    for i in 0..opts.layers {
        let l = format!("model.layers.{i}.");
        let a = format!("{l}self_attn.");
        push(
            format!("{l}input_layernorm.weight"),
            vec![d.hidden],
            Kind::Norm,
            false,
        );
        match d.q_lora_rank {
            Some(r) => {
                push(
                    format!("{a}q_a_proj.weight"),
                    vec![r, d.hidden],
                    Kind::Proj,
                    true,
                );
                push(
                    format!("{a}q_a_layernorm.weight"),
                    vec![r],
                    Kind::Norm,
                    true,
                );
                push(
                    format!("{a}q_b_proj.weight"),
                    vec![h * qk, r],
                    Kind::Proj,
                    true,
                );
            }
            None => push(
                format!("{a}q_proj.weight"),
                vec![h * qk, d.hidden],
                Kind::Proj,
                true,
            ),
        }
        push(
            format!("{a}kv_a_proj_with_mqa.weight"),
            vec![d.kv_lora_rank + d.qk_rope_head_dim, d.hidden],
            Kind::Proj,
            true,
        );
        push(
            format!("{a}kv_a_layernorm.weight"),
            vec![d.kv_lora_rank],
            Kind::Norm,
            true,
        );
        push(
            format!("{a}kv_b_proj.weight"),
            vec![h * (d.qk_nope_head_dim + d.v_head_dim), d.kv_lora_rank],
            Kind::Proj,
            true,
        );
        push(
            format!("{a}o_proj.weight"),
            vec![d.hidden, h * d.v_head_dim],
            Kind::Proj,
            true,
        );
        if let (Some(ix), Some(r)) = (d.indexer, d.q_lora_rank) {
            let x = format!("{a}indexer.");
            push(
                format!("{x}wq_b.weight"),
                vec![ix.heads * ix.head_dim, r],
                Kind::Proj,
                true,
            );
            push(
                format!("{x}wk.weight"),
                vec![ix.head_dim, d.hidden],
                Kind::Proj,
                true,
            );
            push(
                format!("{x}k_norm.weight"),
                vec![ix.head_dim],
                Kind::Norm,
                true,
            );
            push(
                format!("{x}k_norm.bias"),
                vec![ix.head_dim],
                Kind::Bias,
                true,
            );
            push(
                format!("{x}weights_proj.weight"),
                vec![ix.heads, d.hidden],
                Kind::PlainProj,
                true,
            );
        }
        push(
            format!("{l}mlp.gate_proj.weight"),
            vec![GEN_INTERMEDIATE, d.hidden],
            Kind::Proj,
            false,
        );
    }
    specs
}

/// Groups of spec indices that stay in one shard (a weight and its scales).
fn units_of(specs: &[Spec]) -> Vec<Vec<usize>> {
    let mut units: Vec<Vec<usize>> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        match (s.kind, units.last_mut()) {
            (Kind::ScaleInv, Some(last)) => last.push(i),
            _ => units.push(vec![i]),
        }
    }
    units
}

/// Splits the units, in model order, into `shards` contiguous non-empty
/// runs of about equal byte size (as Hugging Face's `max_shard_size` does).
fn assign_shards(units: &[Vec<usize>], specs: &[Spec], shards: usize) -> Vec<usize> {
    let sizes: Vec<u64> = units
        .iter()
        .map(|u| u.iter().map(|&i| specs[i].byte_len() as u64).sum())
        .collect();
    let total: u64 = sizes.iter().sum::<u64>().max(1);
    let n = units.len();
    let mut out = Vec::with_capacity(n);
    let (mut before, mut prev) = (0u64, 0usize);
    for (j, size) in sizes.iter().enumerate() {
        // Shard by the unit's midpoint, never skipping a shard and leaving
        // at least one unit for each shard after this one.
        let mid = before + size / 2;
        let want = ((mid as u128 * shards as u128) / total as u128) as usize;
        let next = if j == 0 { 0 } else { prev + 1 };
        let s = want
            .clamp(prev, next)
            .max(shards.saturating_sub(n - j))
            .min(shards - 1);
        out.push(s);
        prev = s;
        before += size;
    }
    out
}

// ---------------------------------------------------------------------------
// config.json.

fn config_json(opts: &GenOptions) -> Value {
    let d = opts.preset.dims();
    let v3 = d.model_type != "deepseek_v2";
    let (experts, per_tok, moe_inter, groups, topk_groups) = match opts.preset {
        Preset::Tiny | Preset::TinyV32 | Preset::Small | Preset::SmallV32 => (8, 2, 16, 1, 1),
        Preset::V2Lite => (64, 6, 1408, 1, 1),
        Preset::V3 | Preset::V32 => (256, 8, 2048, 8, 4),
    };
    let mut c = serde_json::Map::new();
    let mut set = |k: &str, v: Value| {
        c.insert(k.to_string(), v);
    };
    let arch = match d.model_type {
        "deepseek_v32" => "DeepseekV32ForCausalLM",
        "deepseek_v3" => "DeepseekV3ForCausalLM",
        _ => "DeepseekV2ForCausalLM",
    };
    set("architectures", json!([arch]));
    set("model_type", json!(d.model_type));
    set("attention_bias", json!(false));
    set("attention_dropout", json!(0.0));
    set("bos_token_id", json!(0));
    set("eos_token_id", json!(1));
    set("first_k_dense_replace", json!(1));
    set("hidden_act", json!("silu"));
    set("hidden_size", json!(d.hidden));
    if let Some(ix) = d.indexer {
        set("index_head_dim", json!(ix.head_dim));
        set("index_n_heads", json!(ix.heads));
        set("index_topk", json!(ix.topk));
    }
    set("initializer_range", json!(0.02));
    set("intermediate_size", json!(GEN_INTERMEDIATE));
    set("kv_lora_rank", json!(d.kv_lora_rank));
    set("max_position_embeddings", json!(d.max_position_embeddings));
    set("moe_intermediate_size", json!(moe_inter));
    set("moe_layer_freq", json!(1));
    set("n_group", json!(groups));
    set("n_routed_experts", json!(experts));
    set("n_shared_experts", json!(if v3 { 1 } else { 2 }));
    set("norm_topk_prob", json!(v3));
    set("num_attention_heads", json!(d.heads));
    set("num_experts_per_tok", json!(per_tok));
    set("num_hidden_layers", json!(opts.layers));
    set("num_key_value_heads", json!(d.heads));
    if v3 {
        set("num_nextn_predict_layers", json!(1));
    }
    set("q_lora_rank", json!(d.q_lora_rank));
    set("qk_nope_head_dim", json!(d.qk_nope_head_dim));
    set("qk_rope_head_dim", json!(d.qk_rope_head_dim));
    if opts.dtype == WeightDtype::Fp8 {
        set(
            "quantization_config",
            json!({
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "scale_fmt": "ue8m0",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            }),
        );
    }
    set("rms_norm_eps", json!(1e-6));
    if opts.yarn {
        set(
            "rope_scaling",
            json!({
                "beta_fast": 32,
                "beta_slow": 1,
                "factor": d.yarn_factor,
                "mscale": d.yarn_mscale,
                "mscale_all_dim": d.yarn_mscale_all_dim,
                "original_max_position_embeddings": d.yarn_original_max_position_embeddings,
                "type": "yarn",
            }),
        );
    }
    set("rope_theta", json!(10000));
    set("routed_scaling_factor", json!(if v3 { 2.5 } else { 1.0 }));
    set(
        "scoring_func",
        json!(if v3 { "sigmoid" } else { "softmax" }),
    );
    set("tie_word_embeddings", json!(false));
    set("topk_method", json!(if v3 { "noaux_tc" } else { "greedy" }));
    set("topk_group", json!(topk_groups));
    let torch_dtype = match opts.dtype {
        WeightDtype::Bf16 | WeightDtype::Fp8 => "bfloat16",
        WeightDtype::F16 => "float16",
        WeightDtype::F32 => "float32",
    };
    set("torch_dtype", json!(torch_dtype));
    set("transformers_version", json!("4.46.3"));
    set("use_cache", json!(true));
    set("v_head_dim", json!(d.v_head_dim));
    set("vocab_size", json!(GEN_VOCAB));
    Value::Object(c)
}

// ---------------------------------------------------------------------------
// Random values.

/// Deterministic values in [-1, 1) from `seed` (xorshift): stand-in hidden
/// states for `mlart run`/`bench --model`, and test inputs.
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Fills `out` with N(0, 1) samples (Box-Muller on a splitmix64 stream).
fn fill_normal(state: &mut u64, out: &mut [f32]) {
    let unit = |s: &mut u64| ((splitmix64(s) >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
    for pair in out.chunks_mut(2) {
        let u1 = unit(state); // (0, 1]: ln is finite
        let u2 = unit(state);
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        pair[0] = (r * c) as f32;
        if pair.len() > 1 {
            pair[1] = (r * s) as f32;
        }
    }
}

/// Fills rows `first_row..` of tensor `spec` into `out` (whole rows).
fn fill_rows(spec: &Spec, seed: u64, first_row: usize, out: &mut [f32]) {
    let (_, cols) = spec.rows_cols();
    let mut key = seed ^ fnv1a(&spec.name);
    let tensor_key = splitmix64(&mut key);
    let (scale, offset) = match spec.kind {
        Kind::Proj => (1.0 / (cols as f32).sqrt(), 0.0),
        Kind::Embed => (1.0 / (cols as f32).sqrt(), 0.0),
        Kind::Norm => (0.1, 1.0),
        Kind::PlainProj => (1.0 / (cols as f32).sqrt(), 0.0),
        Kind::Bias => (0.1, 0.0),
        Kind::ScaleInv => unreachable!("scales are derived, not drawn"),
    };
    out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let mut state = tensor_key ^ ((first_row + r) as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        splitmix64(&mut state);
        fill_normal(&mut state, row);
        for v in row.iter_mut() {
            *v = *v * scale + offset;
        }
    });
}

// ---------------------------------------------------------------------------
// Writing.

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::new(Status::Io, format!("{what} {}: {e}", path.display()))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| io_err("write", path, e))
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .map_err(|e| io_err("stat", path, e))?
        .len())
}

/// Writes the tensors `members` of `specs` as one safetensors file. Data is
/// laid out by element size, largest first, then by name, so every tensor
/// is aligned to its element size (the header is padded to 8 bytes).
fn write_shard(path: &Path, specs: &[Spec], members: &[usize], seed: u64) -> Result<()> {
    let mut order = members.to_vec();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (&specs[a], &specs[b]);
        sb.dtype
            .size()
            .cmp(&sa.dtype.size())
            .then_with(|| sa.name.cmp(&sb.name))
    });
    let mut offsets = vec![0usize; specs.len()];
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut at = 0usize;
    for &i in &order {
        let s = &specs[i];
        offsets[i] = at;
        let end = at + s.byte_len();
        header.insert(
            s.name.clone(),
            json!({ "dtype": s.dtype.name(), "shape": s.shape, "data_offsets": [at, end] }),
        );
        at = end;
    }
    let mut text = serde_json::to_string(&Value::Object(header))
        .map_err(|e| Error::internal(format!("safetensors header: {e}")))?
        .into_bytes();
    while (8 + text.len()) % 8 != 0 {
        text.push(b' ');
    }
    let base = 8 + text.len() as u64;

    let file = File::create(path).map_err(|e| io_err("create", path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let werr = |e| io_err("write", path, e);
    w.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(werr)?;
    w.write_all(&text).map_err(werr)?;

    // Generate in model order (a weight, then its scales), seeking to each
    // tensor's place.
    for &i in members {
        let s = &specs[i];
        if s.kind == Kind::ScaleInv {
            continue; // written with its weight
        }
        w.seek(SeekFrom::Start(base + offsets[i] as u64))
            .map_err(werr)?;
        let scales = write_tensor(&mut w, s, seed).map_err(werr)?;
        if let Some(scales) = scales {
            let j = members
                .iter()
                .copied()
                .find(|&j| {
                    specs[j].kind == Kind::ScaleInv
                        && specs[j].name == format!("{}_scale_inv", s.name)
                })
                .expect("scales travel with their weight");
            debug_assert_eq!(specs[j].weight_shape, s.shape);
            w.seek(SeekFrom::Start(base + offsets[j] as u64))
                .map_err(werr)?;
            let bytes: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_all(&bytes).map_err(werr)?;
        }
    }
    w.seek(SeekFrom::Start(base + at as u64)).map_err(werr)?;
    let file = w.into_inner().map_err(|e| werr(e.into_error()))?;
    file.set_len(base + at as u64).map_err(werr)?;
    Ok(())
}

/// Streams one tensor in bands of 128 rows; returns the block scales for FP8.
fn write_tensor<W: Write>(w: &mut W, s: &Spec, seed: u64) -> std::io::Result<Option<Vec<f32>>> {
    let (rows, cols) = s.rows_cols();
    let col_blocks = cols.div_ceil(FP8_BLOCK);
    let mut scales = Vec::new();
    let mut band = Vec::new();
    let mut bytes = Vec::new();
    for r0 in (0..rows).step_by(FP8_BLOCK) {
        let nr = FP8_BLOCK.min(rows - r0);
        band.resize(nr * cols, 0f32);
        fill_rows(s, seed, r0, &mut band);
        bytes.resize(nr * cols * s.dtype.size(), 0u8);
        match s.dtype {
            StDtype::F32 => encode(&band, &mut bytes, |v| v.to_le_bytes()),
            StDtype::Bf16 => encode(&band, &mut bytes, |v| half::bf16::from_f32(v).to_le_bytes()),
            StDtype::F16 => encode(&band, &mut bytes, |v| half::f16::from_f32(v).to_le_bytes()),
            StDtype::F8E4m3 => {
                let band_scales: Vec<f32> = (0..col_blocks)
                    .into_par_iter()
                    .map(|b| {
                        let (c0, c1) = (b * FP8_BLOCK, ((b + 1) * FP8_BLOCK).min(cols));
                        let amax = band
                            .chunks(cols)
                            .flat_map(|row| row[c0..c1].iter())
                            .fold(0f32, |m, v| m.max(v.abs()));
                        if amax > 0.0 {
                            amax / E4M3_MAX
                        } else {
                            1.0
                        }
                    })
                    .collect();
                bytes
                    .par_chunks_mut(cols)
                    .zip(band.par_chunks(cols))
                    .for_each(|(out, row)| {
                        for (c, (o, &v)) in out.iter_mut().zip(row).enumerate() {
                            *o = f32_to_e4m3(v / band_scales[c / FP8_BLOCK]);
                        }
                    });
                scales.extend_from_slice(&band_scales);
            }
        }
        w.write_all(&bytes)?;
    }
    Ok((s.dtype == StDtype::F8E4m3).then_some(scales))
}

fn encode<const N: usize>(src: &[f32], dst: &mut [u8], f: impl Fn(f32) -> [u8; N] + Sync) {
    dst.par_chunks_mut(N * 1024)
        .zip(src.par_chunks(1024))
        .for_each(|(d, s)| {
            for (o, &v) in d.chunks_exact_mut(N).zip(s) {
                o.copy_from_slice(&f(v));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::fp8::e4m3_to_f32;
    use safetensors::{Dtype, SafeTensors};
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir().join(format!(
                "mlart-gen-{tag}-{}-{}-{nanos}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn read_json(p: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    /// Every tensor of the checkpoint in `dir`: name -> (file, dtype, shape, bytes).
    fn load_all(dir: &Path) -> BTreeMap<String, (String, Dtype, Vec<usize>, Vec<u8>)> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            if !name.ends_with(".safetensors") {
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (t, v) in st.tensors() {
                let old = out.insert(
                    t.clone(),
                    (
                        name.clone(),
                        v.dtype(),
                        v.shape().to_vec(),
                        v.data().to_vec(),
                    ),
                );
                assert!(old.is_none(), "{t} twice");
            }
        }
        out
    }

    fn expected_shapes(layers: usize, fp8: bool) -> BTreeMap<String, Vec<usize>> {
        let a = |i: usize, s: &str| format!("model.layers.{i}.self_attn.{s}");
        let mut m = BTreeMap::new();
        m.insert("model.embed_tokens.weight".to_string(), vec![64, 256]);
        for i in 0..layers {
            let projs: [(String, Vec<usize>); 6] = [
                (a(i, "q_a_proj.weight"), vec![96, 256]),
                (a(i, "q_b_proj.weight"), vec![4 * 48, 96]),
                (a(i, "kv_a_proj_with_mqa.weight"), vec![64 + 16, 256]),
                (a(i, "kv_b_proj.weight"), vec![4 * 64, 64]),
                (a(i, "o_proj.weight"), vec![256, 4 * 32]),
                (
                    format!("model.layers.{i}.mlp.gate_proj.weight"),
                    vec![32, 256],
                ),
            ];
            for (n, s) in projs {
                if fp8 {
                    let sc = vec![s[0].div_ceil(128), s[1].div_ceil(128)];
                    m.insert(format!("{n}_scale_inv"), sc);
                }
                m.insert(n, s);
            }
            m.insert(a(i, "q_a_layernorm.weight"), vec![96]);
            m.insert(a(i, "kv_a_layernorm.weight"), vec![64]);
            m.insert(
                format!("model.layers.{i}.input_layernorm.weight"),
                vec![256],
            );
        }
        m
    }

    #[test]
    fn parse_names() {
        assert_eq!(Preset::parse("tiny"), Some(Preset::Tiny));
        assert_eq!(Preset::parse("v2-lite"), Some(Preset::V2Lite));
        assert_eq!(Preset::parse("V3"), Some(Preset::V3));
        assert_eq!(Preset::parse("small"), Some(Preset::Small));
        assert_eq!(Preset::parse("Small-V3.2"), Some(Preset::SmallV32));
        assert_eq!(Preset::parse("v4"), None);
        assert_eq!(WeightDtype::parse("bf16"), Some(WeightDtype::Bf16));
        assert_eq!(WeightDtype::parse("f16"), Some(WeightDtype::F16));
        assert_eq!(WeightDtype::parse("f32"), Some(WeightDtype::F32));
        assert_eq!(WeightDtype::parse("fp8"), Some(WeightDtype::Fp8));
        assert_eq!(WeightDtype::parse("int4"), None);
    }

    #[test]
    fn tiny_bf16_single_file() {
        let dir = TempDir::new("bf16");
        let opts = GenOptions::default();
        let report = generate_report(&dir.0, &opts).unwrap();
        assert!(dir.0.join("model.safetensors").is_file());
        assert!(!dir.0.join("model.safetensors.index.json").exists());
        assert_eq!(report.files.len(), 2);

        let c = read_json(&dir.0.join("config.json"));
        assert_eq!(c["model_type"], "deepseek_v3");
        assert_eq!(c["hidden_size"], 256);
        assert_eq!(c["num_attention_heads"], 4);
        assert_eq!(c["num_hidden_layers"], 2);
        assert_eq!(c["q_lora_rank"], 96);
        assert_eq!(c["kv_lora_rank"], 64);
        assert_eq!(c["qk_nope_head_dim"], 32);
        assert_eq!(c["qk_rope_head_dim"], 16);
        assert_eq!(c["v_head_dim"], 32);
        assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-6));
        assert_eq!(c["rope_theta"].as_f64(), Some(10000.0));
        assert_eq!(c["max_position_embeddings"], 2048);
        let y = &c["rope_scaling"];
        assert_eq!(y["type"], "yarn");
        assert_eq!(y["factor"].as_f64(), Some(4.0));
        assert_eq!(y["original_max_position_embeddings"], 256);
        assert_eq!(y["beta_fast"].as_f64(), Some(32.0));
        assert_eq!(y["beta_slow"].as_f64(), Some(1.0));
        assert_eq!(y["mscale"].as_f64(), Some(1.0));
        assert_eq!(y["mscale_all_dim"].as_f64(), Some(1.0));
        assert!(c.get("quantization_config").is_none());

        let all = load_all(&dir.0);
        let want = expected_shapes(2, false);
        assert_eq!(
            all.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (n, (_, dt, shape, _)) in &all {
            assert_eq!(*dt, Dtype::BF16, "{n}");
            assert_eq!(shape, &want[n], "{n}");
        }
        assert_eq!(report.tensors, all.len());
        // Stored values are the reference values rounded to bf16.
        for name in [
            "model.layers.1.self_attn.kv_b_proj.weight",
            "model.layers.0.self_attn.kv_a_layernorm.weight",
        ] {
            let r = reference_weight(&opts, name).unwrap();
            let data = &all[name].3;
            assert_eq!(data.len(), r.len() * 2);
            for (b, v) in data.chunks_exact(2).zip(&r) {
                assert_eq!(
                    half::bf16::from_le_bytes([b[0], b[1]]),
                    half::bf16::from_f32(*v)
                );
            }
        }
        // Roughly the right statistics.
        let w = reference_weight(&opts, "model.layers.0.self_attn.q_a_proj.weight").unwrap();
        let var = w.iter().map(|v| (v * v) as f64).sum::<f64>() / w.len() as f64;
        assert!((var * 256.0 - 1.0).abs() < 0.05, "var*in = {}", var * 256.0);
        let g = reference_weight(&opts, "model.layers.0.input_layernorm.weight").unwrap();
        let mean = g.iter().sum::<f32>() / g.len() as f32;
        assert!((mean - 1.0).abs() < 0.03, "norm mean {mean}");
    }

    #[test]
    fn tiny_fp8_two_shards() {
        let dir = TempDir::new("fp8");
        let opts = GenOptions {
            dtype: WeightDtype::Fp8,
            shards: 2,
            ..GenOptions::default()
        };
        generate(&dir.0, &opts).unwrap();
        assert!(!dir.0.join("model.safetensors").exists());
        let c = read_json(&dir.0.join("config.json"));
        let q = &c["quantization_config"];
        assert_eq!(q["quant_method"], "fp8");
        assert_eq!(q["fmt"], "e4m3");
        assert_eq!(q["weight_block_size"], json!([128, 128]));
        assert_eq!(q["activation_scheme"], "dynamic");

        let all = load_all(&dir.0);
        let want = expected_shapes(2, true);
        assert_eq!(
            all.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        let index = read_json(&dir.0.join("model.safetensors.index.json"));
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), all.len());
        let mut total = 0u64;
        let mut files = std::collections::BTreeSet::new();
        for (n, (file, dt, shape, data)) in &all {
            assert_eq!(map[n].as_str(), Some(file.as_str()), "{n}");
            files.insert(file.clone());
            assert_eq!(shape, &want[n], "{n}");
            total += data.len() as u64;
            let expect = if n.ends_with("_scale_inv") {
                Dtype::F32
            } else if n.ends_with("proj.weight") || n.ends_with("proj_with_mqa.weight") {
                Dtype::F8_E4M3
            } else {
                Dtype::BF16
            };
            assert_eq!(*dt, expect, "{n}");
            if n.ends_with("_scale_inv") {
                let w = n.strip_suffix("_scale_inv").unwrap();
                assert_eq!(all[w].0, *file, "{n} not with its weight");
            }
        }
        assert_eq!(
            files.into_iter().collect::<Vec<_>>(),
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));

        // Block maxima survive quantization; every value is within e4m3
        // precision of the original.
        let mut checked = 0;
        for (n, (_, dt, shape, data)) in &all {
            if *dt != Dtype::F8_E4M3 {
                continue;
            }
            let r = reference_weight(&opts, n).unwrap();
            let sc: Vec<f32> = all[&format!("{n}_scale_inv")]
                .3
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let (rows, cols) = (shape[0], shape[1]);
            let cb = cols.div_ceil(128);
            for br in 0..rows.div_ceil(128) {
                for bc in 0..cb {
                    let s = sc[br * cb + bc];
                    let (mut amax, mut dmax) = (0f32, 0f32);
                    for i in br * 128..((br + 1) * 128).min(rows) {
                        for j in bc * 128..((bc + 1) * 128).min(cols) {
                            let w = r[i * cols + j];
                            let d = e4m3_to_f32(data[i * cols + j]) * s;
                            assert!(
                                (d - w).abs() <= w.abs() / 16.0 + s / 512.0,
                                "{n}[{i},{j}]: {w} -> {d}"
                            );
                            amax = amax.max(w.abs());
                            dmax = dmax.max(d.abs());
                        }
                    }
                    assert!((s - amax / 448.0).abs() <= s * 1e-6, "{n} scale");
                    assert!((dmax - amax).abs() <= amax * 1e-6, "{n}: {dmax} vs {amax}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2 * (2 + 2 + 2 + 2 + 2 + 2));
    }

    #[test]
    fn deterministic_in_seed() {
        let bytes = |seed: u64, shards: usize| {
            let dir = TempDir::new("det");
            let opts = GenOptions {
                layers: 1,
                seed,
                shards,
                ..GenOptions::default()
            };
            generate(&dir.0, &opts).unwrap();
            load_all(&dir.0)
                .into_iter()
                .map(|(n, (_, _, _, d))| (n, d))
                .collect::<BTreeMap<_, _>>()
        };
        let file = |seed: u64| {
            let dir = TempDir::new("detf");
            let opts = GenOptions {
                dtype: WeightDtype::Fp8,
                layers: 1,
                seed,
                ..GenOptions::default()
            };
            generate(&dir.0, &opts).unwrap();
            std::fs::read(dir.0.join("model.safetensors")).unwrap()
        };
        assert_eq!(file(7), file(7));
        assert_ne!(file(7), file(8));
        // Values do not depend on the sharding.
        assert_eq!(bytes(3, 1), bytes(3, 3));
        let (a, b) = (bytes(3, 1), bytes(4, 1));
        for (n, d) in &a {
            assert_ne!(d, &b[n], "{n} equal across seeds");
        }
    }

    #[test]
    fn v2_lite_layout_and_no_yarn() {
        let opts = GenOptions {
            preset: Preset::V2Lite,
            yarn: false,
            ..GenOptions::default()
        };
        let c = config_json(&opts);
        assert!(c.get("rope_scaling").is_none());
        assert!(c["q_lora_rank"].is_null());
        assert_eq!(c["model_type"], "deepseek_v2");
        let specs = tensor_specs(&opts);
        let find = |n: &str| specs.iter().find(|s| s.name == n).map(|s| s.shape.clone());
        assert_eq!(
            find("model.layers.0.self_attn.q_proj.weight"),
            Some(vec![16 * 192, 2048])
        );
        assert_eq!(find("model.layers.0.self_attn.q_a_proj.weight"), None);
        assert_eq!(
            find("model.layers.1.self_attn.kv_b_proj.weight"),
            Some(vec![16 * 256, 512])
        );
        let y = config_json(&GenOptions {
            yarn: true,
            ..opts.clone()
        });
        assert_eq!(y["rope_scaling"]["mscale"].as_f64(), Some(0.707));
        assert_eq!(y["rope_scaling"]["factor"].as_f64(), Some(40.0));
    }

    #[test]
    fn shard_assignment_is_contiguous_and_complete() {
        for preset in [Preset::Tiny, Preset::V3] {
            for layers in 1..4 {
                let opts = GenOptions {
                    preset,
                    layers,
                    dtype: WeightDtype::Fp8,
                    ..GenOptions::default()
                };
                let specs = tensor_specs(&opts);
                let units = units_of(&specs);
                for shards in 1..=units.len() {
                    let a = assign_shards(&units, &specs, shards);
                    assert_eq!(a[0], 0);
                    assert_eq!(*a.last().unwrap(), shards - 1);
                    assert!(a.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1));
                }
            }
        }
        let dir = TempDir::new("bad");
        let bad = |o: GenOptions| generate(&dir.0, &o).unwrap_err().status;
        let o = GenOptions::default();
        assert_eq!(
            bad(GenOptions {
                shards: 0,
                ..o.clone()
            }),
            Status::InvalidArgument
        );
        assert_eq!(
            bad(GenOptions {
                shards: 1000,
                ..o.clone()
            }),
            Status::InvalidArgument
        );
        assert_eq!(bad(GenOptions { layers: 0, ..o }), Status::InvalidArgument);
    }
}
