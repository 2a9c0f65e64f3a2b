//! Build script: gives the shared library its SONAME (`libmlart.so.<ABI>`,
//! the ABI version being the crate's major version) so hosts linked against
//! one ABI never load another, and builds the CUDA kernels (kernels/) into
//! one fatbin that `backend::cuda::fatbin` embeds.
//!
//! Kernels: nvcc is looked for in `MLART_NVCC` (path to nvcc), then
//! `CUDA_HOME`/`CUDA_PATH` `/bin`, then the project's own toolchain
//! (`.cuda/bin`, installed by `scripts/cuda-toolchain.sh`), then `PATH`.
//! Found: kernels/CMakeLists.txt is built, a failure fails the build, and the
//! crate gets `cfg(mlart_cuda_kernels)` plus `MLART_FATBIN`/`MLART_PTXAS_LOG`
//! (absolute paths). Not found, or `MLART_NO_CUDA_KERNELS=1`: a warning, and
//! the crate is built without kernels.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let abi = env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    if target_os == "linux" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmlart.so.{abi}");
    }
    cuda_kernels();
}

/// Env vars that change what the kernel build does.
const ENV_VARS: &[&str] = &[
    "MLART_NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "MLART_NO_CUDA_KERNELS",
    "MLART_REQUIRE_CUDA_KERNELS",
];

fn flag(name: &str) -> bool {
    env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn cuda_kernels() {
    println!("cargo::rustc-check-cfg=cfg(mlart_cuda_kernels)");
    println!("cargo:rerun-if-changed=kernels");
    for v in ENV_VARS {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let require = flag("MLART_REQUIRE_CUDA_KERNELS");
    let how = "build with CUDA_HOME=$(scripts/cuda-toolchain.sh) cargo build \
               (the script installs nvcc into .cuda/)";

    if flag("MLART_NO_CUDA_KERNELS") {
        if require {
            panic!("MLART_REQUIRE_CUDA_KERNELS and MLART_NO_CUDA_KERNELS are both set");
        }
        println!("cargo:warning=CUDA kernels not built (MLART_NO_CUDA_KERNELS is set)");
        return;
    }
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let Some((nvcc, from)) = find_nvcc(&manifest) else {
        if require {
            panic!("MLART_REQUIRE_CUDA_KERNELS is set but nvcc was not found; {how}");
        }
        println!(
            "cargo:warning=CUDA kernels not built: nvcc not found (MLART_NVCC, CUDA_HOME, \
             CUDA_PATH, .cuda/, PATH); the CUDA backend will be unavailable. To build them, {how}"
        );
        return;
    };
    // A toolchain upgrade in place rebuilds the kernels.
    println!("cargo:rerun-if-changed={}", nvcc.display());

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("cuda-kernels");
    // The cmake crate panics on failure after printing cmake's and nvcc's
    // output; catch it to say which nvcc failed and what the options are.
    let built = std::panic::catch_unwind(|| {
        cmake::Config::new(manifest.join("kernels"))
            .define("CUDA_NVCC", &nvcc)
            // The compiler flags the crate passes are for C; none is enabled.
            .configure_arg("--no-warn-unused-cli")
            .out_dir(&out)
            .build()
    });
    let dst = match built {
        Ok(dst) => dst,
        Err(_) => panic!(
            "building the CUDA kernels with {} (from {from}) failed: see cmake's and nvcc's \
             output above. Fix the kernels, point MLART_NVCC at another nvcc, or set \
             MLART_NO_CUDA_KERNELS=1 to build without them",
            nvcc.display()
        ),
    };
    let fatbin = dst.join("fatbin").join("mlart_kernels.fatbin");
    let log = dst.join("fatbin").join("ptxas.log");
    for f in [&fatbin, &log] {
        if !f.is_file() {
            panic!("the kernel build succeeded but left no {}", f.display());
        }
    }
    // The crate include_str!s the log: make sure it is UTF-8.
    let raw = std::fs::read(&log).unwrap_or_default();
    let text = String::from_utf8_lossy(&raw).into_owned();
    if text.as_bytes() != raw.as_slice() {
        std::fs::write(&log, &text).expect("rewriting ptxas.log as UTF-8");
    }
    // nvcc/ptxas warnings would otherwise only be in the log.
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("warning"))
        .collect();
    for w in warnings.iter().take(20) {
        println!("cargo:warning=nvcc: {w}");
    }
    if warnings.len() > 20 {
        println!(
            "cargo:warning=nvcc: ... {} more warnings in {}",
            warnings.len() - 20,
            log.display()
        );
    }
    println!("cargo:rustc-cfg=mlart_cuda_kernels");
    println!("cargo:rustc-env=MLART_FATBIN={}", fatbin.display());
    println!("cargo:rustc-env=MLART_PTXAS_LOG={}", log.display());
}

/// The first nvcc in the documented search order, with where it came from.
fn find_nvcc(manifest: &Path) -> Option<(PathBuf, String)> {
    let exe = format!("nvcc{}", env::consts::EXE_SUFFIX);
    if let Some(p) = env::var_os("MLART_NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        // An explicit choice that is wrong must not silently fall back.
        if !p.is_file() {
            panic!("MLART_NVCC={} is not a file", p.display());
        }
        return Some((p, "MLART_NVCC".into()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|p| !p.is_empty()) {
            let p = Path::new(&home).join("bin").join(&exe);
            if p.is_file() {
                return Some((p, var.into()));
            }
            println!(
                "cargo:warning={var}={} has no bin/{exe}; looking further",
                Path::new(&home).display()
            );
        }
    }
    let own = manifest.join(".cuda").join("bin").join(&exe);
    if own.is_file() {
        return Some((own, ".cuda/ (scripts/cuda-toolchain.sh)".into()));
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(&exe))
        .find(|p| p.is_file())
        .map(|p| (p, "PATH".into()))
}
