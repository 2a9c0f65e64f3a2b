#!/usr/bin/env bash
# The CUDA backend's check on a lent GPU machine, in two halves.
#
#   scripts/gpu-check.sh build   (here) builds the release test binaries and
#                                `mlart` with the kernels, strips them into
#                                target/gpu/ and packs that into
#                                target/gpu.tar.xz (carried by the device tool:
#                                ~3 MB, where the binaries, each with its own
#                                copy of the fatbin, are ~60 MB)
#   scripts/gpu-check.sh run     (on the GPU machine, which has the driver and
#                                python3 + torch but no Rust) runs the GPU test
#                                suite (with the mma.sync kernels, then with the
#                                Hopper wgmma ones: MLART_CUDA_WGMMA=1; it also
#                                runs the model's projections on the GPU), the
#                                unit tests that need a device,
#                                `mlart bench --cuda` (both kinds; decode and
#                                projection kernels) against the copy bandwidth
#                                and bf16 matmul rate torch measures in the same
#                                run, and a V3 layer with its projections on the
#                                CPU and on the GPU; then, on its Xeon host (AMX-BF16), the AMX
#                                tiles against their software model, the CPU
#                                reference suites forced to the amx kernel, an
#                                amx vs avx512 bench,
#                                and the model's prefill GEMM on AMX
#                                (MLART_AMX_GEMM=1): its tests and a timing;
#                                writes $OUT/gpu-check.txt and $OUT/bench-*.json
#
# Device tool call: command "bash scripts/gpu-check.sh run", carry
# ["target/gpu.tar.xz"] (`run` unpacks it; carrying ["target/gpu"] works too).
# `run gpu` and `run cpu` run one half each (two calls, if one call's
# 10-minute limit cannot hold both; the CPU half logs gpu-check-cpu.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
g=target/gpu

build() {
    set -e
    CUDA_HOME="$(scripts/cuda-toolchain.sh)"
    export CUDA_HOME MLART_REQUIRE_CUDA_KERNELS=1
    cargo build --release --locked --bin mlart
    # Test executables, found in cargo's JSON messages.
    cargo test --release --locked --no-run --message-format=json 2>/dev/null \
        | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        t = m["target"]
        name = "unit" if {"lib", "rlib"} & set(t["kind"]) else t["name"]
        print(name, m["executable"])
' > target/gpu-tests.txt
    rm -rf "$g" && mkdir -p "$g"
    cp target/release/mlart "$g/"
    while read -r name exe; do
        case "$name" in
            unit|cuda_decode|decode_errors|cpu_isa|decode_reference|sparse_reference|model)
                cp "$exe" "$g/$name" ;;
        esac
    done < target/gpu-tests.txt
    strip "$g"/*
    ls -la "$g"
    du -sh "$g"
    # xz's 64 MiB window sees the binaries' identical fatbins as repeats.
    XZ_OPT=-9 tar -C target -cJf target/gpu.tar.xz gpu
    ls -la target/gpu.tar.xz
}

# Unpacks the carried bundle, unless the binaries are there already.
unpack() {
    if [ ! -x "$g/mlart" ] && [ -f target/gpu.tar.xz ]; then
        tar -C target -xJf target/gpu.tar.xz
    fi
}

# The GPU half: the GPU suite (both kinds of 64-row kernel), the unit and
# C-ABI tests with a device, torch's ceilings and `mlart bench --cuda`.
run_gpu() {
    echo "== gpu"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    echo "== mlart info"; timeout 60 "$g/mlart" info 2>&1
    echo "== GPU test suite (CUDA vs CPU engine), mma.sync kernels (MLART_CUDA_WGMMA=0)"
    MLART_CUDA_WGMMA=0 timeout 300 "$g/cuda_decode" 2>&1 | tail -40
    # Both kinds of 64-row kernel, whichever is the build's default
    # (WGMMA_BY_DEFAULT; off until this run verifies wgmma).
    echo "== GPU test suite with the wgmma kernels (MLART_CUDA_WGMMA=1)"
    MLART_CUDA_WGMMA=1 timeout 200 "$g/cuda_decode" 2>&1 | tail -40
    echo "== unit tests that touch the driver, the fatbin and the plan"
    timeout 60 "$g/unit" cuda 2>&1 | grep -E "^test |test result|panicked" | head -40
    echo "== C-ABI error tests with a device present"
    timeout 60 "$g/decode_errors" 2>&1 | grep -E "test result|panicked|FAILED" | head -20
    echo "== ceilings (torch)"
    timeout 120 python3 - <<'PY' 2>&1 | tee "$out/torch-ceilings.txt"
import torch
d = torch.device("cuda")
def timed(f, reps=20):
    f(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
    ts.sort(); return ts[len(ts) // 2]
n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device=d); b = torch.empty_like(a)
t = timed(lambda: b.copy_(a))
print(f"copy_gbytes_per_s {2 * n / t / 1e9:.0f}")
m = 8192
x = torch.randn(m, m, dtype=torch.bfloat16, device=d); y = torch.randn(m, m, dtype=torch.bfloat16, device=d)
t = timed(lambda: x @ y)
print(f"matmul_tflops {2 * m ** 3 / t / 1e12:.0f}")
PY
    mm=$(awk '/^matmul_tflops/ {print $2}' "$out/torch-ceilings.txt")
    echo "== mlart bench --cuda, mma.sync kernels (MLART_CUDA_WGMMA=0)"
    MLART_CUDA_WGMMA=0 timeout 240 "$g/mlart" bench --cuda ${mm:+--matmul-tflops $mm} --json "$out/bench-cuda.json" 2>&1
    echo "== mlart bench --cuda, wgmma kernels (MLART_CUDA_WGMMA=1)"
    MLART_CUDA_WGMMA=1 timeout 180 "$g/mlart" bench --cuda ${mm:+--matmul-tflops $mm} \
        --json "$out/bench-cuda-wgmma.json" 2>&1
    # One V3 layer (FP8 weights) on a GPU engine, its projections on the CPU
    # (the default until verified) and on the GPU (MLART_CUDA_PROJECTIONS=1,
    # where the whole layer then stays on the device: model::resident):
    # batch-1 decode's weight stream against the ruler of each.
    ck=$(mktemp -d)
    timeout 120 "$g/mlart" gen-model --preset v3 --layers 1 --dtype fp8 "$ck/v3" > /dev/null 2>&1
    for proj in 0 1; do
        echo "== one V3 layer on the GPU engine, MLART_CUDA_PROJECTIONS=$proj: bench --model, then run"
        MLART_BACKEND=cuda MLART_CUDA_PROJECTIONS=$proj timeout 120 "$g/mlart" bench --model "$ck/v3" \
            --prompt 256 2>&1 | grep -vE "^loading|^\s*$"
        MLART_BACKEND=cuda MLART_CUDA_PROJECTIONS=$proj timeout 120 "$g/mlart" run --model "$ck/v3" \
            --prompt 512 --decode 16 2>&1 | grep -E "loaded|prefill|decode:"
    done
    # One V3.2 layer with everything on the GPU: the indexer's projections,
    # row steps, scores and top-k (kernels/mla_index*.cuh) at a context of
    # 16384, where a decode step scores 16384 keys and attends to 2048.
    timeout 120 "$g/mlart" gen-model --preset v3.2 --layers 1 --dtype fp8 "$ck/v32" > /dev/null 2>&1
    echo "== one V3.2 layer on the GPU engine, MLART_CUDA_PROJECTIONS=1: bench --model at 16384"
    MLART_BACKEND=cuda MLART_CUDA_PROJECTIONS=1 timeout 180 "$g/mlart" bench --model "$ck/v32" \
        --prompt 16384 2>&1 | grep -vE "^loading|^\s*$"
    rm -rf "$ck"
}

# The host-CPU half: AMX tiles and kernels (skipped without AMX-BF16).
run_cpu() {
    echo "== host CPU: AMX tiles vs their software model, then the amx kernel vs the f64 reference"
    if grep -q amx_bf16 /proc/cpuinfo; then
        timeout 100 "$g/unit" amx --include-ignored 2>&1 | grep -E "^test |test result|panicked" | head -12
        MLART_CPU_ISA=amx timeout 200 "$g/cpu_isa" 2>&1 | grep -E "test result|panicked|FAILED" | head -8
        timeout 300 "$g/decode_reference" amx_kernel --nocapture 2>&1 \
            | grep -E "^amx_kernel|test result|panicked" | head -5
        timeout 300 "$g/sparse_reference" every_kernel_variant --nocapture 2>&1 \
            | grep -E "\(amx\)|test result|panicked" | head -5
        for t in decode_reference sparse_reference; do
            MLART_CPU_ISA=amx timeout 200 "$g/$t" 2>&1 | grep -E "test result|panicked|FAILED" | head -5
        done
        pts=128:1:4096:1:bf16:dense,128:1:16384:8:bf16:dense,128:1:16384:1:fp8_v32:2048,16:1:16384:8:bf16:dense
        for isa in amx avx512; do
            echo "== bench $isa"
            MLART_CPU_ISA=$isa timeout 120 "$g/mlart" bench --no-scalar --seconds 0.5 \
                --points $pts --json "$out/bench-cpu-$isa.json" 2>&1 | grep -vE "^\s*$|^point"
        done
        # The projections use the bf16 GEMM (and so AMX with MLART_AMX_GEMM=1)
        # only at the avx512bf16 level; AUTO picks avx512 on Intel, so the
        # engines are forced to avx512bf16 (whose attention this host verified).
        echo "== host CPU: the model's prefill GEMM on AMX (MLART_AMX_GEMM=1) vs the f64 references"
        MLART_AMX_GEMM=1 timeout 200 "$g/unit" model:: 2>&1 | grep -E "test result|panicked|FAILED" | head -5
        MLART_CPU_ISA=avx512bf16 MLART_AMX_GEMM=1 timeout 300 "$g/model" 2>&1 \
            | grep -E "test result|panicked|FAILED" | head -5
        ck=$(mktemp -d)
        for dt in bf16 fp8; do
            timeout 120 "$g/mlart" gen-model --preset v3 --layers 1 --dtype $dt "$ck/$dt" > /dev/null 2>&1
            for amx in 0 1; do
                for act in precise bf16; do
                    echo "== prefill 256 tokens, one V3 layer, $dt weights, MLART_AMX_GEMM=$amx, --activations $act"
                    MLART_CPU_ISA=avx512bf16 MLART_AMX_GEMM=$amx timeout 120 \
                        "$g/mlart" run --model "$ck/$dt" --prompt 256 --decode 8 \
                        --activations $act 2>&1 | grep -E "prefill|decode:"
                done
            done
        done
        rm -rf "$ck"
    else
        echo "skipped: this host CPU has no AMX-BF16"
    fi
}

run() {
    unpack
    out="${OUT:-.}"
    log="$out/gpu-check.txt"
    # One half per call fits the device tool's 10-minute limit if both
    # together would not: `run gpu`, then `run cpu` (log gpu-check-cpu.txt).
    case "${1:-all}" in
        gpu) ;;
        cpu) log="$out/gpu-check-cpu.txt" ;;
        all) ;;
        *) echo "usage: scripts/gpu-check.sh run [gpu|cpu|all]" >&2; exit 2 ;;
    esac
    {
        echo "== date"; date -u
        if [ "${1:-all}" != cpu ]; then run_gpu; fi
        if [ "${1:-all}" != gpu ]; then run_cpu; fi
    } > "$log" 2>&1
    cat "$log"
}

case "${1:-}" in
    build) build ;;
    run) run "${2:-all}" ;;
    *) echo "usage: scripts/gpu-check.sh build|run [gpu|cpu|all]" >&2; exit 2 ;;
esac
