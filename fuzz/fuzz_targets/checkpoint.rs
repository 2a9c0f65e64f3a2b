//! A checkpoint directory made of the input: `config.json` and one
//! `model.safetensors`. Loading it must give a model or a named error,
//! never a panic (libFuzzer aborts on any panic, even one the C boundary
//! would catch), and a model that loads must run a forward.
//!
//! Input: `[flags u8][config length u16 LE][config][safetensors]`.
//! `flags` bit 0 loads only layer 0; bits 1-2 choose the weight compute
//! dtype (as stored, f32, bf16, f16); bit 3 asks for bf16 activations.
//! With bit 4 the checkpoint is sharded: `[index length u16 LE][index]`
//! follows the config, the index is written as
//! `model.safetensors.index.json` and the tensors as `model-1.safetensors`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mlart::format::{Dtype, KvFormat};
use mlart::kv::{KvPool, PoolOptions};
use mlart::model::{Activations, LoadOptions, Model, WeightCompute};
use std::path::PathBuf;
use std::sync::OnceLock;

mod common;
use common::cpu_engine as engine;

/// One directory per process, rewritten for each input (in memory where
/// the system has /dev/shm).
fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let base = std::path::Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("mlart-fuzz-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("a scratch directory");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let flags = data[0];
    let n = u16::from_le_bytes([data[1], data[2]]) as usize;
    let rest = &data[3..];
    let (config, mut tensors) = rest.split_at(n.min(rest.len()));
    let d = dir();
    std::fs::write(d.join("config.json"), config).expect("write config.json");
    let index = d.join("model.safetensors.index.json");
    let _ = std::fs::remove_file(&index);
    let _ = std::fs::remove_file(d.join("model.safetensors"));
    let _ = std::fs::remove_file(d.join("model-1.safetensors"));
    if flags & 16 != 0 && tensors.len() >= 2 {
        let n = u16::from_le_bytes([tensors[0], tensors[1]]) as usize;
        let (ix, rest) = tensors[2..].split_at(n.min(tensors.len() - 2));
        std::fs::write(&index, ix).expect("write the index");
        std::fs::write(d.join("model-1.safetensors"), rest).expect("write a shard");
        tensors = &[];
    }
    if !tensors.is_empty() || flags & 16 == 0 {
        std::fs::write(d.join("model.safetensors"), tensors).expect("write model.safetensors");
    }

    let compute = match (flags >> 1) & 3 {
        0 => WeightCompute::AsStored,
        1 => WeightCompute::Convert(Dtype::F32),
        2 => WeightCompute::Convert(Dtype::Bf16),
        _ => WeightCompute::Convert(Dtype::F16),
    };
    let opts = LoadOptions {
        num_layers: (flags & 1) as usize,
        compute,
        activations: if flags & 8 != 0 {
            Activations::Bf16
        } else {
            Activations::Precise
        },
        ..Default::default()
    };
    let model = match Model::load(engine(), d, opts) {
        Ok(m) => m,
        Err(e) => {
            if std::env::var_os("MLART_FUZZ_VERBOSE").is_some() {
                eprintln!("load: {e:?}");
            }
            return;
        }
    };
    // A loaded model runs: two tokens of one sequence through layer 0.
    let c = &model.config;
    let pool = KvPool::new(
        engine(),
        PoolOptions {
            format: KvFormat::Bf16,
            d_qk: c.d_qk(),
            num_layers: 1,
            block_size: 2,
            num_blocks: 4,
            index_dim: c.indexer.map_or(0, |ix| ix.head_dim),
        },
    )
    .expect("a pool that matches the model");
    pool.create_seq(7).expect("a sequence");
    let x: Vec<f32> = (0..2 * c.hidden_size)
        .map(|i| ((i % 7) as f32 - 3.0) * 0.25)
        .collect();
    let y = model
        .forward(&pool, 0, &[7], &[2], &x)
        .expect("a loaded model's forward");
    assert_eq!(y.len(), x.len());
});
