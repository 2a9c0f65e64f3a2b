//! The Go, Node and Python bindings' own test suites (`bindings/go`,
//! `bindings/node`, `bindings/python`), run against the `libmlart` this test
//! run built, with a tiny checkpoint for their model tests and a tiny
//! DeepSeek-V3.2 one for their indexer tests.
//!
//! Needs Go (>= 1.22, with cgo and a C compiler), Node (>= 20) with
//! `npm ci` done in `bindings/node` (`.ci/run` does it) and Python (>= 3.9,
//! `python3` on PATH; standard library only). Without them the tests fail:
//! they never pass without having run the suites.

mod host;

use host::{
    expect_success, library_dir, run, small_checkpoint, tiny_checkpoint, tiny_v32_checkpoint,
};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A tiny checkpoint of its own for each suite (the tests run in parallel),
/// written by `generate` (`tiny_checkpoint` or `tiny_v32_checkpoint`).
fn checkpoint(name: &str, generate: fn(&Path)) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("remove the previous checkpoint");
    }
    generate(&dir);
    dir
}

/// A folder of links to this build's library files, under `names`: `-L`
/// finds what it holds and nothing else.
fn link_dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let lib = library_dir();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("remove the previous link folder");
    }
    std::fs::create_dir_all(&dir).expect("create the link folder");
    for (link, file) in files {
        std::os::unix::fs::symlink(lib.join(file), dir.join(link)).expect("link the library");
    }
    dir
}

/// `gofmt` and `go vet`, then `go test` twice: linked to this build's `libmlart.so`
/// (`-tags mlart_shared`, found at run time through `libmlart.so.0`) and to
/// its `libmlart.a` (the same tag with a `-L` folder holding only the static
/// library; the package's default links `target/release/libmlart.a`,
/// which this test run did not build).
#[test]
fn go_binding_tests_pass() {
    let pkg = root().join("bindings/go");
    let model = checkpoint("go-model-tiny", tiny_checkpoint);
    let model_v32 = checkpoint("go-model-tiny-v32", tiny_v32_checkpoint);
    let needs = "The Go binding's tests need Go >= 1.22 with cgo (`go` on PATH) and a C compiler.";
    let shared = link_dir(
        "go-shared",
        &[
            ("libmlart.so", "libmlart.so"),
            ("libmlart.so.0", "libmlart.so"),
        ],
    );
    let stat = link_dir("go-static", &[("libmlart.a", "libmlart.a")]);
    let go = |args: &[&str], ldflags: &Path, ld_path: Option<&Path>| {
        let mut cmd = Command::new("go");
        cmd.current_dir(&pkg)
            .args(args)
            .env("CGO_ENABLED", "1")
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=mod")
            .env("CGO_LDFLAGS", format!("-L{}", ldflags.display()))
            .env("MLART_TEST_MODEL_DIR", &model)
            .env("MLART_TEST_MODEL_V32_DIR", &model_v32)
            .env_remove("MLART_CPU_ISA")
            .env_remove("MLART_BACKEND");
        if let Some(p) = ld_path {
            cmd.env("LD_LIBRARY_PATH", p);
        }
        let what = format!("go {}", args.join(" "));
        expect_success(&what, &run(&what, &mut cmd, needs))
    };
    let mut fmt = Command::new("gofmt");
    fmt.current_dir(&pkg).arg("-l").arg(".");
    let unformatted = expect_success("gofmt -l", &run("gofmt -l", &mut fmt, needs));
    assert!(
        unformatted.trim().is_empty(),
        "gofmt would change: {unformatted}"
    );
    go(
        &["vet", "-tags", "mlart_shared", "./..."],
        &shared,
        Some(&shared),
    );
    for (dir, ld) in [(&shared, Some(shared.as_path())), (&stat, None)] {
        let text = go(
            &["test", "-tags", "mlart_shared", "-count=1", "-v", "./..."],
            dir,
            ld,
        );
        assert!(
            text.contains("--- PASS") && !text.contains("--- FAIL") && !text.contains("--- SKIP"),
            "unexpected go test output:\n{text}"
        );
    }
}

#[test]
fn node_binding_tests_pass() {
    let pkg = root().join("bindings/node");
    assert!(
        pkg.join("node_modules/koffi").is_dir(),
        "bindings/node has no node_modules/koffi: run `npm ci --prefix bindings/node` first"
    );
    let lib = library_dir().join("libmlart.so");
    let model = checkpoint("node-model-tiny", tiny_checkpoint);
    let model_v32 = checkpoint("node-model-tiny-v32", tiny_v32_checkpoint);
    let mut cmd = Command::new("node");
    cmd.current_dir(&pkg)
        .arg("--test")
        .env("MLART_LIBRARY", &lib)
        .env("MLART_TEST_MODEL_DIR", &model)
        .env("MLART_TEST_MODEL_V32_DIR", &model_v32)
        .env_remove("MLART_CPU_ISA")
        .env_remove("MLART_BACKEND");
    let needs = "The Node binding's tests need Node >= 20 (`node` on PATH).";
    let text = expect_success("node --test", &run("node --test", &mut cmd, needs));
    assert!(
        text.contains("# fail 0") && !text.contains("# pass 0") && text.contains("# skipped 0"),
        "unexpected node --test summary:\n{text}"
    );
}

/// `python3 -m unittest discover` in `bindings/python` (ctypes, standard
/// library only): the whole suite must run, pass and skip nothing.
#[test]
fn python_binding_tests_pass() {
    let model = checkpoint("python-model-tiny", tiny_checkpoint);
    let model_v32 = checkpoint("python-model-tiny-v32", tiny_v32_checkpoint);
    python_unittest(
        "tests",
        &[
            ("MLART_TEST_MODEL_DIR", model.as_ref()),
            ("MLART_TEST_MODEL_V32_DIR", model_v32.as_ref()),
        ],
    );
}

/// `python3 -m unittest discover -s SUITE -v` in `bindings/python` against
/// this build's library, with `env`: it must run tests, pass them all and
/// skip none.
fn python_unittest(suite: &str, env: &[(&str, &OsStr)]) {
    let mut cmd = Command::new("python3");
    cmd.current_dir(root().join("bindings/python"))
        .args(["-m", "unittest", "discover", "-s", suite, "-v"])
        .env("MLART_LIBRARY", library_dir().join("libmlart.so"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("MLART_CPU_ISA")
        .env_remove("MLART_BACKEND")
        .envs(env.iter().copied());
    let needs = "The Python binding's tests need Python >= 3.9 (`python3` on PATH).";
    let what = format!("python3 -m unittest discover -s {suite} -v");
    let text = expect_success(&what, &run(&what, &mut cmd, needs));
    let ran = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(0);
    assert!(
        ran > 0 && text.lines().any(|l| l.trim() == "OK") && !text.contains("skipped"),
        "unexpected unittest summary of {suite} (ran {ran}):\n{text}"
    );
}

/// `python3 -m unittest discover -s tests_cuda` in `bindings/python`: the
/// binding's CUDA device-memory suite (`__cuda_array_interface__` arrays,
/// streams, `DeviceArray`) on the emulated driver (`kernels/emu/fake_cuda.cpp`,
/// built here as `libcuda.so.1`) with a `small` checkpoint; it must run, pass
/// and skip nothing. A build without the CUDA kernels reports it ignored (not
/// passed), as `tests/cuda_decode.rs` leaves out its emulated run; CI builds
/// them (`MLART_REQUIRE_CUDA_KERNELS`).
#[test]
#[cfg_attr(
    not(mlart_cuda_kernels),
    ignore = "this build has no CUDA kernels for the emulated driver to run"
)]
fn python_binding_cuda_tests_pass() {
    assert!(
        mlart::backend::cuda::fatbin::fatbin().is_some(),
        "this build has no CUDA kernels: build with CUDA_HOME=$(scripts/cuda-toolchain.sh)"
    );
    // The emulated driver, as tests/cuda_decode.rs builds it (with UBSan's
    // alignment check where the compiler has it).
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-fake-cuda");
    std::fs::create_dir_all(&dir).expect("create the emulated driver's folder");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let build = |sanitize: &[&str]| {
        let mut cmd = Command::new(&cxx);
        cmd.args(["-std=c++17", "-O1", "-shared", "-fPIC", "-w"])
            .args(sanitize)
            .arg("-I")
            .arg(root().join("kernels"))
            .arg(root().join("kernels/emu/fake_cuda.cpp"))
            .arg("-o")
            .arg(dir.join("libcuda.so.1"));
        let needs = "The emulated CUDA driver needs a C++17 compiler (`c++` or $CXX).";
        let out = run("build the emulated CUDA driver", &mut cmd, needs);
        if !out.status.success() {
            println!("{}", String::from_utf8_lossy(&out.stderr));
        }
        out.status.success()
    };
    assert!(
        build(&["-fsanitize=alignment", "-fno-sanitize-recover=alignment"]) || build(&[]),
        "{cxx} could not build kernels/emu/fake_cuda.cpp"
    );
    let _ = std::fs::remove_file(dir.join("libcuda.so"));
    std::os::unix::fs::symlink("libcuda.so.1", dir.join("libcuda.so")).expect("link libcuda.so");
    let ld_path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    };
    let model = checkpoint("python-model-small", small_checkpoint);
    python_unittest(
        "tests_cuda",
        &[
            ("LD_LIBRARY_PATH", ld_path.as_ref()),
            ("MLART_TEST_CUDA", "1".as_ref()),
            ("MLART_TEST_SMALL_MODEL_DIR", model.as_ref()),
        ],
    );
}
