#!/usr/bin/env bash
# Installs nvcc 13.0.x from NVIDIA's PyPI wheels into .cuda/ (git-ignored), so
# the kernels in kernels/ build on a machine with no CUDA installed. 13.0
# matches the driver of the GPU machines we test on; SASS and compute_80 PTX
# from it run on any driver that supports CUDA 13.0 or newer.
#
#   scripts/cuda-toolchain.sh            # installs if missing, prints the folder
#   CUDA_HOME=$(scripts/cuda-toolchain.sh) cargo build
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${MLART_CUDA_TOOLCHAIN:-$root/.cuda}"
ver=13.0.88
stamp="$dest/.installed-$ver"
if [ ! -f "$stamp" ]; then
    rm -rf "$dest.tmp"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$dest.tmp" \
        "nvidia-cuda-nvcc==$ver" "nvidia-nvvm==$ver" "nvidia-cuda-crt==$ver" \
        "nvidia-cuda-runtime==$ver" "nvidia-cuda-cccl==13.0.85" >&2
    # The wheels share one tree: nvidia/cu13/{bin,include,lib,nvvm}.
    tree=$(dirname "$(find "$dest.tmp" -type f -name nvcc -path '*/bin/*' | head -1)")/..
    tree=$(cd "$tree" && pwd)
    rm -rf "$dest"
    mv "$tree" "$dest.new"
    rm -rf "$dest.tmp"
    mv "$dest.new" "$dest"
    # nvcc links from lib64/; the wheels ship lib/.
    [ -e "$dest/lib64" ] || ln -s lib "$dest/lib64"
    chmod +x "$dest"/bin/* "$dest"/nvvm/bin/* 2>/dev/null || true
    touch "$stamp"
fi
"$dest/bin/nvcc" --version >&2
echo "$dest"
