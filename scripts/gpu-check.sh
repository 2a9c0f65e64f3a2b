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
#                                python3 + torch but no Rust) runs, in order:
#     1. GPU checks: the GPU test suite with the mma.sync kernels, then with
#        the Hopper wgmma ones (MLART_CUDA_WGMMA=1; it also runs the model's
#        projections and the V3.2 indexer on the GPU), the unit and C-ABI
#        tests that need a device, the Python binding's device arrays (its
#        tests_cuda suite, and torch tensors: tests_cuda/torch_smoke.py);
#     2. host-CPU checks (its Xeon has AMX-BF16): the AMX tiles against their
#        software model, the reference suites forced to the amx kernel, the
#        model's GEMM on AMX (verified on a 2-core Xeon in the nineteenth
#        session and on by default since; checked again on this host);
#     3. GPU figures: torch's copy bandwidth and bf16 matmul rate, then
#        `mlart bench --cuda` (both kinds; decode, projections, indexer)
#        against them, and V3 / V3.2 layers on a GPU engine;
#     4. host-CPU figures: amx vs avx512 decode, prefill with and without AMX.
#   It writes $OUT/gpu-check.txt and $OUT/bench-*.json, and ends by a
#   deadline (GPU_CHECK_SECONDS, default 540 s): steps that do not fit are
#   skipped by name, so one call answers the checks first.
#
# Device tool call: command "bash scripts/gpu-check.sh run", carry
# ["target/gpu.tar.xz"], timeout_s 600 (`run` unpacks it; carrying
# ["target/gpu"] works too). `run gpu` and `run cpu` run one half each
# (steps 1 and 3, or 2 and 4; the CPU half logs gpu-check-cpu.txt).
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
    cp target/release/mlart target/release/libmlart.so "$g/"
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

# The whole run ends by a deadline (GPU_CHECK_SECONDS, default 540: the
# device tool allows 600 s per call and 15 minutes of device time per
# session, machine start included). Each phase ends by its share of it
# (`phase_end`: the checks by 5/9, the GPU's figures by 8/9), so a slow phase
# cannot starve the ones after it. `tmo N cmd` is `timeout N cmd` capped by
# what is left of the phase; a step begun with under 10 s left is skipped
# and says so in the log (fd 3, past any `| grep`).
total=${GPU_CHECK_SECONDS:-540}
deadline=$(( SECONDS + total ))
phase_end=$deadline
tmo() {
    local want=$1; shift
    local left=$(( phase_end - SECONDS ))
    if [ "$left" -lt 10 ]; then
        echo "SKIPPED (out of time, GPU_CHECK_SECONDS=$total): ${1##*/} ${*:2}" >&3
        return 124
    fi
    [ "$want" -gt "$left" ] && want=$left
    timeout "$want" "$@"
}

# Unpacks the carried bundle, unless the binaries are there already.
unpack() {
    if [ ! -x "$g/mlart" ] && [ -f target/gpu.tar.xz ]; then
        tar -C target -xJf target/gpu.tar.xz
    fi
}

# The GPU half's checks: the GPU suite (both kinds of 64-row kernel), the
# unit and C-ABI tests with a device.
run_gpu_checks() {
    echo "== gpu"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    echo "== mlart info"; tmo 60 "$g/mlart" info 2>&1
    echo "== GPU test suite (CUDA vs CPU engine), mma.sync kernels (MLART_CUDA_WGMMA=0)"
    MLART_CUDA_WGMMA=0 tmo 300 "$g/cuda_decode" 2>&1 | tail -40
    # Both kinds of 64-row kernel, whichever is the build's default
    # (WGMMA_BY_DEFAULT; off until this run verifies wgmma).
    echo "== GPU test suite with the wgmma kernels (MLART_CUDA_WGMMA=1)"
    MLART_CUDA_WGMMA=1 tmo 200 "$g/cuda_decode" 2>&1 | tail -40
    echo "== unit tests that touch the driver, the fatbin and the plan"
    tmo 60 "$g/unit" cuda 2>&1 | grep -E "^test |test result|panicked" | head -40
    echo "== C-ABI error tests with a device present"
    tmo 60 "$g/decode_errors" 2>&1 | grep -E "test result|panicked|FAILED" | head -20
    # The Python binding's device-array suite (written for the emulated
    # driver) with the real one, then torch's own CUDA tensors through
    # __cuda_array_interface__ on torch's stream.
    echo "== Python binding: CUDA device arrays (tests_cuda), then torch tensors (torch_smoke.py)"
    local ck lib="$PWD/$g/libmlart.so"
    ck=$(mktemp -d)
    tmo 60 "$g/mlart" gen-model --preset small --layers 1 "$ck/small" > /dev/null 2>&1
    (cd bindings/python && MLART_LIBRARY="$lib" MLART_TEST_CUDA=1 MLART_TEST_SMALL_MODEL_DIR="$ck/small" \
        PYTHONDONTWRITEBYTECODE=1 tmo 120 python3 -m unittest discover -s tests_cuda 2>&1 | tail -6)
    (cd bindings/python && MLART_LIBRARY="$lib" PYTHONDONTWRITEBYTECODE=1 \
        tmo 120 python3 tests_cuda/torch_smoke.py 2>&1 | tail -8)
    rm -rf "$ck"
}

# The GPU half's figures: torch's ceilings, `mlart bench --cuda` (both kinds)
# and whole layers on a GPU engine.
run_gpu_bench() {
    echo "== ceilings (torch)"
    tmo 120 python3 - <<'PY' 2>&1 | tee "$out/torch-ceilings.txt"
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
    MLART_CUDA_WGMMA=0 tmo 240 "$g/mlart" bench --cuda ${mm:+--matmul-tflops $mm} --json "$out/bench-cuda.json" 2>&1
    echo "== mlart bench --cuda, wgmma kernels (MLART_CUDA_WGMMA=1)"
    MLART_CUDA_WGMMA=1 tmo 180 "$g/mlart" bench --cuda ${mm:+--matmul-tflops $mm} \
        --json "$out/bench-cuda-wgmma.json" 2>&1
    # One V3 layer (FP8 weights) on a GPU engine, its projections on the CPU
    # (the default until verified) and on the GPU (MLART_CUDA_PROJECTIONS=1,
    # where the whole layer then stays on the device: model::resident):
    # batch-1 decode's weight stream against the ruler of each.
    ck=$(mktemp -d)
    tmo 120 "$g/mlart" gen-model --preset v3 --layers 1 --dtype fp8 "$ck/v3" > /dev/null 2>&1
    # Batched decode steps too: on the host's CPU threads (projections 0)
    # and on the GPU (1), where a batch of 64 still streams each weight once.
    for proj in 0 1; do
        batches=1,16
        [ $proj = 1 ] && batches=1,16,64
        echo "== one V3 layer on the GPU engine, MLART_CUDA_PROJECTIONS=$proj: bench --model --batch $batches, then run"
        MLART_BACKEND=cuda MLART_CUDA_PROJECTIONS=$proj tmo 120 "$g/mlart" bench --model "$ck/v3" \
            --prompt 256 --batch $batches 2>&1 | grep -vE "^loading|^\s*$"
        MLART_BACKEND=cuda MLART_CUDA_PROJECTIONS=$proj tmo 120 "$g/mlart" run --model "$ck/v3" \
            --prompt 512 --decode 16 2>&1 | grep -E "loaded|prefill|decode:"
    done
    # One V3.2 layer with everything on the GPU: the indexer's projections,
    # row steps, scores and top-k (kernels/mla_index*.cuh) at a context of
    # 16384, where a decode step scores 16384 keys and attends to 2048.
    tmo 120 "$g/mlart" gen-model --preset v3.2 --layers 1 --dtype fp8 "$ck/v32" > /dev/null 2>&1
    echo "== one V3.2 layer on the GPU engine, MLART_CUDA_PROJECTIONS=1: bench --model at 16384"
    MLART_BACKEND=cuda MLART_CUDA_PROJECTIONS=1 tmo 180 "$g/mlart" bench --model "$ck/v32" \
        --prompt 16384 2>&1 | grep -vE "^loading|^\s*$"
    rm -rf "$ck"
}

# The host-CPU half's checks: AMX tiles and kernels against their references
# (skipped without AMX-BF16).
run_cpu_checks() {
    echo "== host CPU: AMX tiles vs their software model, then the amx kernel vs the f64 reference"
    if grep -q amx_bf16 /proc/cpuinfo; then
        tmo 100 "$g/unit" amx --include-ignored 2>&1 | grep -E "^test |test result|panicked" | head -12
        MLART_CPU_ISA=amx tmo 200 "$g/cpu_isa" 2>&1 | grep -E "test result|panicked|FAILED" | head -8
        tmo 300 "$g/decode_reference" amx_kernel --nocapture 2>&1 \
            | grep -E "^amx_kernel|test result|panicked" | head -5
        tmo 300 "$g/sparse_reference" every_kernel_variant --nocapture 2>&1 \
            | grep -E "\(amx\)|test result|panicked" | head -5
        for t in decode_reference sparse_reference; do
            MLART_CPU_ISA=amx tmo 200 "$g/$t" 2>&1 | grep -E "test result|panicked|FAILED" | head -5
        done
        # The projections use the bf16 GEMM (on AMX, the default where
        # present) at the avx512bf16 level, which AUTO's amx kernel and the
        # forced avx512bf16 one both give.
        echo "== host CPU: the model's prefill GEMM on AMX (MLART_AMX_GEMM=1) vs the f64 references"
        MLART_AMX_GEMM=1 tmo 200 "$g/unit" model:: 2>&1 | grep -E "test result|panicked|FAILED" | head -5
        MLART_CPU_ISA=avx512bf16 MLART_AMX_GEMM=1 tmo 300 "$g/model" 2>&1 \
            | grep -E "test result|panicked|FAILED" | head -5
    else
        echo "skipped: this host CPU has no AMX-BF16"
    fi
}

# The host-CPU half's figures: amx against avx512 decode, and prefill with
# the projections' GEMM on AMX and without.
run_cpu_bench() {
    if grep -q amx_bf16 /proc/cpuinfo; then
        pts=128:1:4096:1:bf16:dense,128:1:16384:8:bf16:dense,128:1:16384:1:fp8_v32:2048,16:1:16384:8:bf16:dense
        for isa in amx avx512; do
            echo "== bench $isa"
            MLART_CPU_ISA=$isa tmo 120 "$g/mlart" bench --no-scalar --seconds 0.5 \
                --points $pts --json "$out/bench-cpu-$isa.json" 2>&1 | grep -vE "^\s*$|^point"
        done
        ck=$(mktemp -d)
        for dt in bf16 fp8; do
            tmo 120 "$g/mlart" gen-model --preset v3 --layers 1 --dtype $dt "$ck/$dt" > /dev/null 2>&1
            for amx in 0 1; do
                for act in precise bf16; do
                    echo "== prefill 256 tokens, one V3 layer, $dt weights, MLART_AMX_GEMM=$amx, --activations $act"
                    MLART_CPU_ISA=avx512bf16 MLART_AMX_GEMM=$amx tmo 120 \
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
    # `run gpu` / `run cpu`: one half, each in the whole deadline (the CPU
    # half logs gpu-check-cpu.txt).
    case "${1:-all}" in
        gpu) ;;
        cpu) log="$out/gpu-check-cpu.txt" ;;
        all) ;;
        *) echo "usage: scripts/gpu-check.sh run [gpu|cpu|all]" >&2; exit 2 ;;
    esac
    {
        exec 3>&1
        echo "== date"; date -u
        # Checks before figures, the GPU before the host CPU: what decides the
        # build's defaults (engine::AUTO_USES_CUDA, WGMMA_BY_DEFAULT,
        # GPU_PROJECTIONS_BY_DEFAULT) runs first, so a run
        # cut short by its deadline still answers it.
        phase_end=$(( deadline - total * 4 / 9 ))
        if [ "${1:-all}" != cpu ]; then run_gpu_checks; fi
        if [ "${1:-all}" != gpu ]; then run_cpu_checks; fi
        phase_end=$deadline
        [ "${1:-all}" = all ] && phase_end=$(( deadline - total / 9 ))
        if [ "${1:-all}" != cpu ]; then run_gpu_bench; fi
        phase_end=$deadline
        if [ "${1:-all}" != gpu ]; then run_cpu_bench; fi
        echo "== end: $SECONDS s used of the $total s deadline"
    } > "$log" 2>&1
    cat "$log"
}

case "${1:-}" in
    build) build ;;
    run) run "${2:-all}" ;;
    *) echo "usage: scripts/gpu-check.sh build|run [gpu|cpu|all]" >&2; exit 2 ;;
esac
