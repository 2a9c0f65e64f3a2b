//! The CUDA kernels' fatbin, embedded at build time, and readers for it and
//! for the ptxas report of the same build.
//!
//! build.rs compiles kernels/ into one fatbin when nvcc is found and then
//! sets `cfg(mlart_cuda_kernels)`; without it [`fatbin`] and [`ptxas_log`]
//! are `None` and the CUDA backend cannot run.
//!
//! Fatbin container layout (little endian), as nvcc 13.0 writes it; the
//! offsets were read off fatbins built here and agree with public readers of
//! the format (`fatBinaryHeader`, cuda-fatbin-decompression):
//!
//! ```text
//! header (16 bytes)  0 u32 magic 0xBA55ED50   4 u16 version (1)
//!                    6 u16 header size        8 u64 size of the entries
//! entry header       0 u16 kind (1 PTX, 2 ELF/SASS)   2 u16 (0x0101)
//!                    4 u32 header size        8 u64 payload size
//!                   16 u32 compressed size   20 u32 options offset
//!                   24 u16, u16 (PTX ISA or ELF version)
//!                   28 u32 arch (80, 90, 100, ...)
//!                   32 u32, u32 name offset, length   40 u64 flags
//!                   56 u64 uncompressed size (compressed payloads)
//! ```
//!
//! Each payload follows its header; the next entry follows the payload.
//! Flags seen: 0x1 64-bit, 0x10 Linux, 0x2000/0x8000 LZ4/zstd-compressed
//! payload, 0x100000 arch-specific target ("a": sm_90a), 0x200000
//! family-specific target ("f": sm_100f).

use std::fmt;

/// Keeps the embedded image 8-byte aligned: `cuModuleLoadData` reads the
/// fatbin's 64-bit fields in place.
#[cfg(mlart_cuda_kernels)]
#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);

#[cfg(mlart_cuda_kernels)]
static IMAGE: &Aligned<[u8]> = &Aligned(*include_bytes!(env!("MLART_FATBIN")));

#[cfg(mlart_cuda_kernels)]
static PTXAS_LOG: &str = include_str!(env!("MLART_PTXAS_LOG"));

/// Whether this build embeds the CUDA kernels.
pub const BUILT_WITH_KERNELS: bool = cfg!(mlart_cuda_kernels);

/// The kernels' fatbin (8-byte aligned), or `None` when the crate was built
/// without nvcc.
pub fn fatbin() -> Option<&'static [u8]> {
    #[cfg(mlart_cuda_kernels)]
    {
        Some(&IMAGE.0)
    }
    #[cfg(not(mlart_cuda_kernels))]
    {
        None
    }
}

/// nvcc's output from building the fatbin (ptxas `-v` resource usage per
/// kernel and architecture), or `None` when the crate was built without nvcc.
pub fn ptxas_log() -> Option<&'static str> {
    #[cfg(mlart_cuda_kernels)]
    {
        Some(PTXAS_LOG)
    }
    #[cfg(not(mlart_cuda_kernels))]
    {
        None
    }
}

const MAGIC: u32 = 0xBA55_ED50;
const VERSION: u16 = 1;
const HEADER_LEN: usize = 16;
/// The entry header fields read here end at the flags (offset 40..48).
const ENTRY_HEADER_MIN: usize = 48;
const KIND_PTX: u16 = 1;
const KIND_ELF: u16 = 2;
const FLAG_ARCH_SPECIFIC: u64 = 0x10_0000;

/// What an image in the fatbin holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatbinKind {
    /// PTX, JIT-compiled by the driver.
    Ptx,
    /// A cubin (ELF with SASS) for one architecture.
    Sass,
}

/// One image of a fatbin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FatbinEntry {
    pub kind: FatbinKind,
    /// Compute capability as major * 10 + minor: 80, 90, 100.
    pub arch: u32,
    /// Built for an arch-specific target (sm_90a, compute_100a): runs only
    /// on exactly that compute capability.
    pub arch_specific: bool,
}

impl FatbinEntry {
    fn exact_match_only(&self) -> bool {
        // SASS 90 and 100 are treated as "a" targets even without the flag:
        // that is what this project builds, and it is the safe reading.
        self.arch_specific || (self.kind == FatbinKind::Sass && matches!(self.arch, 90 | 100))
    }

    /// Whether the driver can use this image on compute capability
    /// `major.minor`.
    pub fn runs_on(&self, major: u32, minor: u32) -> bool {
        let (amaj, amin) = (self.arch / 10, self.arch % 10);
        if self.exact_match_only() {
            return (major, minor) == (amaj, amin);
        }
        match self.kind {
            // SASS is binary compatible within a major version, upwards.
            FatbinKind::Sass => major == amaj && minor >= amin,
            // PTX JIT-compiles for any later architecture.
            FatbinKind::Ptx => (major, minor) >= (amaj, amin),
        }
    }
}

impl fmt::Display for FatbinEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = if self.arch_specific { "a" } else { "" };
        match self.kind {
            FatbinKind::Sass => write!(f, "sm_{}{a} SASS", self.arch),
            FatbinKind::Ptx => write!(f, "compute_{}{a} PTX (JIT-compiled)", self.arch),
        }
    }
}

fn read<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    read(b, at).map(u16::from_le_bytes)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    read(b, at).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    read(b, at).map(u64::from_le_bytes)
}

/// Lists the PTX and SASS images of a fatbin container. Entries of other
/// kinds are skipped. Any inconsistency (bad magic, a size that runs past
/// the end) is an error; bytes after the container are ignored.
pub fn entries(bytes: &[u8]) -> Result<Vec<FatbinEntry>, String> {
    let too_short = || format!("fatbin: {} bytes, too short for its header", bytes.len());
    let magic = u32_at(bytes, 0).ok_or_else(too_short)?;
    if magic != MAGIC {
        return Err(format!(
            "fatbin: magic {magic:#010x}, expected {MAGIC:#010x}"
        ));
    }
    let version = u16_at(bytes, 4).ok_or_else(too_short)?;
    if version != VERSION {
        return Err(format!("fatbin: version {version}, expected {VERSION}"));
    }
    let header_len = usize::from(u16_at(bytes, 6).ok_or_else(too_short)?);
    let body_len = u64_at(bytes, 8).ok_or_else(too_short)?;
    if header_len < HEADER_LEN {
        return Err(format!("fatbin: header size {header_len} < {HEADER_LEN}"));
    }
    let end = usize::try_from(body_len)
        .ok()
        .and_then(|n| n.checked_add(header_len))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            format!(
                "fatbin: header says {header_len} + {body_len} bytes, have {}",
                bytes.len()
            )
        })?;

    let body = &bytes[..end];
    let mut out = Vec::new();
    let mut at = header_len;
    while at < end {
        let bad = |what: &str| format!("fatbin: entry at offset {at}: {what}");
        let kind = u16_at(body, at).ok_or_else(|| bad("truncated header"))?;
        let entry_len = u32_at(body, at + 4).ok_or_else(|| bad("truncated header"))?;
        let payload_len = u64_at(body, at + 8).ok_or_else(|| bad("truncated header"))?;
        let entry_len = usize::try_from(entry_len).map_err(|_| bad("header size overflows"))?;
        if entry_len < ENTRY_HEADER_MIN {
            return Err(bad(&format!(
                "header size {entry_len} < {ENTRY_HEADER_MIN}"
            )));
        }
        let next = usize::try_from(payload_len)
            .ok()
            .and_then(|p| p.checked_add(entry_len))
            .and_then(|n| n.checked_add(at))
            .filter(|&next| next <= end)
            .ok_or_else(|| {
                bad(&format!(
                    "{entry_len} + {payload_len} bytes run past the end"
                ))
            })?;
        // In bounds: at + entry_len <= next <= end and entry_len >= 48.
        let arch = u32_at(body, at + 28).ok_or_else(|| bad("truncated header"))?;
        let flags = u64_at(body, at + 40).ok_or_else(|| bad("truncated header"))?;
        let kind = match kind {
            KIND_PTX => Some(FatbinKind::Ptx),
            KIND_ELF => Some(FatbinKind::Sass),
            _ => None,
        };
        if let Some(kind) = kind {
            out.push(FatbinEntry {
                kind,
                arch,
                arch_specific: flags & FLAG_ARCH_SPECIFIC != 0,
            });
        }
        at = next;
    }
    Ok(out)
}

/// The image the driver will load on compute capability `major.minor`: the
/// newest compatible SASS, else the newest compatible PTX (JIT), else `None`.
pub fn runs_on(entries: &[FatbinEntry], major: u32, minor: u32) -> Option<String> {
    let best = |kind| {
        entries
            .iter()
            .filter(|e| e.kind == kind && e.runs_on(major, minor))
            .max_by_key(|e| e.arch)
    };
    best(FatbinKind::Sass)
        .or_else(|| best(FatbinKind::Ptx))
        .map(ToString::to_string)
}

/// Spill traffic per function from a ptxas `-v` report:
/// `(function, arch, spill store bytes, spill load bytes)`, in log order.
/// The arch ("sm_90a") is that of the enclosing "Compiling entry function"
/// line. Lines that do not parse are skipped.
pub fn spills(log: &str) -> Vec<(String, String, u64, u64)> {
    let mut out = Vec::new();
    let mut arch = String::new();
    let mut function: Option<String> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            // ... 'name' for 'sm_80'
            if let Some(a) = rest.split("' for '").nth(1) {
                arch = a.trim_end().trim_end_matches('\'').to_string();
            }
        } else if let Some(name) = line.split("Function properties for ").nth(1) {
            function = Some(name.trim().to_string());
        } else if line.contains("spill stores") {
            let (mut stores, mut loads) = (None, None);
            for part in line.split(',') {
                let part = part.trim();
                let bytes = || part.split_whitespace().next()?.parse::<u64>().ok();
                if part.ends_with("bytes spill stores") {
                    stores = bytes();
                } else if part.ends_with("bytes spill loads") {
                    loads = bytes();
                }
            }
            if let (Some(f), Some(s), Some(l)) = (function.take(), stores, loads) {
                out.push((f, arch.clone(), s, l));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip(test: &str) {
        println!(
            "{test}: skipped: the crate was built without CUDA kernels \
             (nvcc not found, or MLART_NO_CUDA_KERNELS set; see \
             scripts/cuda-toolchain.sh)"
        );
    }

    /// A container in nvcc's layout with empty payloads of the given sizes.
    fn container(images: &[(u16, u32, u64, usize)]) -> Vec<u8> {
        let mut body = Vec::new();
        for &(kind, arch, flags, payload) in images {
            let mut h = [0u8; 64];
            h[0..2].copy_from_slice(&kind.to_le_bytes());
            h[2..4].copy_from_slice(&0x0101u16.to_le_bytes());
            h[4..8].copy_from_slice(&64u32.to_le_bytes());
            h[8..16].copy_from_slice(&(payload as u64).to_le_bytes());
            h[28..32].copy_from_slice(&arch.to_le_bytes());
            h[40..48].copy_from_slice(&flags.to_le_bytes());
            body.extend_from_slice(&h);
            body.extend(std::iter::repeat_n(0xAB, payload));
        }
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(&(body.len() as u64).to_le_bytes());
        b.extend_from_slice(&body);
        b
    }

    /// What this project builds: sm_80, sm_90a, sm_100a SASS, compute_80 PTX.
    fn project_images() -> Vec<u8> {
        container(&[
            (1, 80, 0x8011, 40),
            (2, 80, 0x11, 24),
            (2, 90, 0x10_0011, 8),
            (2, 100, 0x110_0011, 16),
        ])
    }

    fn check_runs_on(e: &[FatbinEntry]) {
        let cases: &[(u32, u32, Option<&str>)] = &[
            (7, 5, None),
            (8, 0, Some("sm_80 SASS")),
            (8, 6, Some("sm_80 SASS")),
            (8, 9, Some("sm_80 SASS")),
            (9, 0, Some("sm_90a SASS")),
            (10, 0, Some("sm_100a SASS")),
            (10, 3, Some("compute_80 PTX (JIT-compiled)")),
            (12, 0, Some("compute_80 PTX (JIT-compiled)")),
        ];
        for &(major, minor, want) in cases {
            assert_eq!(
                runs_on(e, major, minor).as_deref(),
                want,
                "compute capability {major}.{minor}"
            );
        }
    }

    #[test]
    fn parses_synthetic_container() {
        let e = entries(&project_images()).expect("valid container");
        let summary: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(
            summary,
            [
                "compute_80 PTX (JIT-compiled)",
                "sm_80 SASS",
                "sm_90a SASS",
                "sm_100a SASS"
            ]
        );
        check_runs_on(&e);
        // Unknown kinds are skipped, an empty container is fine, trailing
        // bytes are ignored.
        let mut b = container(&[(4, 80, 0, 8), (2, 86, 0x11, 0)]);
        b.extend_from_slice(&[0; 8]);
        let e = entries(&b).expect("valid container");
        assert_eq!(e.len(), 1);
        assert_eq!(runs_on(&e, 8, 9).as_deref(), Some("sm_86 SASS"));
        assert_eq!(runs_on(&e, 8, 0), None);
        assert_eq!(entries(&container(&[])), Ok(vec![]));
    }

    #[test]
    fn runs_on_rules() {
        let sass = |arch, arch_specific| FatbinEntry {
            kind: FatbinKind::Sass,
            arch,
            arch_specific,
        };
        let ptx = |arch, arch_specific| FatbinEntry {
            kind: FatbinKind::Ptx,
            arch,
            arch_specific,
        };
        // SASS 90/100 are exact-match even without the flag.
        assert!(sass(90, false).runs_on(9, 0));
        assert!(!sass(100, false).runs_on(10, 3));
        assert!(sass(120, false).runs_on(12, 1));
        assert!(!sass(120, true).runs_on(12, 1));
        assert!(!sass(80, false).runs_on(9, 0));
        assert!(ptx(80, false).runs_on(12, 0));
        assert!(!ptx(90, true).runs_on(10, 0));
        assert!(ptx(90, true).runs_on(9, 0));
        // The newest compatible SASS wins, and SASS wins over PTX.
        let e = [ptx(80, false), sass(80, false), sass(86, false)];
        assert_eq!(runs_on(&e, 8, 9).as_deref(), Some("sm_86 SASS"));
        assert_eq!(runs_on(&e, 8, 0).as_deref(), Some("sm_80 SASS"));
        assert_eq!(runs_on(&[], 9, 0), None);
    }

    #[test]
    fn malformed_input_is_an_error() {
        let good = project_images();
        // Every truncation: the header promises more than is there.
        for n in 0..good.len() {
            assert!(entries(&good[..n]).is_err(), "truncated to {n} bytes");
        }
        let patched = |at: usize, v: &[u8]| {
            let mut b = good.clone();
            b[at..at + v.len()].copy_from_slice(v);
            b
        };
        let first = HEADER_LEN;
        for (what, b) in [
            ("magic", patched(0, &[0; 4])),
            ("version", patched(4, &2u16.to_le_bytes())),
            ("header size", patched(6, &8u16.to_le_bytes())),
            ("header size", patched(6, &u16::MAX.to_le_bytes())),
            ("fat size", patched(8, &u64::MAX.to_le_bytes())),
            (
                "entry header size 0",
                patched(first + 4, &0u32.to_le_bytes()),
            ),
            (
                "entry header size",
                patched(first + 4, &u32::MAX.to_le_bytes()),
            ),
            ("payload size", patched(first + 8, &u64::MAX.to_le_bytes())),
            ("payload size", patched(first + 8, &1000u64.to_le_bytes())),
        ] {
            assert!(entries(&b).is_err(), "bad {what}");
        }
        // Pseudo-random garbage, with and without a valid magic.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..2000 {
            let len = (round * 7) % 300;
            let mut b: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if round % 2 == 1 && len >= 16 {
                b[..4].copy_from_slice(&MAGIC.to_le_bytes());
                b[4..6].copy_from_slice(&1u16.to_le_bytes());
            }
            // Must not panic; valid-looking garbage may parse.
            let _ = entries(&b);
        }
    }

    #[test]
    fn spills_parses_ptxas_report() {
        let log = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mla_decode_bf16_d576' for 'sm_80'
ptxas info    : Function properties for mla_decode_bf16_d576
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 364 bytes cmem[0]
ptxas info    : Compiling entry function 'mla_combine' for 'sm_90a'
ptxas info    : Function properties for _ZN3mla6helperEv
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for mla_combine
    48 bytes stack frame, 44 bytes spill stores, 52 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
ptxas info    : Function properties for dangling
ptxas info    : Compile time = 1.2 ms
";
        let s = |f: &str, a: &str, st, ld| (f.to_string(), a.to_string(), st, ld);
        assert_eq!(
            spills(log),
            [
                s("mla_decode_bf16_d576", "sm_80", 0, 0),
                s("_ZN3mla6helperEv", "sm_90a", 0, 0),
                s("mla_combine", "sm_90a", 44, 52),
            ]
        );
        assert!(spills("").is_empty());
        assert!(spills("garbage\n 1 bytes spill stores\n").is_empty());
    }

    #[test]
    fn embedded_fatbin_has_every_image() {
        let Some(bin) = fatbin() else {
            return skip("embedded_fatbin_has_every_image");
        };
        assert_eq!(
            bin.as_ptr() as usize % 8,
            0,
            "fatbin image must be 8-byte aligned"
        );
        let e = entries(bin).expect("embedded fatbin parses");
        let has = |kind, arch, arch_specific| {
            e.contains(&FatbinEntry {
                kind,
                arch,
                arch_specific,
            })
        };
        assert!(has(FatbinKind::Sass, 80, false), "{e:?}");
        assert!(has(FatbinKind::Sass, 90, true), "{e:?}");
        assert!(has(FatbinKind::Sass, 100, true), "{e:?}");
        assert!(has(FatbinKind::Ptx, 80, false), "{e:?}");
        check_runs_on(&e);
        // Truncations of the real image fail cleanly too.
        let step = (bin.len() / 2048).max(1);
        for n in (0..bin.len()).step_by(step) {
            assert!(entries(&bin[..n]).is_err(), "truncated to {n} bytes");
        }
    }

    #[test]
    fn decode_kernels_do_not_spill() {
        let Some(log) = ptxas_log() else {
            return skip("decode_kernels_do_not_spill");
        };
        let all = spills(log);
        // Guards against a log format change making this test vacuous.
        for arch in ["sm_80", "sm_90a", "sm_100a"] {
            assert!(
                all.iter().any(|(_, a, _, _)| a == arch),
                "no ptxas report for {arch} in the log:\n{log}"
            );
        }
        let spilling: Vec<_> = all
            .iter()
            .filter(|(f, _, st, ld)| {
                let hot = ["decode", "linear", "index"].iter().any(|k| f.contains(k));
                hot && (*st > 0 || *ld > 0)
            })
            .collect();
        assert!(
            spilling.is_empty(),
            "decode, projection or indexer kernels spill (function, arch, store bytes, load bytes): {spilling:?}"
        );
    }

    #[test]
    fn every_decode_entry_is_built_for_every_target() {
        use crate::backend::cuda::launch::{
            decode_kernel_name, DECODE_KERNELS, VARIANTS, WGMMA_PROBE_KERNEL,
        };
        let Some(log) = ptxas_log() else {
            return skip("every_decode_entry_is_built_for_every_target");
        };
        use crate::backend::cuda::linear::{LINEAR_KERNELS, REDUCE_KERNEL};
        let mut names = vec![
            WGMMA_PROBE_KERNEL.to_string(),
            REDUCE_KERNEL.to_string(),
            crate::backend::cuda::launch::ROWS_KERNEL.to_string(),
            crate::backend::cuda::launch::INDEX_SCORE_KERNEL.to_string(),
            crate::backend::cuda::launch::INDEX_SCORE_MMA_KERNEL.to_string(),
            crate::backend::cuda::launch::INDEX_TOPK_KERNEL.to_string(),
            crate::backend::cuda::launch::INDEX_SCATTER_KERNEL.to_string(),
            crate::backend::cuda::launch::INDEX_ROWS_KERNEL.to_string(),
        ];
        names.extend(LINEAR_KERNELS.iter().flatten().map(|n| n.to_string()));
        for (_, _, base) in DECODE_KERNELS {
            names.extend(VARIANTS.iter().map(|&v| decode_kernel_name(base, v)));
        }
        for name in names {
            for arch in ["sm_80", "sm_90a", "sm_100a"] {
                let want = format!("Compiling entry function '{name}' for '{arch}'");
                assert!(log.contains(&want), "ptxas log lacks `{want}`");
            }
        }
    }

    #[test]
    fn kernels_present_when_required() {
        let required =
            std::env::var("MLART_REQUIRE_CUDA_KERNELS").is_ok_and(|v| !v.is_empty() && v != "0");
        if required {
            assert!(
                fatbin().is_some() && ptxas_log().is_some(),
                "MLART_REQUIRE_CUDA_KERNELS is set but the crate was built without CUDA kernels"
            );
        }
    }
}
