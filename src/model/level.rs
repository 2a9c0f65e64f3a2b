//! Which vector code the model's projections run.
//!
//! Chosen once per model from the engine's CPU kernel variant, so
//! `MLART_CPU_ISA` forces it too (and the tests cover every variant on one
//! machine), and never above what the CPU has.

use crate::backend::cpu::CpuIsa;
use crate::backend::{BackendInfo, BackendKind};
use once_cell::sync::Lazy;

/// The model's vector code, from slowest to fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust.
    Portable,
    /// AVX2 + FMA + F16C, 8 lanes.
    Avx2,
    /// AVX-512F + F16C, 16 lanes.
    Avx512,
    /// AVX-512 plus AVX512-BF16 and VBMI: FP8 dot products and the prefill
    /// GEMM on `vdpbf16ps` (on AMX tiles where the CPU has them).
    Avx512Bf16,
}

static BEST: Lazy<Level> = Lazy::new(|| {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        let avx512 = has!("avx512f") && has!("f16c");
        if avx512 && has!("avx512bw") && has!("avx512vbmi") && has!("avx512bf16") {
            return Level::Avx512Bf16;
        }
        if avx512 {
            return Level::Avx512;
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            return Level::Avx2;
        }
    }
    Level::Portable
});

impl Level {
    /// The fastest this CPU runs.
    pub fn best() -> Level {
        *BEST
    }

    /// For an engine: its CPU kernel variant (`scalar` → portable, `avx2`,
    /// `avx512`, `avx512bf16` or `amx` → the bf16 level), capped by the CPU.
    /// Engines on a GPU run the projections on the CPU at its best.
    pub fn for_engine(info: &BackendInfo) -> Level {
        if info.kind != BackendKind::Cpu {
            return Level::best();
        }
        Level::for_isa(info.cpu_isa)
    }

    /// [`Self::for_engine`] for a CPU kernel variant.
    pub fn for_isa(isa: CpuIsa) -> Level {
        let wanted = match isa {
            CpuIsa::Scalar => Level::Portable,
            CpuIsa::Avx2 => Level::Avx2,
            CpuIsa::Avx512 => Level::Avx512,
            CpuIsa::Avx512Bf16 | CpuIsa::Amx => Level::Avx512Bf16,
        };
        wanted.min(Level::best())
    }

    /// Every level this CPU runs, slowest first (for tests).
    #[cfg(test)]
    pub fn available() -> Vec<Level> {
        [
            Level::Portable,
            Level::Avx2,
            Level::Avx512,
            Level::Avx512Bf16,
        ]
        .into_iter()
        .filter(|&l| l <= Level::best())
        .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Avx512Bf16 => "avx512bf16",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_variants_map_and_are_capped() {
        assert_eq!(Level::for_isa(CpuIsa::Scalar), Level::Portable);
        for isa in CpuIsa::ALL {
            assert!(Level::for_isa(isa) <= Level::best());
        }
        assert_eq!(Level::for_isa(CpuIsa::Avx2), Level::Avx2.min(Level::best()));
        let all = Level::available();
        assert_eq!(all.first(), Some(&Level::Portable));
        assert_eq!(all.last(), Some(&Level::best()));
    }
}
