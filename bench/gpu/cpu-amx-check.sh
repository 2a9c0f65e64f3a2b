#!/usr/bin/env bash
# CPU kernel check on the GPU machine's host CPU (Intel Xeon with AMX-BF16,
# which the development machine lacks). Needs target/gpu/{cpu_isa,
# decode_reference,sparse_reference,mlart} built on the development machine
# (release test binaries, stripped) and carried by the device tool.
# Writes $OUT/cpu-amx-check.txt.
set -u
out="${OUT:-.}/cpu-amx-check.txt"
g=target/gpu
{
  echo "== date"; date -u
  echo "== info"; $g/mlart info
  echo "== every CPU variant vs the f64 reference (amx included here)"
  timeout 300 $g/cpu_isa --nocapture 2>&1 | grep -E "cases|available|test result|panicked|rel-L2|split"
  for isa in amx avx512bf16; do
    echo "== decode and sparse reference suites forced to $isa"
    MLART_CPU_ISA=$isa timeout 300 $g/decode_reference 2>&1 | grep -E "test result|panicked|FAILED"
    MLART_CPU_ISA=$isa timeout 300 $g/sparse_reference 2>&1 | grep -E "test result|panicked|FAILED"
  done
  pts=128:1:4096:1:bf16:dense,128:1:16384:8:bf16:dense,128:1:16384:1:fp8_v32:2048,16:1:16384:8:bf16:dense
  for isa in amx avx512bf16 avx512; do
    echo "== bench $isa, $(nproc) threads"
    MLART_CPU_ISA=$isa timeout 200 $g/mlart bench --no-scalar --seconds 0.5 --points $pts --json "${OUT:-.}/bench-$isa.json" 2>&1 | grep -vE "^\s*$|^point"
  done
} > "$out" 2>&1
cat "$out"
