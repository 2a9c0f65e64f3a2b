//! FP8 E4M3 encoding and the power-of-two ("ue8m0") tile scales of
//! DeepSeek's FP8 KV caches.
//!
//! Quantization of a tile, as in FlashMLA's `tests/quant.py`:
//! `scale = 2^ceil(log2(max(amax / 448, 1e-4)))`, `q = e4m3(x / scale)`
//! rounded to nearest even and saturated at ±448; dequantization is
//! `e4m3_value(q) * scale`.

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// Floor of a tile's scale before rounding it up to a power of two.
pub const SCALE_FLOOR: f32 = 1e-4;

const fn e4m3_value(b: u8) -> f32 {
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as u32;
    if exp == 0x0f && man == 0x07 {
        return f32::NAN;
    }
    // value = man * 2^-9 (subnormal) or (8 + man) * 2^(exp - 10).
    let mag = if exp == 0 {
        man as f32 / 512.0
    } else {
        let m = (8 + man) as f32;
        let e = exp - 10;
        if e >= 0 {
            m * (1u32 << e) as f32
        } else {
            m / (1u32 << (-e)) as f32
        }
    };
    if b & 0x80 != 0 {
        -mag
    } else {
        mag
    }
}

const fn build_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_value(i as u8);
        i += 1;
    }
    t
}

/// Every E4M3 code decoded: dequantization is one table lookup.
pub static E4M3_TABLE: [f32; 256] = build_table();

/// Decodes one OCP FP8 E4M3 ("fn": no infinities; 0x7f/0xff are NaN).
#[inline(always)]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3_TABLE[b as usize]
}

/// Encodes `x` as E4M3, rounding to nearest even and saturating at ±448.
/// NaN encodes as 0x7f; the sign of zero is kept.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    // Exponent of the binade holding `a`, clamped to the subnormal range.
    let e = if a == 0.0 {
        -6
    } else {
        ((a.to_bits() >> 23) as i32 - 127).max(-6)
    };
    // Quantum of that binade: 3 mantissa bits. Scaling by a power of two is
    // exact, so the only rounding is round_ties_even.
    let quantum = f32::from_bits(((e - 3 + 127) as u32) << 23);
    let mut m = (a / quantum).round_ties_even() as u32;
    let mut e = e;
    if m == 16 {
        // Rounded up into the next binade.
        m = 8;
        e += 1;
    }
    if m < 8 {
        // Subnormal (only possible when e == -6): exponent field 0.
        return sign | m as u8;
    }
    let code = (((e + 7) as u32) << 3) | (m - 8);
    if code > 0x7e {
        sign | 0x7e
    } else {
        sign | code as u8
    }
}

/// The power-of-two scale of a tile whose largest magnitude is `amax`.
pub fn tile_scale(amax: f32) -> f32 {
    let v = (amax / E4M3_MAX).max(SCALE_FLOOR);
    if v.is_nan() {
        return 1.0;
    }
    pow2_ceil(v)
}

/// The smallest power of two >= `v` (a positive normal f32), from the
/// bits: exact, unlike `log2`.
pub fn pow2_ceil(v: f32) -> f32 {
    let bits = v.to_bits();
    let exp = (bits >> 23) as i32 - 127;
    pow2(exp + i32::from(bits & 0x007f_ffff != 0))
}

/// `2^e` for the exponents a tile scale can have.
pub fn pow2(e: i32) -> f32 {
    f32::from_bits(((e.clamp(-126, 127) + 127) as u32) << 23)
}

/// `log2` of a power-of-two scale, as stored in a ue8m0 byte (`e + 127`).
pub fn ue8m0_encode(scale: f32) -> u8 {
    ((scale.to_bits() >> 23) & 0xff) as u8
}

/// The scale a ue8m0 byte stands for (0xff is NaN).
#[inline(always)]
pub fn ue8m0_decode(b: u8) -> f32 {
    if b == 0xff {
        f32::NAN
    } else if b == 0 {
        // 2^-127 is subnormal in f32.
        f32::from_bits(1 << 22)
    } else {
        f32::from_bits((b as u32) << 23)
    }
}

/// Quantizes one tile: writes the codes to `dst` and returns the scale.
pub fn quantize_tile(src: &[f32], dst: &mut [u8]) -> f32 {
    let amax = src.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = tile_scale(amax);
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = f32_to_e4m3(x / scale);
    }
    scale
}

/// Dequantizes one tile into `dst` (vectorized where the CPU allows).
#[inline]
pub fn dequantize_tile(src: &[u8], scale: f32, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if *SIMD_DEQUANT {
        // SAFETY: AVX-512F and F16C were detected at run time.
        unsafe { simd::dequantize_tile(src, scale, dst) };
        return;
    }
    dequantize_tile_portable(src, scale, dst);
}

/// The table-lookup dequantization (the reference for the vector one).
pub fn dequantize_tile_portable(src: &[u8], scale: f32, dst: &mut [f32]) {
    for (d, &b) in dst.iter_mut().zip(src) {
        *d = E4M3_TABLE[b as usize] * scale;
    }
}

/// bf16 bit patterns of every E4M3 magnitude code 0..128 (each E4M3 value,
/// subnormals included, is a bf16 value), split into high and low bytes
/// for byte-table lookups (`vpermi2b`).
pub static BF16_BYTES: once_cell::sync::Lazy<([u8; 128], [u8; 128])> =
    once_cell::sync::Lazy::new(|| {
        let (mut hi, mut lo) = ([0u8; 128], [0u8; 128]);
        for c in 0..128 {
            let bits = half::bf16::from_f32(E4M3_TABLE[c]).to_bits();
            hi[c] = (bits >> 8) as u8;
            lo[c] = bits as u8;
        }
        (hi, lo)
    });

/// Whether this CPU converts E4M3 to bf16 with byte-table lookups
/// (AVX512-VBMI; BW for the word operations).
#[cfg(target_arch = "x86_64")]
pub(crate) static SIMD_BF16: once_cell::sync::Lazy<bool> = once_cell::sync::Lazy::new(|| {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vbmi")
});

/// `codes` as bf16 words in order, into `out` (`codes.len() / 2` pairs:
/// word `2i` low, `2i + 1` high). The codes are `ks.len()` segments of
/// `seg` codes (a multiple of 64); segment `t`'s values are multiplied by
/// `2^ks[t]` (a power-of-two tile scale). Exact while every nonzero result
/// is a normal bf16, which the caller guarantees (`-117 <= k <= 119`).
/// False, nothing written, when the CPU lacks the instructions.
pub fn e4m3_to_bf16_pairs(codes: &[u8], seg: usize, ks: &[i32], out: &mut [u32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if *SIMD_BF16
        && seg.is_multiple_of(64)
        && codes.len() == seg * ks.len()
        && out.len() * 2 >= codes.len()
        && ks.iter().all(|k| (-117..=119).contains(k))
    {
        // SAFETY: features detected; sizes checked.
        unsafe { simd::e4m3_to_bf16_pairs(codes, seg, ks, out) };
        return true;
    }
    let _ = (codes, seg, ks, out);
    false
}

#[cfg(target_arch = "x86_64")]
static SIMD_DEQUANT: once_cell::sync::Lazy<bool> = once_cell::sync::Lazy::new(|| {
    std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("f16c")
});

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use std::arch::x86_64::*;

    /// An e4m3 code moved into an f16 (sign to bit 15, exponent and
    /// mantissa to bits 7..14) reads as the code's value times 2^-8 (the
    /// exponent biases are 15 and 7), subnormals included; NaN codes are
    /// not preserved, which cache and weight data never hold. So: widen,
    /// shift, `vcvtph2ps`, multiply by 256 and by `scale`.
    /// 16 E4M3 codes as f16 bit patterns worth 2^-8 times their values:
    /// sign-extending a code to 16 bits and shifting it left by 7 puts the
    /// exponent and mantissa at bits 7..14 and the sign at bit 15, with a
    /// copy of the sign at bit 14 that the mask clears (3 instructions).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn e4m3_as_f16(codes: __m128i) -> __m256i {
        let w = _mm256_slli_epi16(_mm256_cvtepi8_epi16(codes), 7);
        _mm256_and_si256(w, _mm256_set1_epi16(0xbfffu16 as i16))
    }

    /// `vpermt2b` indices that interleave two byte vectors (low bytes
    /// first, high bytes from the second source) into words: codes 0..32,
    /// then 32..64.
    const WORDS_OF_BYTES: [[u8; 64]; 2] = {
        let mut t = [[0u8; 64]; 2];
        let mut i = 0;
        while i < 64 {
            t[0][i] = (i / 2 + 64 * (i % 2)) as u8;
            t[1][i] = (32 + i / 2 + 64 * (i % 2)) as u8;
            i += 1;
        }
        t
    };

    /// See [`super::e4m3_to_bf16_pairs`].
    ///
    /// # Safety
    /// AVX-512F/BW/VBMI present; `seg % 64 == 0`, `codes.len() == seg *
    /// ks.len()`, `out` holds `codes.len() / 2`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub unsafe fn e4m3_to_bf16_pairs(codes: &[u8], seg: usize, ks: &[i32], out: &mut [u32]) {
        let (thi, tlo) = &*super::BF16_BYTES;
        // SAFETY: tables of 128 bytes read as two 64-byte halves; codes
        // and out sized by the caller.
        unsafe {
            let t = [
                _mm512_loadu_si512(thi.as_ptr() as *const _),
                _mm512_loadu_si512(thi.as_ptr().add(64) as *const _),
                _mm512_loadu_si512(tlo.as_ptr() as *const _),
                _mm512_loadu_si512(tlo.as_ptr().add(64) as *const _),
            ];
            let sign = _mm512_set1_epi8(0x80u8 as i8);
            let mag = _mm512_set1_epi16(0x7fff);
            let words = [
                _mm512_loadu_si512(WORDS_OF_BYTES[0].as_ptr() as *const _),
                _mm512_loadu_si512(WORDS_OF_BYTES[1].as_ptr() as *const _),
            ];
            // Segment by segment: one scale (exponent bias) each.
            let segs = codes.chunks_exact(seg).zip(out.chunks_exact_mut(seg / 2));
            for ((cs, os), &k) in segs.zip(ks) {
                let bias = _mm512_set1_epi16((k << 7) as i16);
                for (c, o) in cs.chunks_exact(64).zip(os.chunks_exact_mut(32)) {
                    let v = _mm512_loadu_si512(c.as_ptr() as *const _);
                    let hi = _mm512_permutex2var_epi8(t[0], v, t[1]);
                    let lo = _mm512_permutex2var_epi8(t[2], v, t[3]);
                    let hi = _mm512_ternarylogic_epi32::<0xF8>(hi, v, sign);
                    for (h, idx) in words.into_iter().enumerate() {
                        let w = _mm512_permutex2var_epi8(lo, idx, hi);
                        // Scale by 2^k in the exponent; zeros stay zero.
                        let nz = _mm512_test_epi16_mask(w, mag);
                        let w = _mm512_mask_add_epi16(w, nz, w, bias);
                        _mm512_storeu_si512(o.as_mut_ptr().add(16 * h) as *mut _, w);
                    }
                }
            }
        }
    }

    /// [`dequantize_tile`] on AVX2 + F16C (CPUs without AVX-512).
    #[target_feature(enable = "avx2,f16c")]
    pub fn dequantize_tile_avx2(src: &[u8], scale: f32, dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let full = n / 16 * 16;
        // Two multiplies, as in the AVX-512 version.
        let s = _mm256_set1_ps(scale);
        let k = _mm256_set1_ps(256.0);
        let mut i = 0;
        while i < full {
            // SAFETY: elements i..i+16 exist in both slices.
            unsafe {
                let h = e4m3_as_f16(_mm_loadu_si128(src.as_ptr().add(i) as *const __m128i));
                let lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
                let hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
                let p = dst.as_mut_ptr().add(i);
                _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_mul_ps(lo, k), s));
                _mm256_storeu_ps(p.add(8), _mm256_mul_ps(_mm256_mul_ps(hi, k), s));
            }
            i += 16;
        }
        super::dequantize_tile_portable(&src[full..n], scale, &mut dst[full..n]);
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub fn dequantize_tile(src: &[u8], scale: f32, dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let full = n / 16 * 16;
        // Two multiplies: `scale * 256` could overflow for huge scales.
        let s = _mm512_set1_ps(scale);
        let k = _mm512_set1_ps(256.0);
        let mut i = 0;
        while i < full {
            // SAFETY: elements i..i+16 exist in both slices.
            unsafe {
                let c = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                let f = _mm512_cvtph_ps(e4m3_as_f16(c));
                _mm512_storeu_ps(
                    dst.as_mut_ptr().add(i),
                    _mm512_mul_ps(_mm512_mul_ps(f, k), s),
                );
            }
            i += 16;
        }
        super::dequantize_tile_portable(&src[full..n], scale, &mut dst[full..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code, at several power-of-two scales, lands in its word in
    /// order with the value `e4m3 * 2^k`.
    #[test]
    fn e4m3_to_bf16_pairs_is_exact_and_in_order() {
        let codes: Vec<u8> = (0..256)
            .map(|c| c as u8)
            .filter(|c| c & 0x7f != 0x7f)
            .chain([0, 0x80])
            .collect();
        let mut codes = codes;
        codes.resize(256, 0x38);
        // One scale for all, then one per 64- or 128-code segment.
        let cases: [(usize, &[i32]); 7] = [
            (256, &[0]),
            (256, &[-20]),
            (256, &[7]),
            (256, &[119]),
            (256, &[-117]),
            (128, &[3, -9]),
            (64, &[119, -117, 0, 5]),
        ];
        for (seg, ks) in cases {
            let mut out = vec![0u32; 128];
            if !e4m3_to_bf16_pairs(&codes, seg, ks, &mut out) {
                eprintln!("SKIPPED e4m3_to_bf16_pairs: CPU lacks avx512vbmi");
                return;
            }
            for (i, &c) in codes.iter().enumerate() {
                let k = ks[i / seg];
                let w = (out[i / 2] >> (16 * (i % 2))) as u16;
                let got = half::bf16::from_bits(w).to_f64();
                let want = E4M3_TABLE[c as usize] as f64 * 2f64.powi(k);
                assert_eq!(got, want, "code {c:#04x} k {k}");
                assert_eq!(w & 0x8000 != 0, c & 0x80 != 0, "sign of {c:#04x}");
            }
        }
    }

    #[test]
    fn every_finite_code_round_trips() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                assert!(b & 0x7f == 0x7f);
                continue;
            }
            assert_eq!(f32_to_e4m3(v), b, "code {b:#04x} = {v}");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_and_saturating() {
        // Between 1.0 (0x38) and 1.125 (0x39): the tie goes to the even code.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        assert_eq!(f32_to_e4m3(1.05), 0x38);
        assert_eq!(f32_to_e4m3(1.1), 0x39);
        // Saturation.
        assert_eq!(f32_to_e4m3(1e9), 0x7e);
        assert_eq!(f32_to_e4m3(-460.0), 0xfe);
        assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7e);
        // 440 is halfway between 416 and 448: even mantissa wins (448 = 0x7e, m=6).
        assert_eq!(f32_to_e4m3(432.0), 0x7e);
        // Subnormals: step 2^-9; half of the smallest rounds to zero (even).
        assert_eq!(f32_to_e4m3(pow2(-10)), 0x00);
        assert_eq!(f32_to_e4m3(3.0 * pow2(-10)), 0x02);
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
        // 15.5/8 * 2^-6 rounds up across the binade edge to 2^-5.
        assert_eq!(f32_to_e4m3(pow2(-6) * 1.97), 0x10);
    }

    #[test]
    fn vector_dequantization_matches_the_table() {
        // Every finite code, at scales across the range, through both paths.
        let codes: Vec<u8> = (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect();
        for scale in [1.0f32, pow2(-13), pow2(7), 0.375, pow2(127), f32::MAX] {
            let mut a = vec![0f32; codes.len()];
            let mut b = vec![0f32; codes.len()];
            dequantize_tile(&codes, scale, &mut a);
            dequantize_tile_portable(&codes, scale, &mut b);
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
            let mut c = b.clone();
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
                c.fill(f32::NAN);
                // SAFETY: the features were detected just above.
                unsafe { simd::dequantize_tile_avx2(&codes, scale, &mut c) };
            }
            for (k, ((x, y), z)) in a.iter().zip(&b).zip(&c).enumerate() {
                assert_eq!(
                    x.to_bits(),
                    y.to_bits(),
                    "code {:#04x} scale {scale}",
                    codes[k]
                );
                assert_eq!(
                    z.to_bits(),
                    y.to_bits(),
                    "avx2: code {:#04x} scale {scale}",
                    codes[k]
                );
            }
        }
    }

    #[test]
    fn tile_scale_is_the_next_power_of_two() {
        assert_eq!(tile_scale(448.0), 1.0);
        assert_eq!(tile_scale(449.0), 2.0);
        assert_eq!(tile_scale(0.0), pow2(-13)); // 1e-4 -> 2^-13 = 1.22e-4
        assert_eq!(tile_scale(224.0), 0.5);
        assert_eq!(ue8m0_encode(1.0), 127);
        assert_eq!(ue8m0_decode(ue8m0_encode(pow2(-13))), pow2(-13));
    }
}
