#!/usr/bin/env bash
# Runs the tests of the C ABI's unsafe code under Miri, which reports
# undefined behaviour (aliasing, out-of-bounds, use-after-free, data races)
# that the tests themselves cannot see. It found that `slice_mut` derived a
# `&mut [T]` from a shared slice (fixed). Miri runs the scalar kernel (no
# CPUID, no SIMD) and no CUDA driver.
#
# Flags: tree borrows, because crossbeam-epoch (under rayon) breaks the
# stricter stacked-borrows rules; leaks ignored, because rayon's worker
# threads keep crossbeam thread-locals alive at exit.
#
# Needs a nightly toolchain with the miri component; installs it when
# missing, and reports the whole step as SKIPPED by name when it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo +nightly miri --version >/dev/null 2>&1; then
    if ! rustup toolchain install nightly --profile minimal --component miri,rust-src >/dev/null 2>&1 ||
        ! cargo +nightly miri --version >/dev/null 2>&1; then
        echo "SKIPPED miri: no nightly toolchain with miri, and rustup could not install one"
        exit 0
    fi
fi
cargo +nightly miri --version
unset MLART_REQUIRE_CUDA_KERNELS
export MLART_NO_CUDA_KERNELS=1
export MIRIFLAGS="-Zmiri-disable-isolation -Zmiri-tree-borrows -Zmiri-ignore-leaks"
# The FFI layer's unit tests, and the C ABI's error-path suite, which
# passes every kind of bad pointer, size, overlap and struct version
# (about 10 minutes under Miri). The kernels' own suites are far too slow
# to interpret.
cargo +nightly miri test --lib -- ffi::
# The GEMMs' tasks write their own columns of one output through a raw
# pointer (model::columns): on four worker threads, Miri's race detector
# sees any two tasks writing one element (checked by letting a task write
# one column too many).
RAYON_NUM_THREADS=4 cargo +nightly miri test --lib -- model::columns::
cargo +nightly miri test --test decode_errors
