//! The FP8 KV-cache formats through the C ABI: `mlart_kv_row_bytes`,
//! `mlart_kv_block_bytes`, `mlart_kv_quantize` and `mlart_kv_dequantize`.
//!
//! Every expected byte is derived here from the specification (mlart.h and
//! FlashMLA's `tests/quant.py`), with an independent E4M3 encoder that
//! searches all codes for the nearest value (ties to even), an independent
//! scale computation `2^ceil(log2(max(amax / 448, 1e-4)))` in f64, and the
//! documented byte offsets; a few bytes are also spelled out by hand. The
//! destination is pre-filled with garbage so that MODEL1's pad bytes and
//! block padding are seen to be zeroed, and the slots and blocks past the
//! tokens written are seen to be left alone.

mod common;

use common::*;
use mlart::ffi::format::*;
use mlart::ffi::types::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

const GARBAGE: u8 = 0xAA;

// ---------------------------------------------------------------------------
// Calling the helpers.
// ---------------------------------------------------------------------------

fn row_bytes(format: mlart_kv_format, d_qk: i32) -> usize {
    let mut out = usize::MAX;
    expect_ok(
        &format!("mlart_kv_row_bytes({format}, {d_qk})"),
        mlart_kv_row_bytes(format, d_qk, &mut out),
    );
    out
}

fn block_bytes(format: mlart_kv_format, d_qk: i32, bs: i32) -> usize {
    let mut out = usize::MAX;
    expect_ok(
        &format!("mlart_kv_block_bytes({format}, {d_qk}, {bs})"),
        mlart_kv_block_bytes(format, d_qk, bs, &mut out),
    );
    out
}

fn quantize(
    format: mlart_kv_format,
    d_qk: usize,
    bs: usize,
    n: usize,
    dtype: mlart_dtype,
    src: &[u8],
    dst: &mut [u8],
) {
    let blocks = n.div_ceil(bs);
    assert!(dst.len() >= blocks * block_bytes(format, d_qk as i32, bs as i32));
    expect_ok(
        &format!("mlart_kv_quantize(format {format}, bs {bs}, n {n}, dtype {dtype})"),
        mlart_kv_quantize(
            format,
            d_qk as i32,
            bs as i32,
            n as i32,
            dtype,
            src.as_ptr().cast(),
            dst.as_mut_ptr().cast(),
        ),
    );
}

fn dequantize(
    format: mlart_kv_format,
    d_qk: usize,
    bs: usize,
    n: usize,
    src: &[u8],
    dtype: mlart_dtype,
    dst: &mut [u8],
) {
    expect_ok(
        &format!("mlart_kv_dequantize(format {format}, bs {bs}, n {n}, dtype {dtype})"),
        mlart_kv_dequantize(
            format,
            d_qk as i32,
            bs as i32,
            n as i32,
            src.as_ptr().cast(),
            dtype,
            dst.as_mut_ptr().cast(),
        ),
    );
}

/// Dequantizes to f32 values.
fn dequantize_f32(fp8: Fp8, bs: usize, n: usize, src: &[u8]) -> Vec<f32> {
    let mut dst = vec![0u8; n * fp8.d_qk() * 4];
    dequantize(
        fp8.format(),
        fp8.d_qk(),
        bs,
        n,
        src,
        MLART_DTYPE_F32,
        &mut dst,
    );
    dst.chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Element type of rows handed to `mlart_kv_quantize`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Src {
    F32,
    Bf16,
    F16,
}

impl Src {
    fn dtype(self) -> mlart_dtype {
        match self {
            Src::F32 => MLART_DTYPE_F32,
            Src::Bf16 => MLART_DTYPE_BF16,
            Src::F16 => MLART_DTYPE_F16,
        }
    }

    /// Little-endian bytes of `x` in this type and the exact values they hold.
    fn encode(self, x: &[f32]) -> (Vec<u8>, Vec<f64>) {
        let mut bytes = Vec::new();
        let mut vals = Vec::with_capacity(x.len());
        for &v in x {
            match self {
                Src::F32 => {
                    bytes.extend_from_slice(&v.to_le_bytes());
                    vals.push(v as f64);
                }
                Src::Bf16 => {
                    let b = bf16_bits(v);
                    bytes.extend_from_slice(&b.to_le_bytes());
                    vals.push(bf16_value(b) as f64);
                }
                Src::F16 => {
                    let h = half::f16::from_f32(v);
                    assert!(h.is_finite(), "{v} does not fit f16");
                    bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                    vals.push(h.to_f64());
                }
            }
        }
        (bytes, vals)
    }
}

/// The expected cache after quantizing `rows` (exact values, `[n, d_qk]`)
/// into `before`: the spec's bytes for every token, MODEL1's padding of
/// every block written zeroed, everything else as it was.
fn expected_cache(fp8: Fp8, bs: usize, rows: &[f64], before: &[u8]) -> Vec<u8> {
    let d = fp8.d_qk();
    let n = rows.len() / d;
    let bb = fp8.block_bytes(bs);
    let mut want = before.to_vec();
    for b in 0..n.div_ceil(bs) {
        want[b * bb + bs * fp8.row_bytes()..(b + 1) * bb].fill(0);
    }
    for t in 0..n {
        let base = (t / bs) * bb;
        for (off, bytes) in fp8.encode_token(bs, t % bs, &rows[t * d..(t + 1) * d]) {
            want[base + off..base + off + bytes.len()].copy_from_slice(&bytes);
        }
    }
    want
}

/// Names the part of a cache a byte offset falls in (for failure messages).
fn describe(fp8: Fp8, bs: usize, at: usize) -> String {
    let bb = fp8.block_bytes(bs);
    let (block, off) = (at / bb, at % bb);
    let part = match fp8 {
        Fp8::V32 => {
            let (slot, o) = (off / 656, off % 656);
            let what = if o < 512 {
                format!("e4m3 dim {o} (tile {})", o / 128)
            } else if o < 528 {
                format!("scale of tile {}", (o - 512) / 4)
            } else {
                format!("rope dim {}", 512 + (o - 528) / 2)
            };
            format!("token slot {slot}, {what}")
        }
        Fp8::Model1 => {
            if off < bs * 576 {
                let (slot, o) = (off / 576, off % 576);
                let what = if o < 448 {
                    format!("e4m3 dim {o} (tile {})", o / 64)
                } else {
                    format!("rope dim {}", 448 + (o - 448) / 2)
                };
                format!("token slot {slot}, {what}")
            } else if off < bs * 584 {
                let (slot, o) = ((off - bs * 576) / 8, (off - bs * 576) % 8);
                if o < 7 {
                    format!("token slot {slot}, ue8m0 scale of tile {o}")
                } else {
                    format!("token slot {slot}, pad byte")
                }
            } else {
                "block padding".to_string()
            }
        }
    };
    format!("block {block}, {part}")
}

fn assert_bytes_eq(fp8: Fp8, bs: usize, got: &[u8], want: &[u8], ctx: &str) {
    assert_eq!(got.len(), want.len());
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{ctx}: {} bytes differ; first at byte {i} ({}): got {:#04x}, want {:#04x}",
            bad.len(),
            describe(fp8, bs, i),
            got[i],
            want[i]
        );
    }
}

// ---------------------------------------------------------------------------
// Crafted inputs.
// ---------------------------------------------------------------------------

/// Every positive finite E4M3 value, ascending.
fn e4m3_grid() -> Vec<f64> {
    (0u8..=0x7e).map(e4m3_value).collect()
}

/// Tiles of `tile` values exercising every rule of the quantizer.
fn crafted_tiles(tile: usize, rng: &mut SmallRng) -> Vec<(String, Vec<f32>)> {
    let grid = e4m3_grid();
    let mut v: Vec<(String, Vec<f32>)> = Vec::new();
    let make = |f: &dyn Fn(usize) -> f32| -> Vec<f32> { (0..tile).map(f).collect() };
    v.push(("zeros".into(), vec![0.0; tile]));
    v.push(("negative zeros".into(), vec![-0.0; tile]));
    v.push((
        "signed zeros".into(),
        make(&|i| if i % 3 == 1 { -0.0 } else { 0.0 }),
    ));
    // Below the 1e-4 floor: scale 2^-13, codes in the subnormal range.
    v.push((
        "tiny (floor)".into(),
        make(&|i| (i as f32 - tile as f32 / 2.0) * 3e-7),
    ));
    v.push((
        "f32 subnormals".into(),
        make(&|i| {
            let x = f32::from_bits(1 + 977 * i as u32);
            if i % 2 == 1 {
                -x
            } else {
                x
            }
        }),
    ));
    // Ties and negative ties in the subnormal range at the floor scale.
    let floor = 2f32.powi(-13);
    v.push((
        "floor-scale subnormal ties".into(),
        make(&|i| {
            let m = [1.0f32, 3.0, 5.0, -1.0, -3.0, 7.0, 15.0, -17.0][i % 8];
            m * 2f32.powi(-10) * floor
        }),
    ));
    // amax / 448 exactly 1e-4 in f32 terms: still the floor.
    v.push((
        "amax = 448e-4".into(),
        make(&|i| {
            if i == 5 {
                -0.0448
            } else {
                0.01 * (i % 7) as f32
            }
        }),
    ));
    // amax = 448 * 2^-13 exactly: scale 2^-13 not floored but equal.
    v.push((
        "amax = 448 * 2^-13".into(),
        make(&|i| {
            if i == 0 {
                448.0 * floor
            } else {
                i as f32 * 1e-5
            }
        }),
    ));
    // Just above: scale 2^-12.
    let up = f32::from_bits((448.0 * floor).to_bits() + 1);
    v.push((
        "amax = next after 448 * 2^-13".into(),
        make(&|i| {
            if i == tile - 1 {
                up
            } else {
                -(i as f32) * 1e-5
            }
        }),
    ));
    // Every E4M3 value, at several power-of-two scales: exact codes.
    for k in [0, -5, 7, 20, -13, 100] {
        let s = 2f64.powi(k);
        let mut t: Vec<f32> = (0..tile)
            .map(|i| {
                let g = grid[(i * 7 + k.unsigned_abs() as usize) % grid.len()];
                let x = (g * s) as f32;
                if i % 2 == 1 {
                    -x
                } else {
                    x
                }
            })
            .collect();
        t[tile / 2] = (448.0 * s) as f32;
        v.push((format!("e4m3 grid at scale 2^{k}"), t));
    }
    // Just above 448 * 2^k: the scale doubles, the max code becomes 224.
    for k in [0, -3, 9] {
        let top = f32::from_bits(((448.0 * 2f64.powi(k)) as f32).to_bits() + 1);
        let t = make(&|i| {
            if i == 1 {
                -top
            } else {
                (grid[i % grid.len()] * 2f64.powi(k)) as f32
            }
        });
        v.push((format!("amax just above 448 * 2^{k}"), t));
    }
    // Exact midpoints between neighbouring codes (ties to even), at scale 1
    // (448 anchors the scale) and at scale 2^-4.
    for k in [0, -4] {
        let s = 2f64.powi(k);
        let t = make(&|i| {
            if i == 0 {
                return (448.0 * s) as f32;
            }
            let c = (i * 5) % 0x7e;
            let mid = (grid[c] + grid[c + 1]) / 2.0;
            let x = (mid * s) as f32;
            if i % 4 == 3 {
                -x
            } else {
                x
            }
        });
        v.push((format!("ties at scale 2^{k}"), t));
    }
    // Near ties: just above and just below each midpoint.
    v.push((
        "near ties".into(),
        make(&|i| {
            if i == 0 {
                return 448.0;
            }
            let c = (i * 3) % 0x7e;
            let mid = ((grid[c] + grid[c + 1]) / 2.0) as f32;
            if mid == 0.0 {
                return 0.0;
            }
            let bits = mid.to_bits();
            if i % 2 == 0 {
                f32::from_bits(bits + 1)
            } else {
                -f32::from_bits(bits - 1)
            }
        }),
    ));
    // The top binade: 416 | 448; 432 is a tie (to 448, even), values just
    // under 448 round up to the largest code.
    v.push((
        "top binade".into(),
        make(&|i| {
            [
                448.0, 447.99, -447.5, 440.0, 432.0, -432.0, 431.9, 424.0, 417.0, 416.0, -400.0,
                392.0, 1.0, -0.0,
            ][i % 14]
        }),
    ));
    // Powers of two across every binade at scale 1 (and signs).
    v.push((
        "powers of two".into(),
        make(&|i| {
            if i == 0 {
                return -448.0;
            }
            let e = (i % 18) as i32 - 9; // 2^-9 ..= 2^8
            let x = 2f32.powi(e);
            if i % 5 == 0 {
                -x
            } else {
                x
            }
        }),
    ));
    // Crossing a binade edge by rounding up: 2^-6 * 1.97 -> 2^-5 territory.
    v.push((
        "binade round-up".into(),
        make(&|i| {
            if i == 0 {
                return 448.0;
            }
            let e = (i % 14) as i32 - 6;
            2f32.powi(e) * if i % 2 == 0 { 1.97 } else { -1.9999 }
        }),
    ));
    // amax / scale in (224, 232): the largest code is 224 (used by the
    // re-quantization test: the scale halves).
    v.push((
        "max code 224".into(),
        make(&|i| {
            if i == 2 {
                -229.0 / 64.0
            } else {
                ((i % 50) as f32 - 25.0) / 64.0
            }
        }),
    ));
    // Huge magnitudes (scale 2^120).
    v.push(("huge".into(), make(&|i| 0.75e38 * ((i % 9) as f32 - 4.0))));
    // Random tiles at many magnitudes.
    for mag in [1e-6f64, 1e-3, 0.05, 1.0, 300.0, 1e6] {
        let t = (0..tile).map(|_| (normal(rng) * mag) as f32).collect();
        v.push((format!("random * {mag:e}"), t));
    }
    v
}

/// Rope values (64 per token) exercising bf16 rounding.
fn crafted_rope(token: usize, rng: &mut SmallRng) -> Vec<f32> {
    let specials = [
        0.0f32,
        -0.0,
        1.0 + 2f32.powi(-8),       // tie -> 1.0 (even)
        1.0 + 3.0 * 2f32.powi(-8), // tie -> 1 + 2^-6 (even)
        -(1.0 + 2f32.powi(-8)),
        1.0 + 2f32.powi(-8) + 2f32.powi(-20), // above the tie: up
        f32::from_bits(1),                    // f32 subnormal
        -1e-39,
        3.38e38, // the bf16 maximum's binade
        65504.0,
        -2.5,
        0.1,
        1e-30,
    ];
    (0..64)
        .map(|j| {
            if (j + token).is_multiple_of(3) {
                specials[(j + token) % specials.len()]
            } else {
                (normal(rng) * 0.3) as f32
            }
        })
        .collect()
}

/// `n` tokens built from the crafted tiles (cycled) and ropes.
fn crafted_rows(fp8: Fp8, n: usize, src: Src, seed: u64) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let tiles = crafted_tiles(fp8.tile(), &mut rng);
    let mut rows = Vec::with_capacity(n * fp8.d_qk());
    let mut k = 0usize;
    for t in 0..n {
        for _ in 0..fp8.tiles() {
            let (_, tile) = &tiles[k % tiles.len()];
            k += 1;
            let fits = |x: &f32| match src {
                Src::F16 => x.abs() <= 60000.0,
                Src::Bf16 => x.abs() <= 3.3e38,
                Src::F32 => true,
            };
            if tile.iter().all(fits) {
                rows.extend_from_slice(tile);
            } else {
                rows.extend(tile.iter().map(|x| x * 2f32.powi(-120)));
            }
        }
        let rope = crafted_rope(t, &mut rng);
        rows.extend(rope.iter().map(|&x| match src {
            Src::F16 if x.abs() > 60000.0 => 1.5,
            _ => x,
        }));
    }
    rows
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[test]
fn row_and_block_sizes() {
    assert_eq!(row_bytes(MLART_KV_FORMAT_FP8_V32, 576), 656);
    assert_eq!(row_bytes(MLART_KV_FORMAT_FP8_MODEL1, 512), 584);
    for (format, size) in [
        (MLART_KV_FORMAT_F32, 4),
        (MLART_KV_FORMAT_BF16, 2),
        (MLART_KV_FORMAT_F16, 2),
    ] {
        for d in [1, 7, 64, 100, 512, 576, 1024] {
            assert_eq!(row_bytes(format, d), d as usize * size, "format {format}");
            for bs in [1, 3, 64, 100] {
                assert_eq!(
                    block_bytes(format, d, bs),
                    (d * bs) as usize * size,
                    "format {format}, d_qk {d}, bs {bs}"
                );
            }
        }
    }
    for bs in [1usize, 2, 3, 16, 63, 64, 65, 71, 72, 100, 144, 1000] {
        assert_eq!(
            block_bytes(MLART_KV_FORMAT_FP8_V32, 576, bs as i32),
            656 * bs
        );
        // bs * 584 rounded up to a multiple of 576 (exact when 72 | bs).
        let want = (bs * 584).div_ceil(576) * 576;
        assert_eq!(
            block_bytes(MLART_KV_FORMAT_FP8_MODEL1, 512, bs as i32),
            want,
            "MODEL1 bs {bs}"
        );
        assert_eq!(want, Fp8::Model1.block_bytes(bs));
    }
    // Spelled out.
    for (bs, want) in [(1, 1152), (2, 1728), (3, 2304), (64, 37440), (72, 42048)] {
        assert_eq!(block_bytes(MLART_KV_FORMAT_FP8_MODEL1, 512, bs), want);
    }
}

#[test]
fn size_errors() {
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    type Case<'a> = (mlart_kv_format, i32, i32, mlart_status, &'a [&'a str]);
    let cases: [Case; 12] = [
        (
            MLART_KV_FORMAT_FP8_V32,
            512,
            64,
            inv,
            &["d_qk = 512", "576"],
        ),
        (MLART_KV_FORMAT_FP8_V32, 575, 64, inv, &["d_qk = 575"]),
        (
            MLART_KV_FORMAT_FP8_MODEL1,
            576,
            64,
            inv,
            &["d_qk = 576", "512"],
        ),
        (MLART_KV_FORMAT_FP8_MODEL1, 64, 64, inv, &["d_qk = 64"]),
        (5, 576, 64, inv, &["format = 5"]),
        (u32::MAX, 576, 64, inv, &[&format!("format = {}", u32::MAX)]),
        (MLART_KV_FORMAT_BF16, 0, 64, inv, &["d_qk = 0"]),
        (MLART_KV_FORMAT_BF16, -3, 64, inv, &["d_qk = -3"]),
        (MLART_KV_FORMAT_F32, 1025, 64, inv, &["d_qk = 1025"]),
        (MLART_KV_FORMAT_FP8_V32, 576, 0, inv, &["block_size = 0"]),
        (
            MLART_KV_FORMAT_FP8_MODEL1,
            512,
            -1,
            inv,
            &["block_size = -1"],
        ),
        (
            MLART_KV_FORMAT_F16,
            64,
            i32::MIN,
            inv,
            &["block_size = -2147483648"],
        ),
    ];
    for (format, d, bs, status, needles) in cases {
        let mut out = 12345usize;
        expect_error(
            &format!("block_bytes({format}, {d}, {bs})"),
            mlart_kv_block_bytes(format, d, bs, &mut out),
            status,
            needles,
        );
        assert_eq!(out, 12345, "block_bytes wrote *out on error");
        // row_bytes has no block size: only the format/d_qk errors apply.
        if !needles[0].starts_with("block_size") {
            expect_error(
                &format!("row_bytes({format}, {d})"),
                mlart_kv_row_bytes(format, d, &mut out),
                status,
                needles,
            );
            assert_eq!(out, 12345, "row_bytes wrote *out on error");
        }
    }
    let null = MLART_STATUS_NULL_POINTER;
    expect_error(
        "row_bytes(out = NULL)",
        mlart_kv_row_bytes(MLART_KV_FORMAT_FP8_V32, 576, std::ptr::null_mut()),
        null,
        &["out is NULL"],
    );
    expect_error(
        "block_bytes(out = NULL)",
        mlart_kv_block_bytes(MLART_KV_FORMAT_FP8_MODEL1, 512, 64, std::ptr::null_mut()),
        null,
        &["out is NULL"],
    );
}

/// Hand-derived bytes for a few tokens, independent of the test's encoder.
#[test]
fn hand_checked_bytes() {
    for fp8 in [Fp8::V32, Fp8::Model1] {
        let d = fp8.d_qk();
        let mut row = vec![0.0f32; d];
        // Tile 0: scale 1 (amax 448).
        let tile0: [(f32, u8); 20] = [
            (448.0, 0x7e),
            (-448.0, 0xfe),
            (447.0, 0x7e),
            (440.0, 0x7e), // nearer 448 than 416
            (432.0, 0x7e), // tie 416 (0x7d, odd) | 448 (0x7e, even) -> 448
            (420.0, 0x7d), // nearer 416
            (256.0, 0x78),
            (240.0, 0x77),
            (1.0, 0x38),
            (1.0625, 0x38), // tie 1.0 | 1.125 -> 1.0
            (1.1875, 0x3a), // tie 1.125 | 1.25 -> 1.25
            (-1.1875, 0xba),
            (0.96875, 0x38), // tie 0.9375 | 1.0 -> 1.0 (0x38 even)
            (-0.0, 0x80),
            (0.0, 0x00),
            (0.001953125, 0x01),  // 2^-9, the smallest subnormal
            (0.0009765625, 0x00), // 2^-10, tie 0 | 2^-9 -> 0
            (-0.0009765625, 0x80),
            (0.0029296875, 0x02), // 3 * 2^-10, tie 2^-9 | 2^-8 -> 2^-8
            // Codes with exponent field 1 are (8 + m) * 2^-9: 15.75 * 2^-9
            // rounds up across the binade edge to 16 * 2^-9 = 2^-5 (0x10).
            (15.75 / 512.0, 0x10),
        ];
        for (i, &(x, _)) in tile0.iter().enumerate() {
            row[i] = x;
        }
        // Tile 1: all zero -> floor scale 2^-13. Tile 2: amax 1 -> scale 2^-8;
        // 1.0 / 2^-8 = 256 -> 0x78, -0.5 -> 128 -> 0xf0.
        let t = fp8.tile();
        row[2 * t] = 1.0;
        row[2 * t + 1] = -0.5;
        // Rope: bf16 ties.
        let nope = fp8.nope();
        row[nope] = 1.0 + 2f32.powi(-8); // -> 0x3f80
        row[nope + 1] = 1.0 + 3.0 * 2f32.powi(-8); // -> 0x3f82
        row[nope + 2] = -0.0; // -> 0x8000
        row[nope + 3] = -2.0; // -> 0xc000
        let (src, _) = Src::F32.encode(&row);
        let bs = 2;
        let mut dst = vec![GARBAGE; fp8.block_bytes(bs)];
        quantize(fp8.format(), d, bs, 1, MLART_DTYPE_F32, &src, &mut dst);
        let ctx = format!("{fp8:?}");
        for (i, &(x, code)) in tile0.iter().enumerate() {
            assert_eq!(dst[i], code, "{ctx}: tile 0 dim {i} = {x}");
        }
        assert!(dst[tile0.len()..t].iter().all(|&b| b == 0), "{ctx}");
        assert!(dst[t..2 * t].iter().all(|&b| b == 0), "{ctx}: zero tile");
        assert_eq!(&dst[2 * t..2 * t + 2], &[0x78, 0xf0], "{ctx}: tile 2");
        let r = fp8.rope_at(0);
        assert_eq!(
            &dst[r..r + 8],
            &[0x80, 0x3f, 0x82, 0x3f, 0x00, 0x80, 0x00, 0xc0],
            "{ctx}: rope"
        );
        let sc = fp8.scales_at(bs, 0);
        match fp8 {
            Fp8::V32 => {
                // 1.0 = 0x3f800000, 2^-13 = 0x39000000, 2^-8 = 0x3b800000.
                assert_eq!(
                    &dst[sc..sc + 16],
                    &[0, 0, 0x80, 0x3f, 0, 0, 0, 0x39, 0, 0, 0x80, 0x3b, 0, 0, 0, 0x39],
                    "{ctx}: scales"
                );
            }
            Fp8::Model1 => {
                // ue8m0: 127 + log2(scale); pad byte 0.
                assert_eq!(
                    &dst[sc..sc + 8],
                    &[127, 114, 119, 114, 114, 114, 114, 0],
                    "{ctx}: scales"
                );
                // Slot 1 of the block was not written: its data and scales
                // keep the garbage; the block padding is zeroed.
                assert!(dst[576..1152].iter().all(|&b| b == GARBAGE), "{ctx}");
                assert!(dst[sc + 8..sc + 16].iter().all(|&b| b == GARBAGE), "{ctx}");
                assert!(dst[2 * 584..].iter().all(|&b| b == 0), "{ctx}: padding");
            }
        }
        if fp8 == Fp8::V32 {
            assert!(dst[656..].iter().all(|&b| b == GARBAGE), "{ctx}: slot 1");
        }
    }
}

/// Crafted tiles and ropes, every source dtype, several block sizes and
/// token counts: every byte as the spec says.
#[test]
fn crafted_inputs_are_byte_exact() {
    let t0 = Instant::now();
    let mut checked = 0usize;
    for fp8 in [Fp8::V32, Fp8::Model1] {
        let block_cases: &[(usize, usize)] = match fp8 {
            Fp8::V32 => &[(1, 9), (3, 8), (64, 40), (5, 5)],
            Fp8::Model1 => &[(1, 6), (2, 7), (3, 13), (64, 40), (72, 10)],
        };
        for (ci, &(bs, n)) in block_cases.iter().enumerate() {
            for (si, src) in [Src::F32, Src::Bf16, Src::F16].into_iter().enumerate() {
                let seed = case_seed(1, (ci * 3 + si) as u64 + 100 * (fp8 as u64));
                let rows = crafted_rows(fp8, n, src, seed);
                let (bytes, vals) = src.encode(&rows);
                // One spare block after the last one written.
                let blocks = n.div_ceil(bs) + 1;
                let before = vec![GARBAGE; blocks * fp8.block_bytes(bs)];
                let mut dst = before.clone();
                quantize(
                    fp8.format(),
                    fp8.d_qk(),
                    bs,
                    n,
                    src.dtype(),
                    &bytes,
                    &mut dst,
                );
                let want = expected_cache(fp8, bs, &vals, &before);
                let ctx = format!("{fp8:?}, block_size {bs}, {n} tokens, src {src:?}");
                assert_bytes_eq(fp8, bs, &dst, &want, &ctx);
                checked += dst.len();

                // The scales read back from the bytes are the spec's scales
                // of the source values, tile by tile.
                let d = fp8.d_qk();
                let bb = fp8.block_bytes(bs);
                for t in 0..n {
                    let block = &dst[(t / bs) * bb..(t / bs + 1) * bb];
                    let sc = fp8.scales_at(bs, t % bs);
                    for k in 0..fp8.tiles() {
                        let x = &vals[t * d + k * fp8.tile()..t * d + (k + 1) * fp8.tile()];
                        let amax = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                        let s = tile_scale(amax);
                        let got = match fp8 {
                            Fp8::V32 => f32::from_le_bytes(
                                block[sc + 4 * k..sc + 4 * k + 4].try_into().unwrap(),
                            ) as f64,
                            Fp8::Model1 => 2f64.powi(block[sc + k] as i32 - 127),
                        };
                        assert_eq!(got, s, "{ctx}: token {t} tile {k} (amax {amax:e})");
                        assert!(
                            s >= amax / 448.0
                                && s >= 1e-4
                                && (s / 2.0 < amax / 448.0 || s / 2.0 < 1e-4)
                        );
                    }
                    if fp8 == Fp8::Model1 {
                        assert_eq!(block[sc + 7], 0, "{ctx}: token {t} pad byte");
                    }
                }
            }
        }
    }
    println!(
        "crafted_inputs_are_byte_exact: {checked} bytes checked, {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}

/// Random rows at many magnitudes: bytes exact, and the dequantized values
/// within half an E4M3 step of the source (the rope exact to bf16).
#[test]
fn random_round_trip_error_bound() {
    let t0 = Instant::now();
    let mut worst_rel_to_bound = 0.0f64;
    for fp8 in [Fp8::V32, Fp8::Model1] {
        for (ci, &(bs, n)) in [(1usize, 7usize), (16, 50), (64, 130)].iter().enumerate() {
            let seed = case_seed(2, ci as u64 + 10 * fp8 as u64);
            let mut rng = SmallRng::seed_from_u64(seed);
            let d = fp8.d_qk();
            let mut rows = Vec::with_capacity(n * d);
            for _ in 0..n {
                for _ in 0..fp8.tiles() {
                    // A magnitude per tile, 1e-7 .. 1e6; some tiles have an outlier.
                    let mag = 10f64.powf(rng.random_range(-7.0..6.0));
                    let outlier = rng.random_bool(0.3);
                    for j in 0..fp8.tile() {
                        let mut x = normal(&mut rng) * mag;
                        if outlier && j == 3 {
                            x *= 50.0;
                        }
                        rows.push(x as f32);
                    }
                }
                for _ in 0..d - fp8.nope() {
                    rows.push((normal(&mut rng) * 10f64.powf(rng.random_range(-3.0..3.0))) as f32);
                }
            }
            let ctx = format!("{fp8:?}, block_size {bs}, {n} tokens, seed {seed:#x}");
            let (bytes, vals) = Src::F32.encode(&rows);
            let before = vec![GARBAGE; n.div_ceil(bs) * fp8.block_bytes(bs)];
            let mut cache = before.clone();
            quantize(fp8.format(), d, bs, n, MLART_DTYPE_F32, &bytes, &mut cache);
            assert_bytes_eq(
                fp8,
                bs,
                &cache,
                &expected_cache(fp8, bs, &vals, &before),
                &ctx,
            );

            let back = dequantize_f32(fp8, bs, n, &cache);
            for t in 0..n {
                for k in 0..fp8.tiles() {
                    let r = t * d + k * fp8.tile()..t * d + (k + 1) * fp8.tile();
                    let amax = vals[r.clone()].iter().fold(0.0f64, |m, v| m.max(v.abs()));
                    let s = tile_scale(amax);
                    for i in r {
                        let (x, y) = (vals[i], back[i] as f64);
                        // Round to nearest: at most half the E4M3 spacing at
                        // |x / s| (never saturating: |x / s| <= 448).
                        let bound = s * e4m3_half_ulp(x / s);
                        let err = (y - x).abs();
                        assert!(
                            err <= bound,
                            "{ctx}: token {t} dim {} = {x:e} -> {y:e}, error {err:e} > {bound:e} (scale {s:e})",
                            i - t * d
                        );
                        // A coarser, scale-free form of the same bound.
                        assert!(err <= (x.abs() / 16.0).max(s * 2f64.powi(-10)));
                        worst_rel_to_bound = worst_rel_to_bound.max(err / bound);
                    }
                }
                for i in t * d + fp8.nope()..(t + 1) * d {
                    assert_eq!(back[i], bf16_round(vals[i] as f32), "{ctx}: rope dim {i}");
                }
            }
            // Our own decoder of the bytes agrees with the library's.
            let bb = fp8.block_bytes(bs);
            for t in 0..n {
                let mine = fp8.decode_token(bs, &cache[(t / bs) * bb..(t / bs + 1) * bb], t % bs);
                for (j, &m) in mine.iter().enumerate() {
                    assert_eq!(back[t * d + j] as f64, m, "{ctx}: token {t} dim {j}");
                }
            }
            // BF16 output is exact (4 significant bits times a power of
            // two); F16 is the F32 result rounded to f16.
            let mut bf = vec![0u8; n * d * 2];
            dequantize(fp8.format(), d, bs, n, &cache, MLART_DTYPE_BF16, &mut bf);
            let mut hf = vec![0u8; n * d * 2];
            dequantize(fp8.format(), d, bs, n, &cache, MLART_DTYPE_F16, &mut hf);
            for (i, &x) in back.iter().enumerate() {
                let b = u16::from_le_bytes([bf[2 * i], bf[2 * i + 1]]);
                assert_eq!(b, bf16_bits(x), "{ctx}: bf16 dequantize of element {i}");
                assert_eq!(
                    bf16_value(b),
                    x,
                    "{ctx}: bf16 dequantize of element {i} is exact"
                );
                let h = u16::from_le_bytes([hf[2 * i], hf[2 * i + 1]]);
                assert_eq!(
                    h,
                    half::f16::from_f32(x).to_bits(),
                    "{ctx}: f16 dequantize of element {i}"
                );
            }
        }
    }
    println!(
        "random_round_trip_error_bound: worst error / bound {worst_rel_to_bound:.3}, {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}

/// Quantizing already-quantized values gives the same values back, and
/// the bytes the spec says. The bytes are identical too, except in a tile
/// whose largest code is 224 or less without the scale being floored:
/// there the spec's scale halves and every code doubles.
#[test]
fn requantizing_dequantized_data() {
    let mut halved = 0usize;
    let mut same = 0usize;
    for fp8 in [Fp8::V32, Fp8::Model1] {
        let (bs, n) = (5usize, 23usize);
        let d = fp8.d_qk();
        let rows = crafted_rows(fp8, n, Src::F32, case_seed(3, fp8 as u64));
        let (bytes, vals) = Src::F32.encode(&rows);
        let mut first = vec![GARBAGE; n.div_ceil(bs) * fp8.block_bytes(bs)];
        quantize(fp8.format(), d, bs, n, MLART_DTYPE_F32, &bytes, &mut first);
        let garbage = vec![GARBAGE; first.len()];
        let want = expected_cache(fp8, bs, &vals, &garbage);
        assert_bytes_eq(fp8, bs, &first, &want, &format!("{fp8:?}, first pass"));
        let y = dequantize_f32(fp8, bs, n, &first);
        let (ybytes, yvals) = Src::F32.encode(&y);
        let mut second = vec![0x55u8; first.len()];
        quantize(
            fp8.format(),
            d,
            bs,
            n,
            MLART_DTYPE_F32,
            &ybytes,
            &mut second,
        );
        let ctx = format!("{fp8:?}");
        assert_bytes_eq(
            fp8,
            bs,
            &second,
            &expected_cache(fp8, bs, &yvals, &vec![0x55u8; first.len()]),
            &ctx,
        );
        let z = dequantize_f32(fp8, bs, n, &second);
        for (i, (a, b)) in y.iter().zip(&z).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{ctx}: element {i}: {a} -> {b}");
        }
        // Tile by tile: the same codes and scale, or half the scale and
        // twice the values.
        let bb = fp8.block_bytes(bs);
        for t in 0..n {
            let (b, slot) = (t / bs, t % bs);
            let (f, s) = (&first[b * bb..(b + 1) * bb], &second[b * bb..(b + 1) * bb]);
            let sc = fp8.scales_at(bs, slot);
            for k in 0..fp8.tiles() {
                let r =
                    fp8.data_at(slot) + k * fp8.tile()..fp8.data_at(slot) + (k + 1) * fp8.tile();
                let max_code = f[r.clone()]
                    .iter()
                    .map(|&c| e4m3_value(c).abs())
                    .fold(0.0, f64::max);
                let scale = |blk: &[u8]| match fp8 {
                    Fp8::V32 => {
                        f32::from_le_bytes(blk[sc + 4 * k..sc + 4 * k + 4].try_into().unwrap())
                            as f64
                    }
                    Fp8::Model1 => 2f64.powi(blk[sc + k] as i32 - 127),
                };
                let (s1, s2) = (scale(f), scale(s));
                let floored = s1 == 2f64.powi(-13);
                if max_code > 224.0 || floored || max_code == 0.0 {
                    assert_eq!(&f[r.clone()], &s[r.clone()], "{ctx}: token {t} tile {k}");
                    assert_eq!(s1, s2, "{ctx}: token {t} tile {k}");
                    same += 1;
                } else {
                    assert_eq!(
                        s2,
                        s1 / 2.0,
                        "{ctx}: token {t} tile {k} (max code {max_code})"
                    );
                    for (&c1, &c2) in f[r.clone()].iter().zip(&s[r]) {
                        assert_eq!(e4m3_value(c2), 2.0 * e4m3_value(c1));
                    }
                    halved += 1;
                }
            }
        }
    }
    assert!(
        halved > 0,
        "the crafted rows include a tile with max code 224"
    );
    println!(
        "requantizing_dequantized_data: {same} tiles identical, {halved} with the scale halved"
    );
}

/// The plain formats through the same helpers: F32 is a copy, BF16/F16
/// round to nearest even; blocks are contiguous rows.
#[test]
fn plain_formats_quantize_and_dequantize() {
    let mut rng = SmallRng::seed_from_u64(case_seed(4, 0));
    let (d, bs, n) = (100usize, 3usize, 8usize);
    let rows: Vec<f32> = (0..n * d)
        .map(|i| match i % 11 {
            0 => -0.0,
            1 => 1.0 + 2f32.powi(-8),
            _ => (normal(&mut rng) * 3.0) as f32,
        })
        .collect();
    let (src, _) = Src::F32.encode(&rows);
    for (format, size) in [
        (MLART_KV_FORMAT_F32, 4usize),
        (MLART_KV_FORMAT_BF16, 2),
        (MLART_KV_FORMAT_F16, 2),
    ] {
        // Room for 3 blocks (9 tokens); token 8's slot keeps its garbage.
        let mut cache = vec![GARBAGE; n.div_ceil(bs) * bs * d * size];
        quantize(format, d, bs, n, MLART_DTYPE_F32, &src, &mut cache);
        for (i, &x) in rows.iter().enumerate() {
            let got = &cache[i * size..(i + 1) * size];
            let want: Vec<u8> = match format {
                MLART_KV_FORMAT_F32 => x.to_le_bytes().to_vec(),
                MLART_KV_FORMAT_BF16 => bf16_bits(x).to_le_bytes().to_vec(),
                _ => half::f16::from_f32(x).to_bits().to_le_bytes().to_vec(),
            };
            assert_eq!(got, &want[..], "format {format}, element {i} = {x}");
        }
        assert!(cache[n * d * size..].iter().all(|&b| b == GARBAGE));
        let mut back = vec![0u8; n * d * 4];
        dequantize(format, d, bs, n, &cache, MLART_DTYPE_F32, &mut back);
        for (i, &x) in rows.iter().enumerate() {
            let y = f32::from_le_bytes(back[4 * i..4 * i + 4].try_into().unwrap());
            let want = match format {
                MLART_KV_FORMAT_F32 => x,
                MLART_KV_FORMAT_BF16 => bf16_round(x),
                _ => half::f16::from_f32(x).to_f32(),
            };
            assert_eq!(y.to_bits(), want.to_bits(), "format {format}, element {i}");
        }
    }
}

/// Zero tokens is a no-op that reads no pointer.
#[test]
fn zero_tokens() {
    for fp8 in [Fp8::V32, Fp8::Model1] {
        expect_ok(
            "quantize 0 tokens",
            mlart_kv_quantize(
                fp8.format(),
                fp8.d_qk() as i32,
                64,
                0,
                MLART_DTYPE_F32,
                std::ptr::null(),
                std::ptr::null_mut(),
            ),
        );
        expect_ok(
            "dequantize 0 tokens",
            mlart_kv_dequantize(
                fp8.format(),
                fp8.d_qk() as i32,
                64,
                0,
                std::ptr::null(),
                MLART_DTYPE_BF16,
                std::ptr::null_mut(),
            ),
        );
    }
}

#[test]
fn quantize_and_dequantize_errors() {
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    let null = MLART_STATUS_NULL_POINTER;
    let uns = MLART_STATUS_UNSUPPORTED;
    let fp8 = Fp8::V32;
    let (d, bs, n) = (576usize, 2usize, 3usize);
    let src: Vec<u8> = (0..n * d)
        .flat_map(|i| ((i % 13) as f32 - 6.0).to_le_bytes())
        .collect();
    let cache_len = 2 * fp8.block_bytes(bs);
    // One buffer holding src then the cache, for overlap tests.
    let mut both = src.clone();
    both.resize(src.len() + cache_len, GARBAGE);

    type Q = (
        &'static str,
        mlart_kv_format,
        i32,
        i32,
        i32,
        mlart_dtype,
        mlart_status,
        &'static [&'static str],
    );
    let cases: [Q; 11] = [
        (
            "V32 d_qk 512",
            MLART_KV_FORMAT_FP8_V32,
            512,
            2,
            3,
            MLART_DTYPE_F32,
            inv,
            &["d_qk = 512"],
        ),
        (
            "MODEL1 d_qk 576",
            MLART_KV_FORMAT_FP8_MODEL1,
            576,
            2,
            3,
            MLART_DTYPE_F32,
            inv,
            &["d_qk = 576"],
        ),
        (
            "format 7",
            7,
            576,
            2,
            3,
            MLART_DTYPE_F32,
            inv,
            &["format = 7"],
        ),
        (
            "block_size 0",
            MLART_KV_FORMAT_FP8_V32,
            576,
            0,
            3,
            MLART_DTYPE_F32,
            inv,
            &["block_size = 0"],
        ),
        (
            "n_tokens -1",
            MLART_KV_FORMAT_FP8_V32,
            576,
            2,
            -1,
            MLART_DTYPE_F32,
            inv,
            &["n_tokens = -1"],
        ),
        (
            "n_tokens MIN",
            MLART_KV_FORMAT_FP8_V32,
            576,
            2,
            i32::MIN,
            MLART_DTYPE_F32,
            inv,
            &["n_tokens = -2147483648"],
        ),
        (
            "dtype 9",
            MLART_KV_FORMAT_FP8_V32,
            576,
            2,
            3,
            9,
            inv,
            &["= 9"],
        ),
        (
            "dtype FP8",
            MLART_KV_FORMAT_FP8_V32,
            576,
            2,
            3,
            MLART_DTYPE_FP8_E4M3,
            uns,
            &["FP8_E4M3"],
        ),
        (
            "d_qk 0",
            MLART_KV_FORMAT_BF16,
            0,
            2,
            3,
            MLART_DTYPE_F32,
            inv,
            &["d_qk = 0"],
        ),
        (
            "d_qk 2000",
            MLART_KV_FORMAT_BF16,
            2000,
            2,
            3,
            MLART_DTYPE_F32,
            inv,
            &["d_qk = 2000"],
        ),
        (
            "MODEL1 block_size -5",
            MLART_KV_FORMAT_FP8_MODEL1,
            512,
            -5,
            3,
            MLART_DTYPE_F32,
            inv,
            &["block_size = -5"],
        ),
    ];
    for (what, format, dq, b, nt, dtype, status, needles) in cases {
        let mut dst = vec![GARBAGE; cache_len];
        expect_error(
            &format!("quantize with {what}"),
            mlart_kv_quantize(
                format,
                dq,
                b,
                nt,
                dtype,
                src.as_ptr().cast(),
                dst.as_mut_ptr().cast(),
            ),
            status,
            needles,
        );
        assert!(
            dst.iter().all(|&x| x == GARBAGE),
            "quantize with {what}: dst written"
        );
        let cache = vec![0u8; cache_len];
        let mut out = vec![GARBAGE; n * d * 4];
        let msg = expect_error(
            &format!("dequantize with {what}"),
            mlart_kv_dequantize(
                format,
                dq,
                b,
                nt,
                cache.as_ptr().cast(),
                dtype,
                out.as_mut_ptr().cast(),
            ),
            status,
            needles,
        );
        if dtype != MLART_DTYPE_F32 {
            assert!(msg.contains("dst_dtype"), "{msg}");
        }
        assert!(
            out.iter().all(|&x| x == GARBAGE),
            "dequantize with {what}: dst written"
        );
    }
    // Names of the dtype arguments.
    let mut dst = vec![GARBAGE; cache_len];
    expect_error(
        "quantize src_dtype 9",
        mlart_kv_quantize(
            MLART_KV_FORMAT_FP8_V32,
            576,
            2,
            3,
            9,
            src.as_ptr().cast(),
            dst.as_mut_ptr().cast(),
        ),
        inv,
        &["src_dtype = 9"],
    );
    // NULL pointers.
    expect_error(
        "quantize src NULL",
        mlart_kv_quantize(
            MLART_KV_FORMAT_FP8_V32,
            576,
            2,
            3,
            MLART_DTYPE_F32,
            std::ptr::null(),
            dst.as_mut_ptr().cast(),
        ),
        null,
        &["src is NULL"],
    );
    expect_error(
        "quantize dst NULL",
        mlart_kv_quantize(
            MLART_KV_FORMAT_FP8_V32,
            576,
            2,
            3,
            MLART_DTYPE_F32,
            src.as_ptr().cast(),
            std::ptr::null_mut(),
        ),
        null,
        &["dst is NULL"],
    );
    let mut out = vec![GARBAGE; n * d * 4];
    expect_error(
        "dequantize src NULL",
        mlart_kv_dequantize(
            MLART_KV_FORMAT_FP8_V32,
            576,
            2,
            3,
            std::ptr::null(),
            MLART_DTYPE_F32,
            out.as_mut_ptr().cast(),
        ),
        null,
        &["src is NULL"],
    );
    expect_error(
        "dequantize dst NULL",
        mlart_kv_dequantize(
            MLART_KV_FORMAT_FP8_V32,
            576,
            2,
            3,
            dst.as_ptr().cast(),
            MLART_DTYPE_F32,
            std::ptr::null_mut(),
        ),
        null,
        &["dst is NULL"],
    );
    assert!(dst.iter().all(|&x| x == GARBAGE) && out.iter().all(|&x| x == GARBAGE));
    // Overlap: dst starting inside src (its last byte), and src inside dst.
    let before = both.clone();
    let p = both.as_mut_ptr();
    expect_error(
        "quantize dst overlapping src",
        mlart_kv_quantize(
            MLART_KV_FORMAT_FP8_V32,
            576,
            2,
            3,
            MLART_DTYPE_F32,
            p.cast_const().cast(),
            p.wrapping_add(src.len() - 1).cast(),
        ),
        inv,
        &["dst overlaps src"],
    );
    expect_error(
        "dequantize dst overlapping src",
        mlart_kv_dequantize(
            MLART_KV_FORMAT_FP8_V32,
            576,
            2,
            3,
            p.wrapping_add(src.len()).cast_const().cast(),
            MLART_DTYPE_F32,
            p.wrapping_add(8).cast(),
        ),
        inv,
        &["dst overlaps src"],
    );
    assert!(both == before, "overlap errors wrote something");
    // The same buffers, disjoint, succeed.
    let (s, c) = both.split_at_mut(src.len());
    quantize(MLART_KV_FORMAT_FP8_V32, 576, 2, 3, MLART_DTYPE_F32, s, c);
}

/// A misaligned source is fine: rows are read as little-endian bytes.
#[test]
fn unaligned_rows_are_accepted() {
    let fp8 = Fp8::Model1;
    let d = fp8.d_qk();
    let rows = crafted_rows(fp8, 3, Src::F32, case_seed(5, 0));
    let (bytes, vals) = Src::F32.encode(&rows);
    let mut shifted = vec![0u8; bytes.len() + 3];
    shifted[3..].copy_from_slice(&bytes);
    let before = vec![GARBAGE; 2 * fp8.block_bytes(2) + 1];
    let mut dst = before.clone();
    quantize(
        fp8.format(),
        d,
        2,
        3,
        MLART_DTYPE_F32,
        &shifted[3..],
        &mut dst[1..],
    );
    let want = expected_cache(fp8, 2, &vals, &before[1..]);
    assert_bytes_eq(fp8, 2, &dst[1..], &want, "unaligned");
    let mut out = vec![0u8; 3 * d * 4 + 1];
    dequantize(
        fp8.format(),
        d,
        2,
        3,
        &dst[1..],
        MLART_DTYPE_F32,
        &mut out[1..],
    );
    assert_eq!(
        &out[1..],
        &Src::F32.encode(&dequantize_f32(fp8, 2, 3, &dst[1..])).0[..]
    );
}
