#!/usr/bin/env bash
# The default CPU bench points on the GPU machine's Xeon host (AMX-BF16),
# for the amx and avx512 kernels, with the AMX peak measured in the run.
# Needs target/gpu/mlart built on the development machine. Writes $OUT.
set -u
for isa in amx avx512; do
  MLART_CPU_ISA=$isa timeout 250 target/gpu/mlart bench --no-scalar --seconds 0.5 \
    --json "${OUT:-.}/bench-$isa.json" 2>/dev/null | tee "${OUT:-.}/bench-$isa.txt"
done
