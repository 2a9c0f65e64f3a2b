//! Helpers shared by the integration tests (`fp8_format.rs`, `cuda_decode.rs`,
//! `sparse_reference.rs`, `decode_reference.rs`, `decode_errors.rs`).
//!
//! Everything here is written from the specification (mlart.h, FlashMLA's
//! `tests/quant.py`) and shares no code with the library: error handling
//! through the C ABI, a seeded RNG with Box-Muller normals, and independent
//! encoders/decoders of bf16, OCP FP8 E4M3 and the two FP8 cache layouts.

#![allow(dead_code)]

use mlart::ffi::engine::*;
use mlart::ffi::error::*;
use mlart::ffi::types::*;
use rand::rngs::SmallRng;
use rand::Rng;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::sync::RwLock;

// ---------------------------------------------------------------------------
// Errors and engines.
// ---------------------------------------------------------------------------

/// Status and message of an error (freed here), or `None` for NULL.
pub fn take_error(e: *mut mlart_error) -> Option<(mlart_status, String)> {
    if e.is_null() {
        return None;
    }
    let code = mlart_error_code(e);
    // SAFETY: e is live until mlart_error_free below.
    let msg = unsafe { CStr::from_ptr(mlart_error_message(e)) }
        .to_str()
        .expect("error messages are UTF-8")
        .to_owned();
    mlart_error_free(e);
    Some((code, msg))
}

pub fn status_name(s: mlart_status) -> String {
    // SAFETY: static NUL-terminated string.
    unsafe { CStr::from_ptr(mlart_status_name(s)) }
        .to_string_lossy()
        .into_owned()
}

/// Panics unless `e` is NULL (success).
pub fn expect_ok(what: &str, e: *mut mlart_error) {
    if let Some((code, msg)) = take_error(e) {
        panic!("{what}: failed with {} ({code}): {msg}", status_name(code));
    }
}

/// Asserts that `e` is an error with `status` whose message contains every
/// one of `needles`; returns the message.
pub fn expect_error(
    what: &str,
    e: *mut mlart_error,
    status: mlart_status,
    needles: &[&str],
) -> String {
    let Some((code, msg)) = take_error(e) else {
        panic!("{what}: succeeded, want {} error", status_name(status));
    };
    assert_eq!(
        code,
        status,
        "{what}: status {} ({}), want {} ({}); message: {msg}",
        code,
        status_name(code),
        status,
        status_name(status)
    );
    for n in needles {
        assert!(
            msg.contains(n),
            "{what}: message {msg:?} does not mention {n:?}"
        );
    }
    msg
}

/// A CPU engine freed on drop.
pub struct Engine {
    pub ptr: *mut mlart_engine,
    pub threads: i32,
}

// SAFETY: mlart engines may be used from any thread (documented in mlart.h).
unsafe impl Send for Engine {}
// SAFETY: as above; concurrent decodes on one engine are allowed.
unsafe impl Sync for Engine {}

/// `MLART_CPU_ISA` is read when an engine is created: every creation holds
/// the read side, [`Engine::with_isa`] (which sets it) the write side.
pub static ENV_LOCK: RwLock<()> = RwLock::new(());

/// Runs `f` with the environment variables set (then restored), holding
/// the environment lock so no other test creates an engine meanwhile.
pub fn with_env<R>(vars: &[(&str, &str)], f: impl FnOnce() -> R) -> R {
    let _env = ENV_LOCK.write().unwrap_or_else(|e| e.into_inner());
    let saved: Vec<_> = vars
        .iter()
        .map(|(k, v)| {
            let old = std::env::var_os(k);
            std::env::set_var(k, v);
            (*k, old)
        })
        .collect();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    for (k, old) in saved {
        match old {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
    match r {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

impl Engine {
    pub fn new(threads: i32) -> Engine {
        let _env = ENV_LOCK.read().unwrap_or_else(|e| e.into_inner());
        Self::create(threads)
    }

    /// An engine forced to the kernel variant `isa` (`MLART_CPU_ISA`), or
    /// `None` where this build or CPU lacks it (UNSUPPORTED).
    pub fn with_isa(isa: &str, threads: i32) -> Option<Engine> {
        Self::with_env(&[("MLART_CPU_ISA", isa)], threads)
    }

    /// The AMX kernel: on the CPU's tiles where it has AMX, else on the
    /// library's software model of them (`MLART_AMX_EMULATE=1`, which needs
    /// AVX-512 F/BW/BF16); `None` (with the reason printed) where neither
    /// runs. The flag says whether the tiles are emulated.
    pub fn amx(threads: i32) -> Option<(Engine, bool)> {
        if let Some(e) = Self::with_isa("amx", threads) {
            return Some((e, false));
        }
        match Self::with_env(
            &[("MLART_CPU_ISA", "amx"), ("MLART_AMX_EMULATE", "1")],
            threads,
        ) {
            Some(e) => Some((e, true)),
            None => {
                println!("SKIPPED amx: this CPU has neither AMX nor AVX-512 F/BW/BF16 for emulated tiles");
                None
            }
        }
    }

    /// An engine created with the environment variables `vars` set (and
    /// restored after), or `None` where they ask for what this build or
    /// CPU lacks (UNSUPPORTED).
    pub fn with_env(vars: &[(&str, &str)], threads: i32) -> Option<Engine> {
        match with_env(vars, || Self::try_create(threads)) {
            Ok(e) => Some(e),
            Err((MLART_STATUS_UNSUPPORTED, _)) => None,
            Err((code, msg)) => {
                panic!("{vars:?}: {} ({code}): {msg}", status_name(code))
            }
        }
    }

    /// A CPU engine of `threads` threads, or the status and message of the
    /// failure.
    fn try_create(threads: i32) -> Result<Engine, (mlart_status, String)> {
        let mut opts = MaybeUninit::<mlart_engine_options>::uninit();
        mlart_engine_options_init(opts.as_mut_ptr());
        // SAFETY: initialized by mlart_engine_options_init.
        let mut opts = unsafe { opts.assume_init() };
        opts.backend = MLART_BACKEND_CPU;
        opts.num_threads = threads;
        let mut ptr = std::ptr::null_mut();
        match take_error(mlart_engine_create(&opts, &mut ptr)) {
            None => Ok(Engine { ptr, threads }),
            Some(e) => Err(e),
        }
    }

    fn create(threads: i32) -> Engine {
        match Self::try_create(threads) {
            Ok(e) => e,
            Err((code, msg)) => panic!(
                "mlart_engine_create(threads = {threads}): {} ({code}): {msg}",
                status_name(code)
            ),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        mlart_engine_free(self.ptr);
    }
}

// ---------------------------------------------------------------------------
// Random inputs.
// ---------------------------------------------------------------------------

const BASE_SEED: u64 = 0x6670_385f_7370_6172;

/// Fixed base seed mixed with a group salt and a case counter (splitmix64).
pub fn case_seed(salt: u64, counter: u64) -> u64 {
    let mut z = BASE_SEED ^ salt.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ counter;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Standard normal by Box-Muller.
pub fn normal(rng: &mut SmallRng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// N(0, 1) / 10 clamped to [-1, 1].
pub fn sample(rng: &mut SmallRng) -> f32 {
    (normal(rng) / 10.0).clamp(-1.0, 1.0) as f32
}

/// Relative L2 distance `|got - want| / |want|` (0/0 = 0, x/0 = inf).
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let err: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    if norm == 0.0 {
        if err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (err / norm).sqrt()
    }
}

// ---------------------------------------------------------------------------
// bf16 / f16.
// ---------------------------------------------------------------------------

/// bf16 bits of a finite or infinite `x`, rounded to nearest even.
pub fn bf16_bits(x: f32) -> u16 {
    assert!(!x.is_nan());
    let b = x.to_bits();
    // Adding 0x7fff plus the lowest kept bit rounds half to even; a carry
    // out of the mantissa correctly bumps the exponent (up to infinity).
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `x` rounded to bf16.
pub fn bf16_round(x: f32) -> f32 {
    bf16_value(bf16_bits(x))
}

// ---------------------------------------------------------------------------
// OCP FP8 E4M3 ("e4m3fn": bias 7, no infinities, S.1111.111 is NaN).
// ---------------------------------------------------------------------------

/// The value of an E4M3 code, from the definition.
pub fn e4m3_value(code: u8) -> f64 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 3) & 0xf) as i32;
    let m = (code & 7) as f64;
    if e == 15 && m == 7.0 {
        return f64::NAN;
    }
    let mag = if e == 0 {
        m / 8.0 * 2f64.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f64.powi(e - 7)
    };
    sign * mag
}

/// E4M3 code of `x` by exhaustive search: the nearest finite code, ties to
/// the even code, saturating at ±448, sign of zero kept.
pub fn e4m3_encode(x: f64) -> u8 {
    assert!(!x.is_nan());
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    let mut best = 0u8;
    let mut best_d = f64::INFINITY;
    // Non-negative codes are increasing in value; a tie is between two
    // neighbours, and the later one replaces the earlier only if even.
    for c in 0u8..=0x7e {
        let d = (e4m3_value(c) - a).abs();
        if d < best_d || (d == best_d && c % 2 == 0) {
            best = c;
            best_d = d;
        }
    }
    sign | best
}

/// Half the spacing of E4M3 values around `|y|` (|y| <= 448): the largest
/// error of rounding `y` to nearest.
pub fn e4m3_half_ulp(y: f64) -> f64 {
    let a = y.abs();
    let e = if a < 2f64.powi(-6) {
        -6
    } else {
        a.log2().floor() as i32
    };
    2f64.powi(e - 3) / 2.0
}

/// The power-of-two scale of a tile whose largest magnitude is `amax`:
/// `2^ceil(log2(max(amax / 448, 1e-4)))`.
pub fn tile_scale(amax: f64) -> f64 {
    let v = (amax / 448.0).max(1e-4);
    2f64.powf(v.log2().ceil())
}

/// E4M3 codes of one tile and its scale.
pub fn quantize_tile(x: &[f64]) -> (Vec<u8>, f64) {
    let amax = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let s = tile_scale(amax);
    (x.iter().map(|&v| e4m3_encode(v / s)).collect(), s)
}

// ---------------------------------------------------------------------------
// The FP8 cache layouts (mlart.h, FlashMLA): byte offsets and a decoder.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8 {
    V32,
    Model1,
}

impl Fp8 {
    pub fn format(self) -> mlart_kv_format {
        match self {
            Fp8::V32 => MLART_KV_FORMAT_FP8_V32,
            Fp8::Model1 => MLART_KV_FORMAT_FP8_MODEL1,
        }
    }

    pub fn d_qk(self) -> usize {
        match self {
            Fp8::V32 => 576,
            Fp8::Model1 => 512,
        }
    }

    /// Quantized dims, tile width.
    pub fn nope(self) -> usize {
        match self {
            Fp8::V32 => 512,
            Fp8::Model1 => 448,
        }
    }

    pub fn tile(self) -> usize {
        match self {
            Fp8::V32 => 128,
            Fp8::Model1 => 64,
        }
    }

    pub fn tiles(self) -> usize {
        self.nope() / self.tile()
    }

    /// Bytes per token, padding excluded.
    pub fn row_bytes(self) -> usize {
        match self {
            Fp8::V32 => 656,
            Fp8::Model1 => 584,
        }
    }

    pub fn block_bytes(self, bs: usize) -> usize {
        match self {
            Fp8::V32 => 656 * bs,
            Fp8::Model1 => (bs * 584).div_ceil(576) * 576,
        }
    }

    /// Offset of token `slot`'s e4m3 bytes (then bf16 rope) in its block.
    pub fn data_at(self, slot: usize) -> usize {
        match self {
            Fp8::V32 => slot * 656,
            Fp8::Model1 => slot * 576,
        }
    }

    /// Offset of token `slot`'s rope (64 bf16) in its block.
    pub fn rope_at(self, slot: usize) -> usize {
        match self {
            Fp8::V32 => slot * 656 + 528,
            Fp8::Model1 => slot * 576 + 448,
        }
    }

    /// Offset of token `slot`'s scales (V32: 4 f32, MODEL1: 7 ue8m0 + pad).
    pub fn scales_at(self, bs: usize, slot: usize) -> usize {
        match self {
            Fp8::V32 => slot * 656 + 512,
            Fp8::Model1 => bs * 576 + slot * 8,
        }
    }

    /// The byte ranges (within a block) that belong to token `slot`.
    pub fn token_ranges(self, bs: usize, slot: usize) -> Vec<std::ops::Range<usize>> {
        match self {
            Fp8::V32 => std::iter::once(slot * 656..(slot + 1) * 656).collect(),
            Fp8::Model1 => vec![
                slot * 576..(slot + 1) * 576,
                bs * 576 + slot * 8..bs * 576 + slot * 8 + 8,
            ],
        }
    }

    /// The expected bytes of one token: (offset in block, bytes) pieces.
    pub fn encode_token(self, bs: usize, slot: usize, x: &[f64]) -> Vec<(usize, Vec<u8>)> {
        assert_eq!(x.len(), self.d_qk());
        let (tile, tiles, nope) = (self.tile(), self.tiles(), self.nope());
        let mut codes = Vec::with_capacity(nope);
        let mut scale_bytes = Vec::new();
        for t in 0..tiles {
            let (c, s) = quantize_tile(&x[t * tile..(t + 1) * tile]);
            codes.extend(c);
            match self {
                Fp8::V32 => scale_bytes.extend_from_slice(&(s as f32).to_le_bytes()),
                Fp8::Model1 => {
                    let e = s.log2();
                    assert_eq!(e, e.round());
                    scale_bytes.push((e as i32 + 127) as u8);
                }
            }
        }
        if self == Fp8::Model1 {
            scale_bytes.push(0); // pad byte
        }
        let rope: Vec<u8> = x[nope..]
            .iter()
            .flat_map(|&v| bf16_bits(v as f32).to_le_bytes())
            .collect();
        vec![
            (self.data_at(slot), codes),
            (self.scales_at(bs, slot), scale_bytes),
            (self.rope_at(slot), rope),
        ]
    }

    /// Decodes token `slot` of `block` (bytes of one block) to f64.
    pub fn decode_token(self, bs: usize, block: &[u8], slot: usize) -> Vec<f64> {
        let (tile, tiles, nope) = (self.tile(), self.tiles(), self.nope());
        let mut out = Vec::with_capacity(self.d_qk());
        let sc = self.scales_at(bs, slot);
        for t in 0..tiles {
            let s = match self {
                Fp8::V32 => {
                    f32::from_le_bytes(block[sc + 4 * t..sc + 4 * t + 4].try_into().unwrap()) as f64
                }
                Fp8::Model1 => 2f64.powi(block[sc + t] as i32 - 127),
            };
            let d = self.data_at(slot) + t * tile;
            out.extend(block[d..d + tile].iter().map(|&c| e4m3_value(c) * s));
        }
        let r = self.rope_at(slot);
        for j in 0..self.d_qk() - nope {
            let b = u16::from_le_bytes([block[r + 2 * j], block[r + 2 * j + 1]]);
            out.push(bf16_value(b) as f64);
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Element types of queries, outputs and plain caches.
// ---------------------------------------------------------------------------

/// An element type, written out independently of the library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F32,
    Bf16,
    F16,
}

pub const DTS: [Dt; 3] = [Dt::F32, Dt::Bf16, Dt::F16];

impl Dt {
    pub fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::Bf16 | Dt::F16 => 2,
        }
    }

    /// The `mlart_dtype` of queries and outputs.
    pub fn dtype(self) -> mlart_dtype {
        match self {
            Dt::F32 => MLART_DTYPE_F32,
            Dt::Bf16 => MLART_DTYPE_BF16,
            Dt::F16 => MLART_DTYPE_F16,
        }
    }

    /// The `mlart_kv_format` of a cache of this element type.
    pub fn kv_format(self) -> mlart_kv_format {
        match self {
            Dt::F32 => MLART_KV_FORMAT_F32,
            Dt::Bf16 => MLART_KV_FORMAT_BF16,
            Dt::F16 => MLART_KV_FORMAT_F16,
        }
    }

    /// Appends `x` rounded to nearest-even in this type (little endian) and
    /// returns the rounded value.
    pub fn push(self, x: f32, bytes: &mut Vec<u8>) -> f64 {
        assert!(x.is_finite());
        match self {
            Dt::F32 => {
                bytes.extend_from_slice(&x.to_le_bytes());
                x as f64
            }
            Dt::Bf16 => {
                let r = bf16_bits(x);
                bytes.extend_from_slice(&r.to_le_bytes());
                bf16_value(r) as f64
            }
            Dt::F16 => {
                let h = half::f16::from_f32(x);
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                h.to_f64()
            }
        }
    }

    /// A quiet NaN of this type, as bytes.
    pub fn nan(self) -> &'static [u8] {
        match self {
            Dt::F32 => &[0x00, 0x00, 0xc0, 0x7f],
            Dt::Bf16 => &[0xc0, 0x7f],
            Dt::F16 => &[0x00, 0x7e],
        }
    }

    /// Element `i` of `bytes`.
    pub fn read(self, bytes: &[u8], i: usize) -> f64 {
        let w = self.size();
        let b = &bytes[w * i..w * (i + 1)];
        match self {
            Dt::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Dt::Bf16 => bf16_value(u16::from_le_bytes([b[0], b[1]])) as f64,
            Dt::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
        }
    }

    /// Every element of `bytes`.
    pub fn read_all(self, bytes: &[u8]) -> Vec<f64> {
        (0..bytes.len() / self.size())
            .map(|i| self.read(bytes, i))
            .collect()
    }
}
