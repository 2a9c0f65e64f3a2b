#!/usr/bin/env bash
# mlart against its CPU peers on the issue's decode shapes, in one run:
#   numpy   fp32 cache, OpenBLAS GEMMs            (bench/peers/numpy_mla.py)
#   llama.cpp's CPU flash attention, f16 cache    (bench/peers/ggml_mla.c)
#   mlart bench, bf16 cache, each ISA listed in MLART_PEER_ISAS
# Rounds alternate the three so that each sees the machine in the same states;
# the summary takes medians over rounds and prints mlart's speed-up over each.
#
#   bash bench/peers/run.sh [OUT_PREFIX]
# Environment: PEER_ROUNDS (3), PEER_SECONDS (2 per point and peer),
# PEER_THREADS (all CPUs), PEER_POINTS (h_q:N:batch,...), MLART_PEER_ISAS
# ("auto avx512"). Writes OUT_PREFIX.jsonl (every measurement) and
# OUT_PREFIX.md (the summary); OUT_PREFIX defaults to target/peers/result.
#
# Needs network access to PyPI once: numpy's wheel and llama.cpp's sources (the
# llama-cpp-python sdist vendors them) are fetched into target/peers.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=$root/target/peers
out=${1:-$work/result}
rounds=${PEER_ROUNDS:-3}
seconds=${PEER_SECONDS:-2}
threads=${PEER_THREADS:-$(nproc)}
points=${PEER_POINTS:-128:4096:1,128:16384:1,128:4096:8,128:16384:8,16:16384:8}
isas=${MLART_PEER_ISAS:-auto avx512}
numpy_version=2.4.6
llama_version=0.3.36  # llama-cpp-python, which vendors llama.cpp and its ggml
mkdir -p "$work" "$(dirname "$out")"

if [ ! -x "$work/venv/bin/python" ]; then
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install -q "numpy==$numpy_version"
fi
src=$work/llama_cpp_python-$llama_version/vendor/llama.cpp
if [ ! -d "$src/ggml" ]; then
    "$work/venv/bin/pip" download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$llama_version"
    tar -xzf "$work/llama_cpp_python-$llama_version.tar.gz" -C "$work"
fi
if [ ! -f "$work/ggml-build/ggml/src/libggml-cpu.a" ]; then
    cmake -S "$src" -B "$work/ggml-build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$work/ggml-cmake.log" 2>&1
    cmake --build "$work/ggml-build" -j "$(nproc)" --target ggml ggml-cpu > "$work/ggml-build.log" 2>&1
fi
lib=$work/ggml-build/ggml/src
gcc -O2 -Wall -o "$work/ggml_mla" bench/peers/ggml_mla.c -I"$src/ggml/include" \
    "$lib/libggml.a" "$lib/libggml-cpu.a" "$lib/libggml-base.a" -lstdc++ -fopenmp -lm -lpthread
cargo build --release --quiet --bin mlart

mlart_points=$(echo "$points" | tr ',' '\n' | awk -F: '{printf "%s%s:1:%s:%s:bf16:dense", (NR > 1 ? "," : ""), $1, $2, $3}')
: > "$out.jsonl"
export OPENBLAS_NUM_THREADS=$threads OMP_NUM_THREADS=$threads
for r in $(seq 1 "$rounds"); do
    echo "round $r/$rounds" >&2
    for isa in $isas; do
        if [ "$isa" = auto ]; then unset MLART_CPU_ISA; else export MLART_CPU_ISA=$isa; fi
        ./target/release/mlart bench --threads "$threads" --no-scalar --seconds "$seconds" \
            --points "$mlart_points" --json "$work/mlart.json" > "$work/mlart-$isa.txt"
        unset MLART_CPU_ISA
        "$work/venv/bin/python" - "$work/mlart.json" "$isa" "$r" >> "$out.jsonl" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for p in d["points"]:
    print(json.dumps({"peer": "mlart " + d["cpu_isa"], "isa_asked": sys.argv[2], "round": int(sys.argv[3]),
                      "kv": p["kv_format"], "h_q": p["h_q"], "s_q": p["s_q"], "n": p["seqlen"],
                      "batch": p["batch"], "median_ms": p["seconds"] * 1e3, "gflops": p["gflops"],
                      "bound": p["bound"], "fraction_of_ceiling": p["fraction_of_ceiling"],
                      "fraction_of_paired_peak": p.get("fraction_of_paired_peak"),
                      "ceilings": d["ceilings"]["used"]}))
EOF
    done
    "$work/venv/bin/python" bench/peers/numpy_mla.py --points "$points" --seconds "$seconds" |
        sed "s/^{/{\"round\": $r, /" >> "$out.jsonl"
    "$work/ggml_mla" --threads "$threads" --seconds "$seconds" --points "$points" |
        sed "s/^{/{\"round\": $r, /" >> "$out.jsonl"
done
"$work/venv/bin/python" bench/peers/summarise.py "$out.jsonl" | tee "$out.md"
