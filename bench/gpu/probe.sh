#!/usr/bin/env bash
# One-shot probe of the lent GPU machine, run through the device tool with
# target/release/mlart carried from the development machine:
#  - what the machine is (OS, glibc, driver, GPU, python/torch, nvcc),
#  - whether a binary built on the development machine runs there,
#  - the GPU's ceilings measured with torch: device copy bandwidth and
#    bf16 matmul rate (the rulers the CUDA backend's figures will use).
# Writes everything to $OUT/probe.txt.
set -u
out="${OUT:-.}/probe.txt"
{
  echo "== date"; date -u
  echo "== os"; cat /etc/os-release 2>/dev/null | head -4; uname -r
  echo "== glibc"; ldd --version 2>&1 | head -1
  echo "== cpu"; nproc; grep -m1 "model name" /proc/cpuinfo
  echo "== nvidia-smi"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  nvidia-smi 2>&1 | head -5
  echo "== libcuda"; ls -la /usr/lib/x86_64-linux-gnu/libcuda.so* 2>&1 | head -3; ldconfig -p 2>/dev/null | grep -m2 libcuda
  echo "== nvcc"; (command -v nvcc && nvcc --version | tail -2) 2>&1
  echo "== python/torch"; python3 -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>&1
  echo "== mlart (built on the development machine)"
  ldd target/release/mlart 2>&1
  timeout 60 ./target/release/mlart info 2>&1
  timeout 120 ./target/release/mlart bench --quick --seconds 0.2 --no-scalar 2>&1 | tail -8
  echo "== gpu ceilings (torch)"
  timeout 180 python3 - <<'PY' 2>&1
import torch, time
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
print(f"device copy: {2 * n / t / 1e9:.0f} GB/s (read+write, 1 GiB buffers, median of 20)")
x = torch.empty(n // 4, dtype=torch.float32, device=d)
t = timed(lambda: x.sum())
print(f"device read (sum): {n / t / 1e9:.0f} GB/s")
for m in (8192,):
    A = torch.randn(m, m, dtype=torch.bfloat16, device=d); B = torch.randn(m, m, dtype=torch.bfloat16, device=d)
    t = timed(lambda: A @ B, reps=10)
    print(f"bf16 matmul {m}^3: {2 * m**3 / t / 1e12:.0f} TFLOP/s")
print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
PY
} > "$out" 2>&1
cat "$out"
