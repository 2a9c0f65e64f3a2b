//! Builds and runs the C / C++ test suite in `tests/c` (the C++ binding's
//! test, `test_bindings.cpp`, included) against the
//! `libmlart.so` and `libmlart.a` cargo built for this test run, with a tiny
//! random-weight checkpoint (for `test_model.c`) and a tiny DeepSeek-V3.2 one
//! (for the C++ binding's indexer part) generated into the build directory
//! first.
//!
//! Needs CMake (>= 3.16, `cmake` and `ctest` on PATH, or the `CMAKE` and
//! `CTEST` environment variables) and a C11 / C++17 compiler. Without them
//! the test fails: it never passes without having run the C programs.
//!
//! Where valgrind runs (`valgrind` on PATH, or the `VALGRIND` environment
//! variable), the shared-library programs are then run again under its
//! memcheck (the `memcheck` CTest label; see tests/c/CMakeLists.txt): any
//! memory error or definite leak fails the test. Without valgrind that part
//! prints `SKIPPED memcheck: valgrind not found` and is not run; `.ci/run`
//! installs valgrind, so CI always runs it.

mod host;

use host::{expect_success, library_dir, run, tiny_checkpoint, tiny_v32_checkpoint, tool};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const NEEDS: &str = "The C/C++ tests need CMake (>= 3.16) with ctest, and a C11/C++17 \
     compiler; install them (e.g. `apt-get install cmake g++`) or point the CMAKE / CTEST \
     environment variables at them.";

/// The programs run under valgrind (as `memcheck_<name>` tests).
const MEMCHECK_TESTS: [&str; 6] = [
    "test_decode_c",
    "test_decode_c_scalar",
    "test_decode_cpp",
    "test_model_c",
    "test_error_paths",
    "test_bindings_cpp",
];

/// valgrind, if it runs here: `VALGRIND` or `valgrind` on PATH.
fn valgrind() -> Option<PathBuf> {
    let valgrind = tool("VALGRIND", "valgrind");
    let works = Command::new(&valgrind)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    works.then_some(valgrind)
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
    tiny_checkpoint(&model_dir);
    // And a tiny V3.2 one for test_bindings.cpp's indexer part.
    let model_v32_dir = build.join("model-tiny-v32");
    tiny_v32_checkpoint(&model_v32_dir);
    let cmake = tool("CMAKE", "cmake");
    let ctest = tool("CTEST", "ctest");
    let valgrind = valgrind();

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
        .arg(format!("-DMLART_TEST_MODEL_DIR={}", model_dir.display()))
        .arg(format!(
            "-DMLART_TEST_MODEL_V32_DIR={}",
            model_v32_dir.display()
        ))
        .arg(format!(
            "-DMLART_VALGRIND={}",
            valgrind
                .as_deref()
                .map_or(String::new(), |v| v.display().to_string())
        ));
    expect_success(
        "cmake configure",
        &run("cmake configure", &mut configure, NEEDS),
    );

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut compile = Command::new(&cmake);
    compile
        .arg("--build")
        .arg(&build)
        .arg("--parallel")
        .arg(jobs.to_string());
    expect_success("cmake --build", &run("cmake --build", &mut compile, NEEDS));

    // No LD_LIBRARY_PATH: the shared programs find libmlart.so.<ABI> by RPATH.
    let mut test = Command::new(&ctest);
    test.current_dir(&build)
        .env_remove("LD_LIBRARY_PATH")
        .args(["--output-on-failure", "--timeout", "300", "-LE", "memcheck"]);
    let text = expect_success("ctest", &run("ctest", &mut test, NEEDS));
    assert!(
        text.contains("100% tests passed")
            && text.contains("test_decode_cpp_static")
            && text.contains("test_model_c_static")
            && text.contains("test_error_paths_static")
            && text.contains("test_bindings_cpp_static"),
        "unexpected ctest output:\n{text}"
    );

    // The same programs under valgrind memcheck; valgrind runs one thread
    // at a time, so the programs run side by side.
    if valgrind.is_none() {
        println!("SKIPPED memcheck: valgrind not found (install it or set VALGRIND)");
        return;
    }
    let started = Instant::now();
    let mut memcheck = Command::new(&ctest);
    memcheck
        .current_dir(&build)
        .env_remove("LD_LIBRARY_PATH")
        .args(["--output-on-failure", "--timeout", "600", "-L", "memcheck"])
        .arg("--parallel")
        .arg(jobs.to_string());
    let text = expect_success("ctest -L memcheck", &run("ctest", &mut memcheck, NEEDS));
    for name in MEMCHECK_TESTS {
        assert!(
            text.contains(&format!("memcheck_{name} ")),
            "memcheck_{name} did not run:\n{text}"
        );
    }
    assert!(
        text.contains("100% tests passed"),
        "unexpected ctest output:\n{text}"
    );
    println!(
        "memcheck: {} programs under valgrind in {:.1} s",
        MEMCHECK_TESTS.len(),
        started.elapsed().as_secs_f64()
    );
}
