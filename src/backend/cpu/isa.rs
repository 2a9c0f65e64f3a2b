//! Run-time CPU feature detection and the choice of kernel variant.

use crate::error::{Error, Result};

/// CPU kernel variants. `raw` is the C `mlart_cpu_isa` (append-only);
/// `rank` orders them from narrowest to widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuIsa {
    Scalar,
    Avx2,
    Avx512,
    Amx,
    /// AVX-512F plus `vdpbf16ps` for Q·Kᵀ when queries and cache are bf16/FP8.
    Avx512Bf16,
}

impl CpuIsa {
    pub const ALL: [CpuIsa; 5] = [
        CpuIsa::Scalar,
        CpuIsa::Avx2,
        CpuIsa::Avx512,
        CpuIsa::Avx512Bf16,
        CpuIsa::Amx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CpuIsa::Scalar => "scalar",
            CpuIsa::Avx2 => "avx2",
            CpuIsa::Avx512 => "avx512",
            CpuIsa::Amx => "amx",
            CpuIsa::Avx512Bf16 => "avx512bf16",
        }
    }

    pub fn raw(self) -> u32 {
        match self {
            CpuIsa::Scalar => 0,
            CpuIsa::Avx2 => 1,
            CpuIsa::Avx512 => 2,
            CpuIsa::Amx => 3,
            CpuIsa::Avx512Bf16 => 4,
        }
    }

    /// Preference order on a CPU with `features`: the faster variant
    /// ranks higher. `vdpbf16ps` runs at twice the FP32 FMA rate on AMD
    /// Zen 4 but at half of it on Intel Xeons (measured: 458 vs 225 and
    /// 689 vs 1400 GFLOP/s), so AVX512-BF16 only outranks AVX-512F on AMD.
    pub fn rank(self, features: &CpuFeatures) -> u32 {
        match self {
            CpuIsa::Scalar => 0,
            CpuIsa::Avx2 => 1,
            CpuIsa::Avx512 => 3,
            CpuIsa::Avx512Bf16 if features.amd => 4,
            CpuIsa::Avx512Bf16 => 2,
            CpuIsa::Amx => 5,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        CpuIsa::ALL
            .into_iter()
            .find(|isa| isa.name() == s.trim().to_ascii_lowercase())
    }
}

/// What the CPU (and OS) support, detected once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    pub avx2_fma: bool,
    pub avx512f: bool,
    pub avx512bf16: bool,
    pub amx_bf16: bool,
    /// CPUID vendor is AMD (decides between AVX512-BF16 and AVX-512F).
    pub amd: bool,
}

impl CpuFeatures {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // AMX is reported by CPUID leaf 7 (EDX bit 22 AMX-BF16, bit 24
            // AMX-TILE); using it also needs the OS permission requested by
            // the AMX kernel itself.
            let amx = {
                let max = std::arch::x86_64::__cpuid(0).eax;
                max >= 7 && {
                    let r = std::arch::x86_64::__cpuid_count(7, 0);
                    (r.edx >> 22) & 1 == 1 && (r.edx >> 24) & 1 == 1
                }
            };
            CpuFeatures {
                avx2_fma: std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma"),
                avx512f: std::is_x86_feature_detected!("avx512f"),
                avx512bf16: std::is_x86_feature_detected!("avx512bf16"),
                amx_bf16: amx,
                amd: {
                    let v = std::arch::x86_64::__cpuid(0);
                    // "AuthenticAMD" in EBX, EDX, ECX.
                    v.ebx == u32::from_le_bytes(*b"Auth")
                        && v.edx == u32::from_le_bytes(*b"enti")
                        && v.ecx == u32::from_le_bytes(*b"cAMD")
                },
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures::default()
        }
    }

    pub fn supports(&self, isa: CpuIsa) -> bool {
        match isa {
            CpuIsa::Scalar => true,
            CpuIsa::Avx2 => self.avx2_fma,
            CpuIsa::Avx512 => self.avx512f,
            CpuIsa::Avx512Bf16 => self.avx512f && self.avx512bf16,
            CpuIsa::Amx => self.amx_bf16 && self.avx512f && self.avx512bf16 && amx_permitted(),
        }
    }

    /// Space-separated list for `mlart info`.
    pub fn describe(&self) -> String {
        let mut v = Vec::new();
        if self.avx2_fma {
            v.push("avx2+fma");
        }
        if self.avx512f {
            v.push("avx512f");
        }
        if self.avx512bf16 {
            v.push("avx512bf16");
        }
        if self.amx_bf16 {
            v.push("amx-bf16");
        }
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(" ")
        }
    }
}

/// Asks the kernel, once per process, for permission to use AMX tile data
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); false if refused.
pub fn amx_permitted() -> bool {
    static PERMITTED: once_cell::sync::Lazy<bool> = once_cell::sync::Lazy::new(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: arch_prctl with these arguments only changes this
            // process's permission to use AMX state; it reads no memory.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    });
    *PERMITTED
}

/// Picks the kernel variant: forced by `forced` (the `MLART_CPU_ISA` value),
/// else the widest one that is both supported here and built in.
/// Returns the variant and the reason, for `mlart_engine_info`.
pub fn choose(
    features: &CpuFeatures,
    built: &[CpuIsa],
    forced: Option<&str>,
) -> Result<(CpuIsa, String)> {
    let built_names = built
        .iter()
        .map(|i| i.name())
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(raw) = forced {
        let isa = CpuIsa::parse(raw).ok_or_else(|| {
            Error::invalid(format!(
                "MLART_CPU_ISA = \"{raw}\" is not one of scalar, avx2, avx512, avx512bf16, amx"
            ))
        })?;
        if !built.contains(&isa) {
            return Err(Error::unsupported(format!(
                "MLART_CPU_ISA = {} but this build of mlart has no {} kernel (built: {built_names})",
                isa.name(),
                isa.name()
            )));
        }
        if !features.supports(isa) {
            return Err(Error::unsupported(format!(
                "MLART_CPU_ISA = {} but this CPU does not support it (detected: {})",
                isa.name(),
                features.describe()
            )));
        }
        return Ok((isa, format!("forced by MLART_CPU_ISA={}", isa.name())));
    }
    let best = built
        .iter()
        .copied()
        .filter(|&i| features.supports(i))
        .max_by_key(|i| i.rank(features))
        .unwrap_or(CpuIsa::Scalar);
    Ok((
        best,
        format!(
            "widest kernel supported by this CPU (detected: {}; built: {built_names})",
            features.describe()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forcing_checks_cpu_and_build() {
        let all = CpuFeatures {
            avx2_fma: true,
            avx512f: true,
            avx512bf16: true,
            amx_bf16: true,
            amd: false,
        };
        let none = CpuFeatures::default();
        let built = [CpuIsa::Scalar, CpuIsa::Avx2];
        assert_eq!(choose(&all, &built, None).unwrap().0, CpuIsa::Avx2);
        assert_eq!(choose(&none, &built, None).unwrap().0, CpuIsa::Scalar);
        assert_eq!(
            choose(&all, &built, Some("scalar")).unwrap().0,
            CpuIsa::Scalar
        );
        assert!(choose(&all, &built, Some("amx"))
            .unwrap_err()
            .message
            .contains("no amx kernel"));
        assert!(choose(&none, &built, Some("avx2"))
            .unwrap_err()
            .message
            .contains("does not support"));
        let e = choose(&all, &built, Some("sse9")).unwrap_err();
        assert!(e.message.starts_with("MLART_CPU_ISA = \"sse9\""));
    }

    #[test]
    fn bf16_dot_products_are_preferred_only_on_amd() {
        let built = [
            CpuIsa::Scalar,
            CpuIsa::Avx2,
            CpuIsa::Avx512,
            CpuIsa::Avx512Bf16,
        ];
        let zen4 = CpuFeatures {
            avx2_fma: true,
            avx512f: true,
            avx512bf16: true,
            amx_bf16: false,
            amd: true,
        };
        let xeon = CpuFeatures { amd: false, ..zen4 };
        assert_eq!(choose(&zen4, &built, None).unwrap().0, CpuIsa::Avx512Bf16);
        assert_eq!(choose(&xeon, &built, None).unwrap().0, CpuIsa::Avx512);
        assert_eq!(
            choose(&xeon, &built, Some("avx512bf16")).unwrap().0,
            CpuIsa::Avx512Bf16
        );
    }
}
