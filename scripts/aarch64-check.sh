#!/usr/bin/env bash
# Builds mlart for aarch64 Linux and runs the CPU reference suites there
# under qemu-user (the scalar kernel is the only one off x86-64). Installs
# the cross toolchain, qemu and the Rust target when missing (Debian/Ubuntu).
# Takes a few minutes; not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    apt-get install -y -qq gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user
fi
rustup target list --installed | grep -q aarch64-unknown-linux-gnu ||
    rustup target add aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
cargo check --target aarch64-unknown-linux-gnu --all-targets
cargo test --target aarch64-unknown-linux-gnu --lib \
    --test decode_reference --test sparse_reference --test cpu_isa --test fp8_format --test kv_pool
