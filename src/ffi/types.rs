//! Enumerations and version constants of the C ABI.
//!
//! Enumerations are `uint32_t` typedefs with `#define`d values rather than C
//! `enum`s: their size is fixed across compilers, and a value a host makes up
//! can be rejected with an error instead of being undefined behaviour on the
//! Rust side. Values are stable and only ever appended.

/// Library version, major part. Checked against Cargo.toml by the tests.
pub const MLART_VERSION_MAJOR: u32 = 0;
/// Library version, minor part.
pub const MLART_VERSION_MINOR: u32 = 6;
/// Library version, patch part.
pub const MLART_VERSION_PATCH: u32 = 0;
/// ABI version: changes only on an incompatible change of this header; it is
/// the number in the shared library's SONAME (`libmlart.so.<ABI>`).
pub const MLART_ABI_VERSION: u32 = 0;

/// Status of a failed call (`mlart_error_code`). Stable, append-only.
pub type mlart_status = u32;
/// No error (`mlart_error_code(NULL)`).
pub const MLART_STATUS_OK: mlart_status = 0;
/// An argument has a bad value (the message names it and the value).
pub const MLART_STATUS_INVALID_ARGUMENT: mlart_status = 1;
/// A required pointer argument is NULL.
pub const MLART_STATUS_NULL_POINTER: mlart_status = 2;
/// Memory could not be allocated.
pub const MLART_STATUS_OUT_OF_MEMORY: mlart_status = 3;
/// The KV pool has no free block left; nothing was changed.
pub const MLART_STATUS_POOL_EXHAUSTED: mlart_status = 4;
/// Valid, but not supported by this build, backend or hardware.
pub const MLART_STATUS_UNSUPPORTED: mlart_status = 5;
/// A GPU driver or device error.
pub const MLART_STATUS_DEVICE: mlart_status = 6;
/// A file could not be read.
pub const MLART_STATUS_IO: mlart_status = 7;
/// A file's contents are malformed.
pub const MLART_STATUS_FORMAT: mlart_status = 8;
/// A named object (sequence, tensor, device) does not exist.
pub const MLART_STATUS_NOT_FOUND: mlart_status = 9;
/// A progress callback asked to stop.
pub const MLART_STATUS_CANCELLED: mlart_status = 10;
/// A bug inside mlart (a caught panic); the message says where.
pub const MLART_STATUS_INTERNAL: mlart_status = 11;

/// Element type of queries, outputs and appended rows.
pub type mlart_dtype = u32;
/// IEEE binary32.
pub const MLART_DTYPE_F32: mlart_dtype = 0;
/// bfloat16.
pub const MLART_DTYPE_BF16: mlart_dtype = 1;
/// IEEE binary16.
pub const MLART_DTYPE_F16: mlart_dtype = 2;
/// OCP FP8 E4M3 (weights and KV caches only, not activations).
pub const MLART_DTYPE_FP8_E4M3: mlart_dtype = 3;

/// Layout of one KV-cache row (one token; V is the first d_v elements).
pub type mlart_kv_format = u32;
/// d_qk x bfloat16.
pub const MLART_KV_FORMAT_BF16: mlart_kv_format = 0;
/// d_qk x float16.
pub const MLART_KV_FORMAT_F16: mlart_kv_format = 1;
/// d_qk x float32 (reference/debugging).
pub const MLART_KV_FORMAT_F32: mlart_kv_format = 2;
/// FlashMLA V3.2 FP8 layout, d_qk = 576, 656 bytes/token: 512 x e4m3 (4 tiles of
/// 128), 4 x f32 tile scales, 64 x bf16 rope.
pub const MLART_KV_FORMAT_FP8_V32: mlart_kv_format = 3;
/// FlashMLA MODEL1 FP8 layout, d_qk = 512, 584 bytes/token: per block, all rows of
/// [448 x e4m3 (7 tiles of 64), 64 x bf16 rope], then 8 bytes per token (7 ue8m0
/// scales + 1 zero pad), the block padded with zeros to a multiple of 576 bytes.
pub const MLART_KV_FORMAT_FP8_MODEL1: mlart_kv_format = 4;

/// Where the memory behind a pointer lives.
pub type mlart_memory = u32;
/// Ordinary host memory.
pub const MLART_MEMORY_HOST: mlart_memory = 0;
/// Memory of the engine's GPU (CUDA engines only).
pub const MLART_MEMORY_DEVICE: mlart_memory = 1;

/// Which compute backend an engine uses.
pub type mlart_backend = u32;
/// The best available: the CPU in this version (a usable CUDA device is
/// reported in `mlart_engine_info`'s reason, but AUTO chooses it only once
/// the CUDA kernels are verified on hardware). `MLART_BACKEND=cpu|cuda` overrides.
pub const MLART_BACKEND_AUTO: mlart_backend = 0;
/// The CPU (kernel variant from `MLART_CPU_ISA` or detection).
pub const MLART_BACKEND_CPU: mlart_backend = 1;
/// A CUDA GPU, sm_80 (Ampere) or newer, chosen by `device_index`. Without a
/// driver, a device or kernels for it: MLART_STATUS_UNSUPPORTED (or
/// NOT_FOUND for a missing index) naming the cause.
pub const MLART_BACKEND_CUDA: mlart_backend = 2;

/// Whether a CPU engine pins its worker threads to CPUs
/// (`MLART_CPU_AFFINITY=auto|none|pin` overrides). `mlart_engine_info`'s
/// reason says what was done.
pub type mlart_thread_affinity = u32;
/// Pin thread i to the i-th CPU of the process's affinity mask when the
/// pool has exactly one thread per CPU of that mask (the default thread
/// count); otherwise leave the threads to the OS. On a 2-vCPU VM, unpinned
/// idle workers were often scheduled onto one CPU, and a sub-millisecond
/// decode often ran at half speed (75 of 100 traced calls).
pub const MLART_AFFINITY_AUTO: mlart_thread_affinity = 0;
/// Never pin (for hosts that place threads themselves or share the CPUs
/// with other busy work).
pub const MLART_AFFINITY_NONE: mlart_thread_affinity = 1;
/// Always pin, round robin over the CPUs of the process's mask. Linux
/// only; elsewhere the threads stay unpinned and the reason says so.
pub const MLART_AFFINITY_PIN: mlart_thread_affinity = 2;

/// CPU kernel variant (`MLART_CPU_ISA=scalar|avx2|avx512|avx512bf16|amx` forces one).
pub type mlart_cpu_isa = u32;
/// Portable reference kernel.
pub const MLART_CPU_ISA_SCALAR: mlart_cpu_isa = 0;
/// AVX2 + FMA.
pub const MLART_CPU_ISA_AVX2: mlart_cpu_isa = 1;
/// AVX-512F.
pub const MLART_CPU_ISA_AVX512: mlart_cpu_isa = 2;
/// AMX-BF16 tiles.
pub const MLART_CPU_ISA_AMX: mlart_cpu_isa = 3;
/// AVX-512F with AVX512-BF16 dot products (`vdpbf16ps`) for Q·Kᵀ when the
/// queries are bf16 and the cache bf16 or FP8; the AVX-512F path otherwise.
pub const MLART_CPU_ISA_AVX512_BF16: mlart_cpu_isa = 4;

/// How a model's projections (q_a, q_b or q_proj, kv_a, o_proj) take
/// their activations.
pub type mlart_activations = u32;
/// As f32 (default). Where bf16 units do the products, each activation is
/// split into two bf16, which keeps about 16 of its bits. Activations that
/// are bf16 values already (bf16 hidden states) take the faster path of
/// MLART_ACTIVATIONS_BF16 with identical results.
pub const MLART_ACTIVATIONS_PRECISE: mlart_activations = 0;
/// Rounded to bf16 (nearest even) before each projection, as DeepSeek's
/// reference implementation runs them: the prefill projections then do
/// half the products on bf16 units (a V3 prefill measured 1.3-1.4x
/// faster). The absorbed W_UK / W_UV products and the attention are
/// unchanged.
pub const MLART_ACTIVATIONS_BF16: mlart_activations = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuIsa;
    use crate::error::Status;

    #[test]
    fn version_matches_cargo_toml() {
        assert_eq!(
            MLART_VERSION_MAJOR.to_string(),
            env!("CARGO_PKG_VERSION_MAJOR")
        );
        assert_eq!(
            MLART_VERSION_MINOR.to_string(),
            env!("CARGO_PKG_VERSION_MINOR")
        );
        assert_eq!(
            MLART_VERSION_PATCH.to_string(),
            env!("CARGO_PKG_VERSION_PATCH")
        );
        assert_eq!(
            MLART_ABI_VERSION.to_string(),
            env!("CARGO_PKG_VERSION_MAJOR")
        );
    }

    #[test]
    fn c_constants_match_rust_enums() {
        assert_eq!(
            MLART_STATUS_INVALID_ARGUMENT,
            Status::InvalidArgument as u32
        );
        assert_eq!(MLART_STATUS_POOL_EXHAUSTED, Status::PoolExhausted as u32);
        assert_eq!(MLART_STATUS_INTERNAL, Status::Internal as u32);
        assert_eq!(MLART_CPU_ISA_AVX512, CpuIsa::Avx512.raw());
        assert_eq!(MLART_CPU_ISA_AMX, CpuIsa::Amx.raw());
        assert_eq!(MLART_CPU_ISA_AVX512_BF16, CpuIsa::Avx512Bf16.raw());
    }
}
