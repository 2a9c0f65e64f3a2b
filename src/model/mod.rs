//! The MLA layer: a DeepSeek checkpoint's attention weights, absorbed for
//! decode, and the layer forward (projections, norms, RoPE, cache append,
//! attention through the pool, output projection).

pub mod absorb;
mod columns;
pub mod config;
pub mod device;
pub mod f32_gemm;
pub mod f32_proj;
pub mod forward;
pub mod fp8_bf16;
pub mod gemm;
pub mod gen;
pub mod indexer;
pub mod level;
pub mod linear;
pub mod prefill;
pub mod resident;
pub mod rope;
pub mod scratch;
pub mod vecops;
pub mod weights;

pub use config::ModelConfig;
pub use linear::{Activations, Linear, WeightCompute};

use crate::engine::Engine;
use crate::error::{Error, Result, Status};
use std::path::Path;
use std::sync::Arc;
use weights::Checkpoint;

/// Receives (fraction done, stage); returning false cancels the load.
pub type Progress<'a> = &'a mut dyn FnMut(f32, &str) -> bool;

/// Load options.
pub struct LoadOptions<'a> {
    /// First layer to load.
    pub first_layer: usize,
    /// Layers to load; 0 = all from `first_layer` on.
    pub num_layers: usize,
    pub compute: WeightCompute,
    /// How the projections (q_a, q_b or q_proj, kv_a, o_proj) take their
    /// activations.
    pub activations: Activations,
    /// Called with (fraction done, stage); returning false cancels the load.
    pub progress: Option<Progress<'a>>,
    /// On a CUDA engine, whether the projections run on the GPU; `None`:
    /// `MLART_CUDA_PROJECTIONS` or the default (see [`device`]).
    pub gpu_projections: Option<bool>,
    /// [`Model::kept_keys_bytes`].
    pub kept_keys_bytes: usize,
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        LoadOptions {
            first_layer: 0,
            num_layers: 0,
            compute: WeightCompute::AsStored,
            activations: Activations::Precise,
            progress: None,
            gpu_projections: None,
            kept_keys_bytes: prefill::KEPT_KEYS_BYTES,
        }
    }
}

/// The query projection: low-rank with a norm (V2/V3), or direct (V2-Lite).
pub enum QProj {
    Lora {
        a: Linear,
        norm: Vec<f32>,
        b: Linear,
    },
    Direct(Linear),
}

/// One layer's attention weights after absorption.
pub struct LayerWeights {
    pub q: QProj,
    /// `[kv_lora + rope, hidden]`.
    pub kv_a: Linear,
    /// `[kv_lora]`.
    pub kv_norm: Vec<f32>,
    /// `kv_b_proj` in stored precision, read as `W_UK [H, nope, kv_lora]`
    /// (`q_lat[h] = q_nope[h] · W_UK[h]`) and `W_UV [H, v, kv_lora]`
    /// (`o[h] = W_UV[h] · o_lat[h]`).
    pub absorbed: absorb::Absorbed,
    /// `[hidden, H * v]`.
    pub o_proj: Linear,
    /// DeepSeek-V3.2's sparse-attention indexer; `None` for V2/V3.
    pub indexer: Option<indexer::Indexer>,
}

/// A loaded model: configuration and a contiguous range of layers.
pub struct Model {
    pub(crate) engine: Arc<Engine>,
    pub config: ModelConfig,
    pub first_layer: usize,
    pub layers: Vec<LayerWeights>,
    pub rope: rope::Rope,
    pub bytes_loaded: usize,
    /// Dtype of the projection weights in memory.
    pub weight_dtype: crate::format::Dtype,
    /// How the projections take their activations.
    pub activations: Activations,
    /// The vector code of the projections (from the engine's CPU kernel).
    pub level: level::Level,
    /// The most bytes of up-projected keys (K and V of every head) one
    /// forward keeps between the passes of a long prompt, for the sequence
    /// it is on ([`prefill::KEPT_KEYS_BYTES`] by default). Positions past
    /// them are up-projected again in every pass; 0 keeps none.
    pub kept_keys_bytes: usize,
    /// Per-call temporaries, reused across forwards.
    pub(crate) scratch: scratch::Scratch,
    /// Each layer's projection weights on the GPU (CUDA engines that run
    /// the projections there), else empty.
    pub(crate) device: Vec<device::DeviceLayer>,
    /// Where the projections run, and why.
    pub projections: String,
    /// Device memory of the layer forwards kept on the GPU (`resident`).
    pub(crate) arena: parking_lot::Mutex<crate::backend::cuda::resident::Arena>,
    /// Positions the expanded prefill has up-projected (once for all
    /// heads): the kept keys' test counts them.
    #[cfg(test)]
    pub(crate) up_projected: std::sync::atomic::AtomicUsize,
}

impl Drop for Model {
    fn drop(&mut self) {
        if let Some(cuda) = self.engine.backend().cuda() {
            // A device-memory forward on a caller stream may still be
            // reading the weights.
            let _ = cuda.sync();
            for l in &self.device {
                l.free(cuda);
            }
            cuda.free_arena(self.arena.get_mut());
        }
    }
}

fn tensor_names(c: &ModelConfig, i: usize) -> Vec<String> {
    let p = format!("model.layers.{i}.self_attn.");
    let mut v = Vec::new();
    if c.q_lora_rank.is_some() {
        v.extend(
            ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"]
                .map(|s| format!("{p}{s}")),
        );
    } else {
        v.push(format!("{p}q_proj.weight"));
    }
    v.extend(
        [
            "kv_a_proj_with_mqa.weight",
            "kv_a_layernorm.weight",
            "kv_b_proj.weight",
            "o_proj.weight",
        ]
        .map(|s| format!("{p}{s}")),
    );
    if c.indexer.is_some() {
        v.extend(
            [
                "indexer.wq_b.weight",
                "indexer.wk.weight",
                "indexer.k_norm.weight",
                "indexer.k_norm.bias",
                "indexer.weights_proj.weight",
            ]
            .map(|s| format!("{p}{s}")),
        );
    }
    v
}

struct Loader<'c, 'p> {
    ckpt: &'c Checkpoint,
    compute: WeightCompute,
    activations: Activations,
    level: level::Level,
    progress: Option<Progress<'p>>,
    done: usize,
    total: usize,
    bytes: usize,
}

impl Loader<'_, '_> {
    fn step(&mut self, name: &str) -> Result<()> {
        self.done += 1;
        if let Some(p) = self.progress.as_mut() {
            if !p(self.done as f32 / self.total as f32, name) {
                return Err(Error::new(
                    Status::Cancelled,
                    format!("model load cancelled by the progress callback at {name}"),
                ));
            }
        }
        Ok(())
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        let w = self.ckpt.tensor(name)?;
        let scale_name = format!("{name}_scale_inv");
        let scale = if w.dtype == weights::StoredDtype::Fp8E4m3 && self.ckpt.contains(&scale_name) {
            Some(self.ckpt.tensor(&scale_name)?)
        } else {
            None
        };
        let lin = Linear::new(w, scale, out, inp, self.compute)?
            .with_activations(self.activations)
            .with_level(self.level);
        self.bytes += lin.bytes();
        self.step(name)?;
        Ok(lin)
    }

    fn vector(&mut self, name: &str, n: usize) -> Result<Vec<f32>> {
        let t = self.ckpt.tensor(name)?;
        t.expect_shape(&[n])?;
        if t.dtype == weights::StoredDtype::Fp8E4m3 {
            return Err(Error::new(
                Status::Unsupported,
                format!("{name}: FP8 norm weights are not supported"),
            ));
        }
        self.bytes += n * 4;
        self.step(name)?;
        Ok(t.to_f32())
    }
}

impl Model {
    /// Loads `config.json` and the attention tensors of the requested layers.
    pub fn load(engine: Arc<Engine>, dir: &Path, opts: LoadOptions<'_>) -> Result<Model> {
        let cfg_path = dir.join("config.json");
        let bytes = std::fs::read(&cfg_path)
            .map_err(|e| Error::new(Status::Io, format!("{}: {e}", cfg_path.display())))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::new(
                Status::Format,
                format!("{}: not UTF-8 JSON ({e})", cfg_path.display()),
            )
        })?;
        let c = ModelConfig::parse(&text, &cfg_path.display().to_string())?;
        if opts.first_layer >= c.num_layers {
            return Err(Error::invalid(format!(
                "first_layer = {} is outside [0, {}) (num_hidden_layers)",
                opts.first_layer, c.num_layers
            )));
        }
        let count = if opts.num_layers == 0 {
            c.num_layers - opts.first_layer
        } else {
            opts.num_layers
        };
        if opts.first_layer + count > c.num_layers {
            return Err(Error::invalid(format!(
                "num_layers = {count} from first_layer {} runs past num_hidden_layers = {}",
                opts.first_layer, c.num_layers
            )));
        }
        let ckpt = Checkpoint::open(dir)?;
        let range = opts.first_layer..opts.first_layer + count;
        // Check every tensor exists before reading any, to fail fast.
        for i in range.clone() {
            for n in tensor_names(&c, i) {
                if !ckpt.contains(&n) {
                    return Err(Error::not_found(format!(
                        "tensor {n} not found in checkpoint {}",
                        dir.display()
                    )));
                }
            }
        }
        let total = range.clone().map(|i| tensor_names(&c, i).len()).sum();
        let mut ld = Loader {
            ckpt: &ckpt,
            compute: opts.compute,
            activations: opts.activations,
            level: level::Level::for_engine(engine.info()),
            progress: opts.progress,
            done: 0,
            total,
            bytes: 0,
        };
        let (h, hid, lora) = (c.num_heads, c.hidden_size, c.kv_lora_rank);
        let (nope, rope_d, v) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim);
        let mut layers = Vec::with_capacity(count);
        let mut weight_dtype = crate::format::Dtype::F32;
        for i in range {
            let p = format!("model.layers.{i}.self_attn.");
            let q = match c.q_lora_rank {
                Some(r) => QProj::Lora {
                    a: ld.linear(&format!("{p}q_a_proj.weight"), r, hid)?,
                    norm: ld.vector(&format!("{p}q_a_layernorm.weight"), r)?,
                    b: ld.linear(&format!("{p}q_b_proj.weight"), h * c.qk_head_dim(), r)?,
                },
                None => QProj::Direct(ld.linear(
                    &format!("{p}q_proj.weight"),
                    h * c.qk_head_dim(),
                    hid,
                )?),
            };
            let kv_a = ld.linear(&format!("{p}kv_a_proj_with_mqa.weight"), lora + rope_d, hid)?;
            weight_dtype = kv_a.dtype();
            let kv_norm = ld.vector(&format!("{p}kv_a_layernorm.weight"), lora)?;
            // Absorption: kv_b_proj [H * (nope + v), lora] viewed per head.
            // The absorbed products keep their activations precise.
            let kv_b = ld
                .linear(&format!("{p}kv_b_proj.weight"), h * (nope + v), lora)?
                .with_activations(Activations::Precise);
            let absorbed = absorb::Absorbed::new(kv_b, h, nope, v);
            let o_proj = ld.linear(&format!("{p}o_proj.weight"), hid, h * v)?;
            let indexer = match (&c.indexer, c.q_lora_rank) {
                (Some(ic), Some(r)) => {
                    let x = format!("{p}indexer.");
                    let (ih, id) = (ic.heads, ic.head_dim);
                    Some(indexer::Indexer {
                        cfg: *ic,
                        wq_b: ld.linear(&format!("{x}wq_b.weight"), ih * id, r)?,
                        wk: ld.linear(&format!("{x}wk.weight"), id, hid)?,
                        k_norm_weight: ld.vector(&format!("{x}k_norm.weight"), id)?,
                        k_norm_bias: ld.vector(&format!("{x}k_norm.bias"), id)?,
                        weights_proj: ld.linear(&format!("{x}weights_proj.weight"), ih, hid)?,
                    })
                }
                _ => None,
            };
            layers.push(LayerWeights {
                q,
                kv_a,
                kv_norm,
                absorbed,
                o_proj,
                indexer,
            });
        }
        let (device, projections) = match engine.backend().cuda() {
            None => {
                let amx = ld.level == level::Level::Avx512Bf16 && gemm::on_amx();
                let tiles = if amx { ", GEMM on AMX tiles" } else { "" };
                (Vec::new(), format!("CPU ({}{tiles})", ld.level.name()))
            }
            Some(_)
                if !opts
                    .gpu_projections
                    .unwrap_or_else(device::gpu_projections_requested) =>
            {
                (
                    Vec::new(),
                    "CPU (GPU projections are opt-in until verified: MLART_CUDA_PROJECTIONS=1)"
                        .to_string(),
                )
            }
            Some(cuda) => match device::upload(cuda, &layers, device::HeadDims::of(&c)) {
                Ok(d) => {
                    let bytes: usize = d.iter().map(|l| l.bytes()).sum();
                    let steps = if c.indexer.is_none() || d.iter().all(|l| l.indexer.is_some()) {
                        "the whole layer stays on the GPU over a GPU pool"
                    } else {
                        "the layer stays on the GPU over a GPU pool, but for the V3.2 indexer's projections, on the CPU (its weights are a dtype the kernels do not take)"
                    };
                    (
                        d,
                        format!("GPU ({bytes} bytes of weights in device memory; {steps})"),
                    )
                }
                Err(e) if device::is_unsupported(&e) => {
                    (Vec::new(), format!("CPU (not on the GPU: {})", e.message))
                }
                Err(e) => return Err(e.with_context("uploading the projections to the GPU")),
            },
        };
        Ok(Model {
            engine,
            device,
            projections,
            rope: rope::Rope::new(&c),
            bytes_loaded: ld.bytes,
            config: c,
            first_layer: opts.first_layer,
            activations: opts.activations,
            level: ld.level,
            kept_keys_bytes: opts.kept_keys_bytes,
            scratch: scratch::Scratch::default(),
            arena: Default::default(),
            #[cfg(test)]
            up_projected: Default::default(),
            layers,
            weight_dtype,
        })
    }

    /// Whether the projections run on the GPU (see [`device`]).
    pub fn projections_on_gpu(&self) -> bool {
        !self.device.is_empty()
    }

    /// The loaded layer `layer` (absolute index), or a named error.
    pub fn layer(&self, layer: i64) -> Result<&LayerWeights> {
        let (a, b) = (
            self.first_layer as i64,
            (self.first_layer + self.layers.len()) as i64,
        );
        crate::error::check_range("layer", layer, a, b)
            .map_err(|e| Error::invalid(format!("{} (the loaded layers)", e.message)))?;
        Ok(&self.layers[(layer - a) as usize])
    }
}
