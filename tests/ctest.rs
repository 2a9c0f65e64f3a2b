//! Builds and runs the C / C++ test suite in `tests/c` against the
//! `libmlart.so` and `libmlart.a` cargo built for this test run, with a tiny
//! random-weight checkpoint (for `test_model.c`) generated into the build
//! directory first.
//!
//! Needs CMake (>= 3.16, `cmake` and `ctest` on PATH, or the `CMAKE` and
//! `CTEST` environment variables) and a C11 / C++17 compiler. Without them
//! the test fails: it never passes without having run the C programs.

use mlart::model::gen::{generate, GenOptions, Preset, WeightDtype};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `cmd`, returning its output, or panics naming `what` if it cannot start.
fn run(what: &str, cmd: &mut Command) -> Output {
    println!("$ {cmd:?}");
    match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!(
            "{what}: could not run {:?}: {e}\n\
             The C/C++ tests need CMake (>= 3.16) with ctest, and a C11/C++17 compiler; \
             install them (e.g. `apt-get install cmake g++`) or point the CMAKE / CTEST \
             environment variables at them.",
            cmd.get_program()
        ),
    }
}

/// Panics with the step's output unless it succeeded; prints it otherwise.
fn expect_success(what: &str, out: &Output) -> String {
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

fn tool(env: &str, default: &str) -> PathBuf {
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
fn library_dir() -> PathBuf {
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
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ctest-lib");
    let release = profile.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--lib", "--target-dir"])
        .arg(&target);
    if release {
        cmd.arg("--release");
    }
    expect_success("cargo build --lib", &run("cargo build --lib", &mut cmd));
    let built = target.join(if release { "release" } else { "debug" });
    assert!(
        has_libraries(&built),
        "cargo build --lib did not produce libmlart.so and libmlart.a in {}",
        built.display()
    );
    built
}

#[test]
fn c_and_cpp_programs_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib_dir = library_dir();
    println!(
        "using libmlart.so and libmlart.a from {}",
        lib_dir.display()
    );
    let build = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ctest-build");
    if build.exists() {
        std::fs::remove_dir_all(&build).expect("remove the previous cmake build directory");
    }
    std::fs::create_dir_all(&build).expect("create the cmake build directory");
    // A tiny random-weight checkpoint for tests/c/test_model.c.
    let model_dir = build.join("model-tiny");
    let gen = GenOptions {
        preset: Preset::Tiny,
        dtype: WeightDtype::Bf16,
        layers: 2,
        seed: 1,
        shards: 1,
        yarn: true,
    };
    if let Err(e) = generate(&model_dir, &gen) {
        panic!(
            "generate the test checkpoint in {}: {e:?}",
            model_dir.display()
        );
    }
    let cmake = tool("CMAKE", "cmake");
    let ctest = tool("CTEST", "ctest");

    let mut configure = Command::new(&cmake);
    configure
        .arg("-S")
        .arg(root.join("tests/c"))
        .arg("-B")
        .arg(&build)
        .arg("-DCMAKE_BUILD_TYPE=Debug")
        .arg(format!(
            "-DMLART_INCLUDE_DIR={}",
            root.join("include").display()
        ))
        .arg(format!("-DMLART_LIB_DIR={}", lib_dir.display()))
        .arg(format!("-DMLART_TEST_MODEL_DIR={}", model_dir.display()));
    expect_success("cmake configure", &run("cmake configure", &mut configure));

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut compile = Command::new(&cmake);
    compile
        .arg("--build")
        .arg(&build)
        .arg("--parallel")
        .arg(jobs.to_string());
    expect_success("cmake --build", &run("cmake --build", &mut compile));

    // No LD_LIBRARY_PATH: the shared programs find libmlart.so.<ABI> by RPATH.
    let mut test = Command::new(&ctest);
    test.current_dir(&build)
        .env_remove("LD_LIBRARY_PATH")
        .args(["--output-on-failure", "--timeout", "300"]);
    let text = expect_success("ctest", &run("ctest", &mut test));
    assert!(
        text.contains("100% tests passed")
            && text.contains("test_decode_cpp_static")
            && text.contains("test_model_c_static"),
        "unexpected ctest output:\n{text}"
    );
}
