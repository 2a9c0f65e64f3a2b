//! The Go and Node bindings' own test suites (`bindings/go`, `bindings/node`),
//! run against the `libmlart` this test run built, with a tiny checkpoint
//! for their model tests.
//!
//! Needs Go (>= 1.22, with cgo and a C compiler) and Node (>= 20) with
//! `npm ci` done in `bindings/node` (`.ci/run` does it). Without them the
//! tests fail: they never pass without having run the suites.

mod host;

use host::{expect_success, library_dir, run, tiny_checkpoint};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A tiny checkpoint of its own for each suite (the tests run in parallel).
fn checkpoint(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("remove the previous checkpoint");
    }
    tiny_checkpoint(&dir);
    dir
}

#[test]
fn node_binding_tests_pass() {
    let pkg = root().join("bindings/node");
    assert!(
        pkg.join("node_modules/koffi").is_dir(),
        "bindings/node has no node_modules/koffi: run `npm ci --prefix bindings/node` first"
    );
    let lib = library_dir().join("libmlart.so");
    let model = checkpoint("node-model-tiny");
    let mut cmd = Command::new("node");
    cmd.current_dir(&pkg)
        .arg("--test")
        .env("MLART_LIBRARY", &lib)
        .env("MLART_TEST_MODEL_DIR", &model)
        .env_remove("MLART_CPU_ISA")
        .env_remove("MLART_BACKEND");
    let needs = "The Node binding's tests need Node >= 20 (`node` on PATH).";
    let text = expect_success("node --test", &run("node --test", &mut cmd, needs));
    assert!(
        text.contains("# fail 0") && !text.contains("# pass 0"),
        "unexpected node --test summary:\n{text}"
    );
}
