//! The `mlart` command line: `gen-model`, `run` and `bench --model` on a
//! generated tiny checkpoint (what the README's commands do), and its
//! errors for bad options. What is asserted is the behaviour and the shape
//! of the reports, never a speed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mlart(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlart"))
        .args(args)
        .env_remove("MLART_BACKEND")
        .output()
        .expect("mlart runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A one-layer tiny checkpoint in a fresh directory (removed on drop).
struct Checkpoint(PathBuf);

impl Checkpoint {
    fn tiny(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mlart-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = mlart(&[
            "gen-model",
            "--preset",
            "tiny",
            "--layers",
            "1",
            dir.to_str().expect("utf-8 temp dir"),
        ]);
        assert!(out.status.success(), "gen-model: {:?}", text(&out));
        Checkpoint(dir)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp dir")
    }

    /// `mlart bench --model` at context 4 with `--batch batches`: its
    /// output, after asserting that it succeeded.
    fn bench(&self, batches: &str) -> String {
        let args = [
            "bench",
            "--model",
            self.path(),
            "--prompt",
            "4",
            "--batch",
            batches,
        ];
        let out = mlart(&args);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        stdout
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(Path::new(&self.0));
    }
}

#[test]
fn run_prefills_and_decodes_a_batch() {
    let ck = Checkpoint::tiny("run");
    let out = mlart(&[
        "run",
        "--model",
        ck.path(),
        "--batch",
        "2",
        "--prompt",
        "3",
        "--decode",
        "2",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("prefill: 2 x 3 tokens"), "{stdout}");
    assert!(stdout.contains("decode: 2 steps x batch 2"), "{stdout}");
    assert!(
        stdout.contains("cache: 5 tokens per sequence in every layer"),
        "{stdout}"
    );
}

#[test]
fn run_names_a_bad_batch() {
    let ck = Checkpoint::tiny("badbatch");
    for (batch, says) in [
        ("2,3", "run takes one batch size"),
        ("0", "--batch 0: 0 is not a batch size"),
        ("4,x", "--batch 4,x: x is not a batch size"),
    ] {
        let out = mlart(&["run", "--model", ck.path(), "--batch", batch]);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "--batch {batch} was accepted");
        assert!(stderr.contains(says), "--batch {batch}: {stdout}\n{stderr}");
    }
}

/// `--kept-keys MB` reaches the model: a prompt in passes runs with none
/// kept; a value that is not a number is named.
#[test]
fn run_takes_the_kept_keys_limit() {
    let ck = Checkpoint::tiny("keptkeys");
    let out = mlart(&[
        "run",
        "--model",
        ck.path(),
        "--prompt",
        "600",
        "--decode",
        "1",
        "--kept-keys",
        "0",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("prefill: 1 x 600 tokens"), "{stdout}");
    assert!(
        stdout.contains("keys kept between passes: none"),
        "{stdout}"
    );
    let out = mlart(&["run", "--model", ck.path(), "--kept-keys", "lots"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "--kept-keys lots was accepted");
    assert!(
        stderr.contains("--kept-keys lots: not a number"),
        "{stdout}\n{stderr}"
    );
}

/// Each batch of the list gets its line, rated against the ceilings the
/// same run measured; batch 1 keeps its weight-stream line.
#[test]
fn bench_model_rates_each_batch_against_the_roofline() {
    let ck = Checkpoint::tiny("bench");
    let stdout = ck.bench("1,3,5");
    assert!(
        stdout.contains("batch-1 decode, context 4:") && stdout.contains("% of DRAM read"),
        "{stdout}"
    );
    for b in [3, 5] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("batch {b:>3}:")))
            .unwrap_or_else(|| panic!("no batch {b} line in\n{stdout}"));
        for part in [
            "ms per step",
            "ms per token",
            "GFLOP/s",
            "weight stream",
            "% of the roofline",
        ] {
            assert!(line.contains(part), "batch {b}: no {part:?} in {line}");
        }
        // ms per token is ms per step over the batch (both as printed).
        let number_before = |unit: &str| -> f64 {
            let head = &line[..line.find(unit).expect("unit")];
            let word = head.split_whitespace().last().expect("a number");
            word.trim_end_matches(',').parse().expect("a number")
        };
        let (step, token) = (number_before("ms per step"), number_before("ms per token"));
        assert!(
            (step / b as f64 - token).abs() <= 0.01 + 1e-3 * step,
            "batch {b}: {step} ms per step, {token} per token"
        );
    }
    // Batch 1 is not repeated as a batched point.
    assert!(!stdout.contains("batch   1:"), "{stdout}");
    // Without 1 in the list the batch-1 line is left out.
    let stdout = ck.bench("2");
    assert!(!stdout.contains("batch-1 decode"), "{stdout}");
    assert!(stdout.contains("batch   2:"), "{stdout}");
}

/// `mlart bench` with `MLART_CPU_ISA` (and `MLART_AMX_EMULATE`) set.
fn bench_with(isa: &str, emulate: bool, json: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mlart"));
    cmd.args([
        "bench",
        "--no-scalar",
        "--seconds",
        "0.02",
        "--threads",
        "2",
    ])
    .args(["--points", "16:1:640:2:bf16:dense,128:1:300:1:bf16:dense"])
    .arg("--json")
    .arg(json)
    .env_remove("MLART_BACKEND")
    .env("MLART_CPU_ISA", isa);
    if emulate {
        cmd.env("MLART_AMX_EMULATE", "1");
    }
    cmd.output().expect("mlart runs")
}

/// The bench's phase table says where the amx kernel's time goes, point by
/// point (the AMX tiles in software where the CPU has none), as for the
/// vector kernels, and the reference kernel has none.
#[test]
fn bench_counts_the_amx_kernel_phases() {
    let json = std::env::temp_dir().join(format!("mlart-cli-phases-{}.json", std::process::id()));
    let mut out = bench_with("amx", false, &json);
    if !out.status.success() {
        out = bench_with("amx", true, &json);
    }
    let (stdout, stderr) = text(&out);
    if !out.status.success() {
        // Without AVX512-BF16 not even the tile model runs: refused by name.
        assert!(stderr.contains("amx"), "{stderr}");
        eprintln!("skipped: the amx kernel (this CPU has no AVX512-BF16): {stderr}");
        return;
    }
    let head = "where the amx kernel's time goes";
    assert!(stdout.contains(head), "{stdout}\n{stderr}");
    let table = &stdout[stdout.find(head).expect("found")..];
    let header = table
        .lines()
        .find(|l| l.trim_start().starts_with("batch"))
        .unwrap_or_else(|| panic!("no header in\n{table}"));
    let cols: Vec<&str> = header.split_whitespace().collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("no column {name} in {header}"))
    };
    let rows: Vec<Vec<f64>> = table
        .lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| {
            // "kv" and "topk" are words; every other field is a number (a
            // trailing % dropped). "V pairs" and "P·V" are two headers of
            // one column each: the numbers are counted from the right.
            l.split_whitespace()
                .filter_map(|w| w.trim_end_matches('%').parse().ok())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    // Headers: batch seqlen h_q s_q kv topk rows keys scores softmax V pairs
    // P·V rest total peak at peak DRAM busy scores %pk P·V %pk; numbers:
    // batch seqlen h_q s_q rows, then the six phases, total, peak, at
    // peak, DRAM, busy, scores %pk, P·V %pk ("dense" is not a number).
    assert!(col("rows") < col("keys") && col("keys") < col("scores"));
    for (r, h_q) in rows.iter().zip([16.0, 128.0]) {
        assert_eq!(r.len(), 18, "{r:?} in\n{table}");
        assert_eq!(r[2], h_q, "{r:?}");
        assert_eq!(r[4], h_q, "rows per call at s_q 1: {r:?}");
        let phases = &r[5..11];
        let (scores, softmax, v_pairs, pv) = (phases[1], phases[2], phases[3], phases[4]);
        assert!(scores > 0.0 && softmax > 0.0 && pv > 0.0, "{r:?}");
        // V's pairs are built only above 16 rows.
        assert_eq!(v_pairs == 0.0, h_q <= 16.0, "{r:?}");
        let total = r[11];
        assert!(
            (phases.iter().sum::<f64>() - total).abs() <= 0.05 + 1e-3 * total,
            "{r:?}"
        );
        let busy = r[15];
        assert!(busy > 0.0 && busy <= 100.5, "busy {busy}%: {r:?}");
    }
    let doc = std::fs::read_to_string(&json).expect("the JSON");
    let _ = std::fs::remove_file(&json);
    assert_eq!(doc.matches("\"phases\": {\"rows\"").count(), 2, "{doc}");
    assert!(doc.contains("\"us_per_256_keys\": {\"keys\""), "{doc}");

    // A vector kernel counts its phases too (where this CPU has it).
    let out = bench_with("avx2", false, &json);
    let _ = std::fs::remove_file(&json);
    let (stdout, stderr) = text(&out);
    match out.status.success() {
        true => assert!(
            stdout.contains("where the avx2 kernel's time goes"),
            "{stdout}"
        ),
        false => eprintln!("skipped: the avx2 kernel's table (refused here: {stderr})"),
    }

    // The reference kernel: no table, null in the JSON.
    let out = bench_with("scalar", false, &json);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.contains(head), "{stdout}");
    let doc = std::fs::read_to_string(&json).expect("the JSON");
    let _ = std::fs::remove_file(&json);
    assert_eq!(doc.matches("\"phases\": null").count(), 2, "{doc}");
}
