//! `config.json` of a DeepSeek V2/V3/V3.2 checkpoint: the attention fields.

use crate::error::{Error, Result, Status};
use serde::Deserialize;

/// YaRN rope scaling (`rope_scaling` with `type: "yarn"`).
#[derive(Clone, Copy, Debug, PartialEq, Deserialize, serde::Serialize)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    #[serde(default = "default_beta_fast")]
    pub beta_fast: f64,
    #[serde(default = "default_beta_slow")]
    pub beta_slow: f64,
    #[serde(default = "one")]
    pub mscale: f64,
    #[serde(default)]
    pub mscale_all_dim: f64,
}

fn default_beta_fast() -> f64 {
    32.0
}
fn default_beta_slow() -> f64 {
    1.0
}
fn one() -> f64 {
    1.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}

#[derive(Deserialize)]
struct RawRopeScaling {
    #[serde(rename = "type", alias = "rope_type")]
    kind: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Value,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<RawRopeScaling>,
    max_position_embeddings: Option<usize>,
    index_n_heads: Option<usize>,
    index_head_dim: Option<usize>,
    index_topk: Option<usize>,
    quantization_config: Option<serde_json::Value>,
}

/// DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention): per query
/// token it scores every earlier token and the attention keeps the `topk`
/// best (`inference/model.py`, class `Indexer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexerConfig {
    /// `index_n_heads` (64 in V3.2).
    pub heads: usize,
    /// `index_head_dim` (128): a power of two, at least `qk_rope_head_dim`.
    pub head_dim: usize,
    /// `index_topk` (2048): tokens each query attends to.
    pub topk: usize,
    /// The FP8 scales of the indexer's queries and keys are rounded up to a
    /// power of two (`quantization_config.scale_fmt = "ue8m0"`), as
    /// DeepSeek's reference does with that setting.
    pub pow2_scales: bool,
}

/// The attention-relevant part of a DeepSeek config.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    /// `None` for V2-Lite (`q_proj` instead of `q_a_proj`/`q_b_proj`).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub yarn: Option<Yarn>,
    pub max_position_embeddings: usize,
    /// The sparse-attention indexer of `deepseek_v32`; `None` otherwise.
    pub indexer: Option<IndexerConfig>,
}

/// Model types this loader understands.
pub const MODEL_TYPES: [&str; 3] = ["deepseek_v2", "deepseek_v3", "deepseek_v32"];

/// Largest `index_head_dim`: DeepSeek quantizes the indexer's queries and
/// keys with one FP8 scale per 128 values, so up to 128 one scale covers a key.
pub const MAX_INDEX_HEAD_DIM: usize = 128;

/// Largest dimension, and largest projection row count, of a config: the C
/// API reports them as `int32_t`.
const DIM_LIMIT: usize = i32::MAX as usize;

impl ModelConfig {
    /// Parses and validates `config.json` text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| Error::new(Status::Format, format!("{path}: {e}")))?;
        let model_type = raw.model_type.unwrap_or_default();
        if !MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(Error::new(
                Status::Unsupported,
                format!("{path}: model_type = \"{model_type}\" is not one of {MODEL_TYPES:?}"),
            ));
        }
        let yarn = match raw.rope_scaling {
            None => None,
            Some(r) => match r.kind.as_deref() {
                Some("yarn") => Some(serde_json::from_value::<Yarn>(r.rest).map_err(|e| {
                    Error::new(Status::Format, format!("{path}: rope_scaling: {e}"))
                })?),
                other => {
                    return Err(Error::new(
                        Status::Unsupported,
                        format!(
                            "{path}: rope_scaling.type = {other:?}: only \"yarn\" is supported"
                        ),
                    ))
                }
            },
        };
        let indexer = if model_type == "deepseek_v32" {
            let need = |name: &str, v: Option<usize>| {
                v.ok_or_else(|| {
                    Error::new(
                        Status::Format,
                        format!("{path}: model_type \"deepseek_v32\" needs {name} (its sparse-attention indexer)"),
                    )
                })
            };
            let pow2_scales = raw
                .quantization_config
                .as_ref()
                .and_then(|q| q.get("scale_fmt"))
                .and_then(|f| f.as_str())
                == Some("ue8m0");
            Some(IndexerConfig {
                heads: need("index_n_heads", raw.index_n_heads)?,
                head_dim: need("index_head_dim", raw.index_head_dim)?,
                topk: need("index_topk", raw.index_topk)?,
                pow2_scales,
            })
        } else {
            None
        };
        let c = ModelConfig {
            indexer,
            model_type,
            hidden_size: raw.hidden_size,
            num_heads: raw.num_attention_heads,
            num_layers: raw.num_hidden_layers,
            q_lora_rank: raw.q_lora_rank,
            kv_lora_rank: raw.kv_lora_rank,
            qk_nope_head_dim: raw.qk_nope_head_dim,
            qk_rope_head_dim: raw.qk_rope_head_dim,
            v_head_dim: raw.v_head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            yarn,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(0),
        };
        c.validate(path)?;
        Ok(c)
    }

    /// Checks every dimension is positive and that the sizes derived from
    /// them fit the C API's `int32_t` (no arithmetic on them can overflow).
    fn validate(&self, path: &str) -> Result<()> {
        let bad = |what: String| Err(Error::new(Status::Format, format!("{path}: {what}")));
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_heads),
            ("num_hidden_layers", self.num_layers),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
        ] {
            if v == 0 {
                return bad(format!("{name} = 0 must be >= 1"));
            }
            if v > DIM_LIMIT {
                return bad(format!("{name} = {v} exceeds {DIM_LIMIT}"));
            }
        }
        match self.q_lora_rank {
            Some(0) => return bad("q_lora_rank = 0 must be >= 1 or null".into()),
            Some(r) if r > DIM_LIMIT => {
                return bad(format!("q_lora_rank = {r} exceeds {DIM_LIMIT}"))
            }
            _ => {}
        }
        // The projections' row counts (each dimension is at most 2^31 - 1,
        // so the sums cannot overflow; the products are checked).
        let h = self.num_heads;
        for (what, width) in [
            (
                "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim)",
                self.qk_head_dim(),
            ),
            (
                "num_attention_heads * (qk_nope_head_dim + v_head_dim)",
                self.qk_nope_head_dim + self.v_head_dim,
            ),
        ] {
            match h.checked_mul(width) {
                Some(n) if n <= DIM_LIMIT => {}
                _ => return bad(format!("{what} = {h} * {width} exceeds {DIM_LIMIT}")),
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return bad(format!(
                "qk_rope_head_dim = {} must be even",
                self.qk_rope_head_dim
            ));
        }
        if self.d_qk() > crate::decode::desc::MAX_HEAD_DIM {
            return bad(format!(
                "kv_lora_rank + qk_rope_head_dim = {} exceeds the supported 1024",
                self.d_qk()
            ));
        }
        if let Some(ix) = &self.indexer {
            if self.q_lora_rank.is_none() {
                return bad(
                    "deepseek_v32 needs q_lora_rank: its indexer reads the q_a_layernorm output"
                        .into(),
                );
            }
            if ix.heads == 0 || ix.heads > 1024 {
                return bad(format!("index_n_heads = {} must be in [1, 1024]", ix.heads));
            }
            if !ix.head_dim.is_power_of_two()
                || ix.head_dim < self.qk_rope_head_dim
                || ix.head_dim > MAX_INDEX_HEAD_DIM
            {
                return bad(format!(
                    "index_head_dim = {} must be a power of two in [qk_rope_head_dim = {}, {MAX_INDEX_HEAD_DIM}] (the Hadamard rotation)",
                    ix.head_dim, self.qk_rope_head_dim
                ));
            }
            if ix.topk == 0 || ix.topk > DIM_LIMIT {
                return bad(format!(
                    "index_topk = {} must be in [1, {DIM_LIMIT}]",
                    ix.topk
                ));
            }
        }
        if self.rms_norm_eps.is_nan()
            || self.rms_norm_eps < 0.0
            || self.rope_theta.is_nan()
            || self.rope_theta <= 0.0
        {
            return bad("rms_norm_eps must be >= 0 and rope_theta > 0".into());
        }
        if let Some(y) = &self.yarn {
            if y.factor.is_nan() || y.factor < 1.0 || y.original_max_position_embeddings == 0 {
                return bad(format!(
                    "rope_scaling: factor = {} must be >= 1 and original_max_position_embeddings >= 1",
                    y.factor
                ));
            }
        }
        Ok(())
    }

    /// Query/key head dimension of the raw model (`nope + rope`).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Cache row width after absorption (`kv_lora_rank + qk_rope_head_dim`).
    pub fn d_qk(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// `qk_head_dim^-0.5`, times `m^2` with YaRN (DeepSeek's softmax scale).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.yarn {
            Some(y) if y.factor > 1.0 => {
                let m = 0.1 * y.mscale_all_dim * y.factor.ln() + 1.0;
                base * m * m
            }
            _ => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: &str = r#"{"model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128,
        "num_hidden_layers": 61, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "max_position_embeddings": 163840, "rope_scaling": {"type": "yarn", "factor": 40,
        "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}}"#;

    #[test]
    fn parses_deepseek_v3() {
        let c = ModelConfig::parse(V3, "config.json").unwrap();
        assert_eq!(
            (c.d_qk(), c.qk_head_dim(), c.q_lora_rank),
            (576, 192, Some(1536))
        );
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((c.softmax_scale() - m * m / 192f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn rejects_bad_configs_by_name() {
        let e = ModelConfig::parse("{", "cfg").unwrap_err();
        assert_eq!(e.status, Status::Format);
        let e = ModelConfig::parse(&V3.replace("deepseek_v3", "llama"), "cfg").unwrap_err();
        assert!(
            e.message.contains("model_type = \"llama\""),
            "{}",
            e.message
        );
        let e = ModelConfig::parse(
            &V3.replace("\"kv_lora_rank\": 512", "\"kv_lora_rank\": 0"),
            "cfg",
        )
        .unwrap_err();
        assert!(e.message.contains("kv_lora_rank = 0"), "{}", e.message);
        let e = ModelConfig::parse(&V3.replace("\"hidden_size\": 7168,", ""), "cfg").unwrap_err();
        assert!(e.message.contains("hidden_size"), "{}", e.message);
    }
}
