//! The CUDA kernels' logic on the CPU: builds `kernels/emu/emu_main.cpp`
//! (the kernel sources compiled by the host C++ compiler against the warp
//! emulator in `kernels/emu/mla_emu.h`) and runs it. It launches plan ->
//! decode -> combine exactly as the CUDA backend does, on random paged
//! caches of every format, dense and sparse, and the model's projection
//! kernels (bf16 and FP8 weights, grouped, split over K), and checks each
//! output against a float64 reference. One of the two runs is built with
//! AddressSanitizer and UBSan's alignment check, so a kernel that reads or
//! writes past a buffer, or through an address a GPU would fault on as
//! misaligned, fails; a third, under ThreadSanitizer, fails on a data race
//! between the threads of a block (a missing barrier). A GPU is not needed; what this cannot check (the
//! hardware, and the PTX fragment layouts the emulator and the kernels both
//! assume) is left to the GPU suite, `tests/cuda_decode.rs`.

#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the emulator driver with the host C++ compiler, plus `extra`
/// flags; None when the compiler refuses those flags (no AddressSanitizer).
fn build(cxx: &str, kernels: &Path, exe: &Path, extra: &[&str]) -> Option<()> {
    let out = Command::new(cxx)
        .args([
            "-std=c++17",
            "-O1",
            "-Wall",
            "-Wno-unused-function",
            "-Wno-unknown-pragmas",
        ])
        .args(extra)
        .arg("-I")
        .arg(kernels)
        .arg(kernels.join("emu/emu_main.cpp"))
        .arg("-o")
        .arg(exe)
        .output()
        .unwrap_or_else(|e| panic!("running the C++ compiler {cxx:?}: {e}"));
    if !out.status.success() {
        assert!(
            !extra.is_empty(),
            "building the kernel emulator failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(())
}

#[test]
fn cuda_kernels_match_the_reference_under_emulation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let plain = tmp.join("mlart_kernel_emu");
    build(&cxx, &kernels, &plain, &[]).expect("the plain build");
    // Under AddressSanitizer every kernel load and store outside the
    // buffers a case allocated fails the run (found an FP8 scale read past
    // the weight's scales). UBSan's alignment check fails a vector load or
    // store whose address a GPU would fault on (the emulator's uint4 and
    // friends carry CUDA's alignment; cp.async and ldmatrix check theirs).
    let asan = tmp.join("mlart_kernel_emu_asan");
    let asan = build(
        &cxx,
        &kernels,
        &asan,
        &[
            "-fsanitize=address,alignment",
            "-fno-sanitize-recover=alignment",
            "-fno-omit-frame-pointer",
        ],
    )
    .map(|()| asan);
    if asan.is_none() {
        println!(
            "note: {cxx} cannot build with -fsanitize=address,alignment; out-of-bounds and misaligned accesses go unchecked"
        );
    }
    // Under ThreadSanitizer each GPU thread is a fiber whose only
    // synchronization is the barriers, so any two accesses of one block's
    // threads to the same memory, one a write, with no barrier between them
    // fail the run, in whatever order the threads happened to run (a
    // histogram cleared and counted into with no barrier between went
    // unnoticed by both orders below; this run names the two lines). It runs
    // beside the other two, writing to files.
    let tsan = tmp.join("mlart_kernel_emu_tsan");
    let tsan_run = build(&cxx, &kernels, &tsan, &["-fsanitize=thread", "-g"]).map(|()| {
        let file = |name: &str| std::fs::File::create(tmp.join(name)).expect("a log file");
        Command::new(&tsan)
            .env("TSAN_OPTIONS", "halt_on_error=1")
            .stdout(file("mlart_kernel_emu_tsan.out"))
            .stderr(file("mlart_kernel_emu_tsan.err"))
            .spawn()
            .expect("running the ThreadSanitizer emulator")
    });
    // Threads of a block run first to last between barriers, then last to
    // first: a missing barrier shows in one order or the other.
    for order in ["forward", "reverse"] {
        let exe = match (&asan, order) {
            (Some(a), "forward") => a,
            _ => &plain,
        };
        let run = Command::new(exe)
            .env("MLA_EMU_ORDER", order)
            .env("ASAN_OPTIONS", "detect_leaks=0")
            .output()
            .expect("running the emulator");
        check_run(order, &run);
    }
    match tsan_run {
        Some(mut child) => {
            let status = child.wait().expect("waiting for the ThreadSanitizer run");
            let read = |name: &str| std::fs::read(tmp.join(name)).expect("the run's log");
            let run = std::process::Output {
                status,
                stdout: read("mlart_kernel_emu_tsan.out"),
                stderr: read("mlart_kernel_emu_tsan.err"),
            };
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert!(
                !stderr.contains("ThreadSanitizer"),
                "a data race between the threads of a block (ThreadSanitizer):\n{stderr}"
            );
            check_run("any (ThreadSanitizer: races between a block's threads)", &run);
        }
        None => println!(
            "note: {cxx} cannot build with -fsanitize=thread; races between a block's threads go unchecked"
        ),
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
        "ok   index scatter 500 rows of 17 words, 3 blocks",
        "ok   index score bs7 h64 d128",
        "ok   index score bs16 h100 d128 mma",
        "ok   index topk 2048 3 values (ties)",
        "ok   index topk 7 +-0/+-inf/NaN/subnormal",
        "ok   index rows keys dim128 rope64 layernorm",
        "ok   index rows queries dim128 rope64 4 heads/token",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} case ran:\n{stdout}");
    }
}
