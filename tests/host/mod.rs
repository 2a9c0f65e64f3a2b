//! Helpers for the tests that drive host-language programs against the
//! library this test run built (`ctest.rs`: C and C++ through CMake;
//! `bindings.rs`: the Go, Node and Python bindings): running tools, finding
//! `libmlart.so` / `libmlart.a`, and a tiny checkpoint to load.

#![allow(dead_code)]

use mlart::model::gen::{generate, GenOptions, Preset, WeightDtype};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `cmd`, returning its output, or panics naming `what` and what the
/// test `needs` if it cannot start.
pub fn run(what: &str, cmd: &mut Command, needs: &str) -> Output {
    println!("$ {cmd:?}");
    match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!(
            "{what}: could not run {:?}: {e}\n{needs}",
            cmd.get_program()
        ),
    }
}

/// Panics with the step's output unless it succeeded; prints it otherwise.
pub fn expect_success(what: &str, out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    println!("{text}");
    text
}

pub fn tool(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The `target/<profile>/deps` directory that holds this test executable.
fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .expect("test executable has a parent directory")
        .to_path_buf()
}

fn has_libraries(dir: &Path) -> bool {
    dir.join("libmlart.so").is_file() && dir.join("libmlart.a").is_file()
}

/// The directory holding `libmlart.so` and `libmlart.a`.
///
/// `cargo test` compiles the library once with every crate type of `[lib]`
/// (rlib, cdylib, staticlib) into `target/<profile>/deps`, but copies only
/// the outputs of a `cargo build` up into `target/<profile>`: `deps` holds the
/// libraries of this very test run, `target/<profile>` possibly older ones.
/// Should neither hold them, build them with `cargo build --lib` into a
/// separate target directory (the running `cargo test` may hold the lock on
/// its own).
pub fn library_dir() -> PathBuf {
    let deps = deps_dir();
    let profile = deps.parent().expect("deps has a parent").to_path_buf();
    for dir in [&deps, &profile] {
        if has_libraries(dir) {
            return dir.clone();
        }
    }
    println!(
        "neither {} nor {} holds libmlart.so and libmlart.a; building them with cargo build --lib",
        deps.display(),
        profile.display()
    );
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("host-lib");
    let release = profile.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--lib", "--target-dir"])
        .arg(&target);
    if release {
        cmd.arg("--release");
    }
    expect_success(
        "cargo build --lib",
        &run("cargo build --lib", &mut cmd, "cargo builds the library"),
    );
    let built = target.join(if release { "release" } else { "debug" });
    assert!(
        has_libraries(&built),
        "cargo build --lib did not produce libmlart.so and libmlart.a in {}",
        built.display()
    );
    built
}

/// Writes a random-weight checkpoint of `preset` (`layers` layers, bf16
/// weights, seed 1) into `dir`.
fn bf16_checkpoint(dir: &Path, preset: Preset, layers: usize) {
    let gen = GenOptions {
        preset,
        dtype: WeightDtype::Bf16,
        layers,
        seed: 1,
        shards: 1,
        yarn: true,
    };
    if let Err(e) = generate(dir, &gen) {
        panic!(
            "generate the {preset:?} test checkpoint in {}: {e:?}",
            dir.display()
        );
    }
}

/// Writes a tiny random-weight checkpoint (2 layers, bf16) into `dir`.
pub fn tiny_checkpoint(dir: &Path) {
    bf16_checkpoint(dir, Preset::Tiny, 2);
}

/// Writes a tiny random-weight DeepSeek-V3.2 checkpoint (`tiny-v3.2`: the
/// tiny shape plus a sparse-attention indexer of 4 heads of 32, top-8;
/// 1 layer, bf16) into `dir`, for the bindings' indexer tests.
pub fn tiny_v32_checkpoint(dir: &Path) {
    bf16_checkpoint(dir, Preset::TinyV32, 1);
}

/// Writes a `small` checkpoint (DeepSeek's cache rows, d_qk 576 and d_v
/// 512: the smallest model a CUDA engine runs; 1 layer, bf16) into `dir`.
pub fn small_checkpoint(dir: &Path) {
    bf16_checkpoint(dir, Preset::Small, 1);
}
