//! The CUDA kernels' logic on the CPU: builds `kernels/emu/emu_main.cpp`
//! (the kernel sources compiled by the host C++ compiler against the warp
//! emulator in `kernels/emu/mla_emu.h`) and runs it. It launches plan ->
//! decode -> combine exactly as the CUDA backend does, on random paged
//! caches of every format, dense and sparse, and the model's projection
//! kernels (bf16 and FP8 weights, grouped, split over K), and checks each
//! output against a float64 reference. A GPU is not needed; what this cannot check (the
//! hardware, and the PTX fragment layouts the emulator and the kernels both
//! assume) is left to the GPU suite, `tests/cuda_decode.rs`.

#![cfg(target_os = "linux")]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn cuda_kernels_match_the_reference_under_emulation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mlart_kernel_emu");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let build = Command::new(&cxx)
        .args([
            "-std=c++17",
            "-O1",
            "-Wall",
            "-Wno-unused-function",
            "-Wno-unknown-pragmas",
            "-I",
        ])
        .arg(&kernels)
        .arg(kernels.join("emu/emu_main.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running the C++ compiler {cxx:?}: {e}"));
    assert!(
        build.status.success(),
        "building the kernel emulator failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    // Threads of a block run first to last between barriers, then last to
    // first: a missing barrier shows in one order or the other.
    for order in ["forward", "reverse"] {
        let run = Command::new(&exe)
            .env("MLA_EMU_ORDER", order)
            .output()
            .expect("running the emulator");
        check_run(order, &run);
    }
}

fn check_run(order: &str, run: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("== thread order: {order}\n{stdout}");
    assert!(
        run.status.success(),
        "emulated kernels ({order} thread order) disagree with the reference:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    // Every format and mode actually ran.
    for needle in [
        "dense f0",
        "dense f4",
        "sparse f3",
        "extra",
        "split-kv",
        "bad block id",
        " m64 wg",
        "sparse f3 h128 sink m64 wg",
        "ok   wgmma probe",
        "ok   linear bf16 hi decode",
        "ok   linear fp8 hi+lo groups W_UK-like",
        "ok   linear fp8 hi T70 N64 K256 m4 split2",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} case ran:\n{stdout}");
    }
}
