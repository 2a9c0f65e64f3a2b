//! Builds and runs the C / C++ test suite in `tests/c` (the C++ binding's
//! test, `test_bindings.cpp`, included) against the
//! `libmlart.so` and `libmlart.a` cargo built for this test run, with a tiny
//! random-weight checkpoint (for `test_model.c`) generated into the build
//! directory first.
//!
//! Needs CMake (>= 3.16, `cmake` and `ctest` on PATH, or the `CMAKE` and
//! `CTEST` environment variables) and a C11 / C++17 compiler. Without them
//! the test fails: it never passes without having run the C programs.

mod host;

use host::{expect_success, library_dir, run, tiny_checkpoint, tool};
use std::path::Path;
use std::process::Command;

const NEEDS: &str = "The C/C++ tests need CMake (>= 3.16) with ctest, and a C11/C++17 \
     compiler; install them (e.g. `apt-get install cmake g++`) or point the CMAKE / CTEST \
     environment variables at them.";

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
        .args(["--output-on-failure", "--timeout", "300"]);
    let text = expect_success("ctest", &run("ctest", &mut test, NEEDS));
    assert!(
        text.contains("100% tests passed")
            && text.contains("test_decode_cpp_static")
            && text.contains("test_model_c_static")
            && text.contains("test_bindings_cpp_static"),
        "unexpected ctest output:\n{text}"
    );
}
