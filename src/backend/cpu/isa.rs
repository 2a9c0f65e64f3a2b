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
    /// AVX512-BW (the AMX kernel's operand packing uses 16-bit permutes).
    pub avx512bw: bool,
    pub avx512bf16: bool,
    pub amx_bf16: bool,
    /// CPUID vendor is AMD (decides between AVX512-BF16 and AVX-512F).
    pub amd: bool,
}

impl CpuFeatures {
    pub fn detect() -> Self {
        // Miri (which checks the C ABI's unsafe code) cannot run CPUID; it
        // gets the scalar kernel.
        #[cfg(all(target_arch = "x86_64", not(miri)))]
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
                avx512bw: std::is_x86_feature_detected!("avx512bw"),
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
        #[cfg(any(not(target_arch = "x86_64"), miri))]
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
            CpuIsa::Amx => self.amx_tiles_emulable() && self.amx_bf16 && amx_permitted(),
        }
    }

    /// Whether the AMX kernel's vector parts run here, so that its tiles
    /// can be emulated in software (`MLART_AMX_EMULATE=1`).
    pub fn amx_tiles_emulable(&self) -> bool {
        self.avx512f && self.avx512bw && self.avx512bf16
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

/// Whether the AMX kernel (both GEMMs on tiles) has run on an AMX CPU and
/// passed the reference suites there; AUTO chooses it only then. It has:
/// on a 2-core Intel Xeon (model 207, Emerald Rapids) on 2026-11-30 the
/// tiles matched their software model and every reference suite passed
/// forced to `amx`, and it ran decode twice as fast as the AVX-512 kernel
/// (BENCHMARKS.md). Its logic is also tested on every machine with AVX-512
/// on the software tile model (`MLART_AMX_EMULATE=1`).
pub const AMX_VERIFIED: bool = true;

/// The kernel variant an engine runs, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub isa: CpuIsa,
    /// For `mlart_engine_info`.
    pub reason: String,
    /// AMX tiles run in software (`MLART_AMX_EMULATE=1` with `MLART_CPU_ISA=amx`).
    pub emulated_tiles: bool,
}

/// Picks the kernel variant: forced by `forced` (the `MLART_CPU_ISA` value),
/// else the widest one that is both supported here and built in (AMX only
/// once [`AMX_VERIFIED`]). `emulate_amx` (`MLART_AMX_EMULATE=1`) makes a
/// forced AMX run on software tiles.
pub fn choose(
    features: &CpuFeatures,
    built: &[CpuIsa],
    forced: Option<&str>,
    emulate_amx: bool,
) -> Result<Choice> {
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
        if isa == CpuIsa::Amx && emulate_amx {
            if !features.amx_tiles_emulable() {
                return Err(Error::unsupported(format!(
                    "MLART_CPU_ISA = amx with MLART_AMX_EMULATE=1 needs avx512f, avx512bw and avx512bf16 (detected: {})",
                    features.describe()
                )));
            }
            return Ok(Choice {
                isa,
                reason: "forced by MLART_CPU_ISA=amx, tiles emulated in software (MLART_AMX_EMULATE=1; slow, for testing)".into(),
                emulated_tiles: true,
            });
        }
        if !features.supports(isa) {
            return Err(Error::unsupported(format!(
                "MLART_CPU_ISA = {} but this CPU does not support it (detected: {})",
                isa.name(),
                features.describe()
            )));
        }
        return Ok(Choice {
            isa,
            reason: format!("forced by MLART_CPU_ISA={}", isa.name()),
            emulated_tiles: false,
        });
    }
    let best = built
        .iter()
        .copied()
        .filter(|&i| features.supports(i) && (i != CpuIsa::Amx || AMX_VERIFIED))
        .max_by_key(|i| i.rank(features))
        .unwrap_or(CpuIsa::Scalar);
    let mut reason = format!(
        "widest kernel supported by this CPU (detected: {}; built: {built_names})",
        features.describe()
    );
    if !AMX_VERIFIED && built.contains(&CpuIsa::Amx) && features.supports(CpuIsa::Amx) {
        reason.push_str(
            "; amx is supported but not chosen until its kernel has been verified on AMX hardware (MLART_CPU_ISA=amx uses it)",
        );
    }
    Ok(Choice {
        isa: best,
        reason,
        emulated_tiles: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An AMD Zen 4: AVX-512 with BF16, no AMX.
    fn zen4() -> CpuFeatures {
        CpuFeatures {
            avx2_fma: true,
            avx512f: true,
            avx512bw: true,
            avx512bf16: true,
            amx_bf16: false,
            amd: true,
        }
    }

    #[test]
    fn forcing_checks_cpu_and_build() {
        let all = CpuFeatures {
            avx2_fma: true,
            avx512f: true,
            avx512bw: true,
            avx512bf16: true,
            amx_bf16: true,
            amd: false,
        };
        let none = CpuFeatures::default();
        let built = [CpuIsa::Scalar, CpuIsa::Avx2];
        assert_eq!(choose(&all, &built, None, false).unwrap().isa, CpuIsa::Avx2);
        assert_eq!(
            choose(&none, &built, None, false).unwrap().isa,
            CpuIsa::Scalar
        );
        assert_eq!(
            choose(&all, &built, Some("scalar"), false).unwrap().isa,
            CpuIsa::Scalar
        );
        assert!(choose(&all, &built, Some("amx"), false)
            .unwrap_err()
            .message
            .contains("no amx kernel"));
        assert!(choose(&none, &built, Some("avx2"), false)
            .unwrap_err()
            .message
            .contains("does not support"));
        let e = choose(&all, &built, Some("sse9"), false).unwrap_err();
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
        let zen4 = zen4();
        let xeon = CpuFeatures { amd: false, ..zen4 };
        assert_eq!(
            choose(&zen4, &built, None, false).unwrap().isa,
            CpuIsa::Avx512Bf16
        );
        assert_eq!(
            choose(&xeon, &built, None, false).unwrap().isa,
            CpuIsa::Avx512
        );
        assert_eq!(
            choose(&xeon, &built, Some("avx512bf16"), false)
                .unwrap()
                .isa,
            CpuIsa::Avx512Bf16
        );
    }

    /// AMX tiles in software only when forced and asked for, and only
    /// with the vector features the kernel's packing needs; AUTO leaves
    /// an unverified AMX kernel out and says so.
    #[test]
    fn amx_emulation_and_verification_gate() {
        let built = [
            CpuIsa::Scalar,
            CpuIsa::Avx512,
            CpuIsa::Avx512Bf16,
            CpuIsa::Amx,
        ];
        let zen4 = zen4();
        let c = choose(&zen4, &built, Some("amx"), true).unwrap();
        assert_eq!((c.isa, c.emulated_tiles), (CpuIsa::Amx, true));
        assert!(c.reason.contains("MLART_AMX_EMULATE=1"), "{}", c.reason);
        let e = choose(&zen4, &built, Some("amx"), false).unwrap_err();
        assert!(e.message.contains("does not support"), "{}", e.message);
        let no_bw = CpuFeatures {
            avx512bw: false,
            ..zen4
        };
        let e = choose(&no_bw, &built, Some("amx"), true).unwrap_err();
        assert!(e.message.contains("avx512bw"), "{}", e.message);
        // Emulation never makes AUTO pick AMX.
        let c = choose(&zen4, &built, None, true).unwrap();
        assert_eq!((c.isa, c.emulated_tiles), (CpuIsa::Avx512Bf16, false));
        // On an Intel CPU whose OS grants AMX, AUTO picks it (verified);
        // without the grant (or before verification) the f32 kernel.
        let spr = CpuFeatures {
            amx_bf16: true,
            amd: false,
            ..zen4
        };
        let c = choose(&spr, &built, None, false).unwrap();
        if AMX_VERIFIED && amx_permitted() {
            assert_eq!(c.isa, CpuIsa::Amx, "{}", c.reason);
        } else {
            assert_eq!(c.isa, CpuIsa::Avx512, "{}", c.reason);
        }
    }
}
