//! `mlart gen-model`: a random-weight DeepSeek checkpoint (config.json and
//! safetensors in the Hugging Face layout) for testing loaders.

use mlart::model::gen::{generate_report, GenOptions, Preset, WeightDtype};
use std::path::PathBuf;

pub struct Options {
    pub gen: GenOptions,
    pub dir: PathBuf,
}

pub fn parse(args: &[String]) -> Result<Options, String> {
    let mut gen = GenOptions {
        preset: Preset::Tiny,
        dtype: WeightDtype::Bf16,
        layers: 2,
        seed: 0,
        shards: 1,
        yarn: true,
    };
    let mut preset = None;
    let mut dir = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--preset" => {
                let v = value("--preset")?;
                preset = Some(Preset::parse(&v).ok_or(format!(
                    "--preset {v}: expected tiny, v2-lite, v3, tiny-v3.2, v3.2, small or small-v3.2"
                ))?);
            }
            "--dtype" => {
                let v = value("--dtype")?;
                gen.dtype = WeightDtype::parse(&v)
                    .ok_or(format!("--dtype {v}: expected bf16, f16, f32 or fp8"))?;
            }
            "--layers" => {
                let v = value("--layers")?;
                gen.layers = match v.parse() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(format!("--layers {v}: expected a positive number")),
                };
            }
            "--seed" => {
                let v = value("--seed")?;
                gen.seed = v.parse().map_err(|_| format!("--seed {v}: not a number"))?;
            }
            "--shards" => {
                let v = value("--shards")?;
                gen.shards = match v.parse() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(format!("--shards {v}: expected a positive number")),
                };
            }
            "--no-yarn" => gen.yarn = false,
            other if other.starts_with('-') && other.len() > 1 => {
                return Err(format!("unknown gen-model option {other}"))
            }
            other => {
                if dir.replace(PathBuf::from(other)).is_some() {
                    return Err(format!(
                        "gen-model: one output directory only (extra: {other})"
                    ));
                }
            }
        }
    }
    gen.preset =
        preset.ok_or("gen-model needs --preset tiny|v2-lite|v3|tiny-v3.2|v3.2|small|small-v3.2")?;
    let dir = dir.ok_or("gen-model needs an output directory")?;
    Ok(Options { gen, dir })
}

pub fn run(o: &Options) -> mlart::Result<()> {
    let g = &o.gen;
    let report = generate_report(&o.dir, g)?;
    println!(
        "{} checkpoint: preset {}, {} layer(s), dtype {}, seed {}, rope_scaling {}",
        g.preset.dims().model_type,
        g.preset.name(),
        g.layers,
        g.dtype.name(),
        g.seed,
        if g.yarn { "yarn" } else { "none" }
    );
    for f in &report.files {
        if f.tensors > 0 {
            println!(
                "  {}  {} tensors, {} bytes",
                f.path.display(),
                f.tensors,
                f.bytes
            );
        } else {
            println!("  {}  {} bytes", f.path.display(), f.bytes);
        }
    }
    println!(
        "{} tensors, {} bytes of tensor data, {} attention parameters",
        report.tensors, report.tensor_bytes, report.attention_params
    );
    Ok(())
}
