//! AMX tiles (`tdpbf16ps`), through `asm!` since the intrinsics are not
//! stable, and a software model of them ([`Emu`]) that runs the same code
//! on CPUs without AMX (tests, and `MLART_AMX_EMULATE=1`).
//!
//! All eight tiles are configured as 16 rows x 64 bytes: a C tile holds
//! 16 x 16 f32, an A tile 16 rows x 32 bf16, a B tile 16 bf16 pairs x 16
//! columns (the VNNI layout). [`mac`] runs the 2 x 2 block of C tiles that
//! both the attention and the model's prefill GEMM are built from.

use std::arch::asm;

/// Tiles configured by [`configure`] (all of them).
pub const TILES: usize = 8;

/// Loads the tile configuration on this thread (palette 1, eight
/// 16 x 64-byte tiles).
///
/// # Safety
/// The CPU must support AMX and the process must hold AMX permission.
pub unsafe fn configure() {
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    for t in 0..TILES {
        cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
        cfg[48 + t] = 16;
    }
    // SAFETY: cfg is a valid 64-byte palette-1 configuration (caller: AMX present).
    unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack, readonly)) };
}

/// Releases the tile state of this thread.
///
/// # Safety
/// As [`configure`].
pub unsafe fn release() {
    // SAFETY: caller contract.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// Operations on the configured 16-row x 64-byte tiles: the hardware's, or
/// a software model of them. Tile numbers are constants, as the
/// instructions need them.
pub trait Tiles {
    /// `tileloadd tmm{T}, [p + stride]`.
    ///
    /// # Safety
    /// `p + r * stride .. + 64` readable for r in 0..16; tiles configured.
    unsafe fn load<const T: usize>(&mut self, p: *const u8, stride: usize);
    /// `tilestored [p + stride], tmm{T}`.
    ///
    /// # Safety
    /// `p + r * stride .. + 64` writable for r in 0..16; tiles configured.
    unsafe fn store<const T: usize>(&mut self, p: *mut u8, stride: usize);
    /// `tilezero tmm{T}`.
    ///
    /// # Safety
    /// Tiles configured.
    unsafe fn zero<const T: usize>(&mut self);
    /// `tdpbf16ps tmm{C}, tmm{A}, tmm{B}`: C[m][n] += Σ_k A[m][k]·B[k/2][n][k%2].
    ///
    /// # Safety
    /// Tiles configured.
    unsafe fn dp<const C: usize, const A: usize, const B: usize>(&mut self);
}

/// The CPU's tiles (`asm!`).
pub struct Hw;

impl Tiles for Hw {
    #[inline(always)]
    unsafe fn load<const T: usize>(&mut self, p: *const u8, stride: usize) {
        // SAFETY: caller contract.
        unsafe {
            asm!("tileloadd tmm{t}, [{p} + {s}]", t = const T, p = in(reg) p,
                 s = in(reg) stride, options(nostack, readonly))
        }
    }

    #[inline(always)]
    unsafe fn store<const T: usize>(&mut self, p: *mut u8, stride: usize) {
        // SAFETY: caller contract.
        unsafe {
            asm!("tilestored [{p} + {s}], tmm{t}", t = const T, p = in(reg) p,
                 s = in(reg) stride, options(nostack))
        }
    }

    #[inline(always)]
    unsafe fn zero<const T: usize>(&mut self) {
        // SAFETY: caller contract.
        unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, nomem)) }
    }

    #[inline(always)]
    unsafe fn dp<const C: usize, const A: usize, const B: usize>(&mut self) {
        // SAFETY: caller contract.
        unsafe {
            asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A,
                 b = const B, options(nostack, nomem))
        }
    }
}

/// The CPU's tiles, configured on this thread while the value lives
/// (released on drop).
pub struct Session(Hw);

impl Session {
    /// # Safety
    /// The CPU must support AMX and the process must hold AMX permission.
    pub unsafe fn start() -> Self {
        // SAFETY: caller contract.
        unsafe { configure() };
        Session(Hw)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: start() configured the tiles on this thread.
        unsafe { release() };
    }
}

impl Tiles for Session {
    #[inline(always)]
    unsafe fn load<const T: usize>(&mut self, p: *const u8, stride: usize) {
        // SAFETY: caller contract; tiles configured by start().
        unsafe { self.0.load::<T>(p, stride) }
    }
    #[inline(always)]
    unsafe fn store<const T: usize>(&mut self, p: *mut u8, stride: usize) {
        // SAFETY: as above.
        unsafe { self.0.store::<T>(p, stride) }
    }
    #[inline(always)]
    unsafe fn zero<const T: usize>(&mut self) {
        // SAFETY: as above.
        unsafe { self.0.zero::<T>() }
    }
    #[inline(always)]
    unsafe fn dp<const C: usize, const A: usize, const B: usize>(&mut self) {
        // SAFETY: as above.
        unsafe { self.0.dp::<C, A, B>() }
    }
}

/// A software model of the eight tiles (row r of tile t at `0[t][64 r..]`).
/// Products are exact in f32 (bf16 x bf16) and summed in f32, pair by pair.
pub struct Emu(Box<[[u8; 1024]; TILES]>);

impl Default for Emu {
    fn default() -> Self {
        Emu(Box::new([[0u8; 1024]; TILES]))
    }
}

impl Tiles for Emu {
    unsafe fn load<const T: usize>(&mut self, p: *const u8, stride: usize) {
        for r in 0..16 {
            // SAFETY: caller contract.
            let row = unsafe { std::slice::from_raw_parts(p.add(r * stride), 64) };
            self.0[T][64 * r..64 * r + 64].copy_from_slice(row);
        }
    }

    unsafe fn store<const T: usize>(&mut self, p: *mut u8, stride: usize) {
        for r in 0..16 {
            // SAFETY: caller contract.
            let row = unsafe { std::slice::from_raw_parts_mut(p.add(r * stride), 64) };
            row.copy_from_slice(&self.0[T][64 * r..64 * r + 64]);
        }
    }

    unsafe fn zero<const T: usize>(&mut self) {
        self.0[T].fill(0);
    }

    unsafe fn dp<const C: usize, const A: usize, const B: usize>(&mut self) {
        let bf16s = |t: &[u8; 1024]| -> Vec<f32> {
            t.chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect()
        };
        // a[m][k] at 32 m + k; b[k/2][n][k%2] at 32 (k/2) + 2 n + k%2.
        let (a, b) = (bf16s(&self.0[A]), bf16s(&self.0[B]));
        let c = &mut self.0[C];
        for m in 0..16 {
            for n in 0..16 {
                let at = 64 * m + 4 * n;
                let mut acc = f32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
                for k in 0..16 {
                    acc += a[32 * m + 2 * k] * b[32 * k + 2 * n]
                        + a[32 * m + 2 * k + 1] * b[32 * k + 2 * n + 1];
                }
                c[at..at + 4].copy_from_slice(&acc.to_le_bytes());
            }
        }
    }
}

/// Where the tiles of one [`mac`] operand lie: tile `i` (0 or 1) of K
/// chunk `k` starts at `at(i, k)`, its 16 rows `stride()` bytes apart.
pub trait Place: Copy {
    fn at(&self, i: usize, k: usize) -> *const u8;
    fn stride(&self) -> usize;
}

/// Tiles at a fixed step: tile `i` of K chunk `k` at `base[i] + k * step`
/// bytes, its 16 rows `stride` bytes apart.
#[derive(Clone, Copy)]
pub struct Operand {
    pub base: [*const u8; 2],
    pub stride: usize,
    pub step: usize,
}

impl Place for Operand {
    #[inline(always)]
    fn at(&self, i: usize, k: usize) -> *const u8 {
        self.base[i].wrapping_add(k * self.step)
    }
    #[inline(always)]
    fn stride(&self) -> usize {
        self.stride
    }
}

/// Tiles whose K chunks lie anywhere (key tiles of a paged cache): tile
/// `i` of K chunk `k` at `chunks[k] + offset[i]` bytes, its 16 rows
/// `stride` bytes apart.
#[derive(Clone, Copy)]
pub struct Scattered<'c> {
    pub chunks: &'c [*const u8],
    pub offset: [usize; 2],
    pub stride: usize,
}

impl Place for Scattered<'_> {
    #[inline(always)]
    fn at(&self, i: usize, k: usize) -> *const u8 {
        self.chunks[k].wrapping_add(self.offset[i])
    }
    #[inline(always)]
    fn stride(&self) -> usize {
        self.stride
    }
}

/// Where the C tiles of one [`mac`] lie: C(i, j) at `base[i][j]`, rows
/// `stride` bytes apart.
#[derive(Clone, Copy)]
pub struct Acc {
    pub base: [[*mut u8; 2]; 2],
    pub stride: usize,
}

/// `C(i, j) (+)= Σ_k A(i, k) · B(j, k)` for `i < NM`, `j < NN` (each 1 or
/// 2) over `chunks` K chunks of 32 bf16. C starts from memory (`load_c`)
/// or zero and is stored back. C(i, j) lives in tmm(2i + j), A(i) in
/// tmm(4 + i), B(j) in tmm(6 + j): a 2 x 2 block loads 4 tiles per 4
/// `tdpbf16ps`. `tick` runs once per K chunk, after its first product:
/// a caller's small vector or prefetch work then overlaps the tiles.
///
/// # Safety
/// Tiles configured; every tile named by `a`, `b` (chunks `0..chunks`)
/// and `c` lies in readable (C: writable) memory, 16 rows x 64 bytes.
#[inline(always)]
pub unsafe fn mac<T: Tiles, const NM: usize, const NN: usize>(
    t: &mut T,
    a: impl Place,
    b: impl Place,
    chunks: usize,
    c: Acc,
    load_c: bool,
    tick: &mut impl FnMut(),
) {
    let cs = c.stride;
    // SAFETY: caller contract.
    unsafe {
        if load_c {
            t.load::<0>(c.base[0][0], cs);
            if NN > 1 {
                t.load::<1>(c.base[0][1], cs);
            }
            if NM > 1 {
                t.load::<2>(c.base[1][0], cs);
                if NN > 1 {
                    t.load::<3>(c.base[1][1], cs);
                }
            }
        } else {
            t.zero::<0>();
            t.zero::<1>();
            t.zero::<2>();
            t.zero::<3>();
        }
        let (sa, sb) = (a.stride(), b.stride());
        for k in 0..chunks {
            t.load::<4>(a.at(0, k), sa);
            t.load::<6>(b.at(0, k), sb);
            t.dp::<0, 4, 6>();
            tick();
            if NN > 1 {
                t.load::<7>(b.at(1, k), sb);
                t.dp::<1, 4, 7>();
            }
            if NM > 1 {
                t.load::<5>(a.at(1, k), sa);
                t.dp::<2, 5, 6>();
                if NN > 1 {
                    t.dp::<3, 5, 7>();
                }
            }
        }
        t.store::<0>(c.base[0][0], cs);
        if NN > 1 {
            t.store::<1>(c.base[0][1], cs);
        }
        if NM > 1 {
            t.store::<2>(c.base[1][0], cs);
            if NN > 1 {
                t.store::<3>(c.base[1][1], cs);
            }
        }
    }
}

/// [`mac`] with the block shape `(nm, nn)` (1 or 2 each) chosen at run time.
///
/// # Safety
/// As [`mac`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn mac_dyn<T: Tiles>(
    t: &mut T,
    shape: (usize, usize),
    a: impl Place,
    b: impl Place,
    chunks: usize,
    c: Acc,
    load_c: bool,
    tick: &mut impl FnMut(),
) {
    // SAFETY: forwarded contract.
    unsafe {
        match shape {
            (1, 1) => mac::<T, 1, 1>(t, a, b, chunks, c, load_c, tick),
            (1, _) => mac::<T, 1, 2>(t, a, b, chunks, c, load_c, tick),
            (_, 1) => mac::<T, 2, 1>(t, a, b, chunks, c, load_c, tick),
            _ => mac::<T, 2, 2>(t, a, b, chunks, c, load_c, tick),
        }
    }
}

/// One operand of [`grid`]: tile `i` of K chunk 0 starts at `at(i)`, its
/// rows `stride` bytes apart, chunk `k` `k * step` bytes further on.
pub struct Tiled<F> {
    pub at: F,
    pub stride: usize,
    pub step: usize,
}

/// `C(i, j) (+)= Σ_k A(i, k) · B(j, k)` for a grid of `m x n` C tiles (C
/// tile `(i, j)` at `c(i, j)`, rows `c_stride` bytes apart), in 2 x 2
/// blocks of [`mac`] (row pair by row pair of A), `tick` once per K chunk
/// of every block.
///
/// # Safety
/// As [`mac`], for every tile the grid names.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn grid<T: Tiles>(
    t: &mut T,
    (m, n): (usize, usize),
    chunks: usize,
    a: Tiled<impl Fn(usize) -> *const u8>,
    b: Tiled<impl Fn(usize) -> *const u8>,
    c: impl Fn(usize, usize) -> *mut u8,
    c_stride: usize,
    load_c: bool,
    mut tick: impl FnMut(),
) {
    for i in (0..m).step_by(2) {
        let (nm, il) = (2.min(m - i), (i + 1).min(m - 1));
        let op_a = Operand {
            base: [(a.at)(i), (a.at)(il)],
            stride: a.stride,
            step: a.step,
        };
        for j in (0..n).step_by(2) {
            let (nn, jl) = (2.min(n - j), (j + 1).min(n - 1));
            let op_b = Operand {
                base: [(b.at)(j), (b.at)(jl)],
                stride: b.stride,
                step: b.step,
            };
            let acc = Acc {
                base: [[c(i, j), c(i, jl)], [c(il, j), c(il, jl)]],
                stride: c_stride,
            };
            // SAFETY: caller contract.
            unsafe { mac_dyn(t, (nm, nn), op_a, op_b, chunks, acc, load_c, &mut tick) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(x: f32) -> u16 {
        half::bf16::from_f32(x).to_bits()
    }

    /// Every block shape of `mac` on the tile model against a plain f64
    /// product: A and B placement (bases, strides, chunk steps), C loaded
    /// or zeroed, and only the named C tiles written.
    #[test]
    fn mac_blocks_match_a_plain_product() {
        check_mac(&mut Emu::default());
    }

    /// The same on the CPU's tiles: the `asm!` forms, the tile
    /// configuration and the model agree. Ignored (not passed) by default;
    /// `scripts/gpu-check.sh` runs it on an AMX host with `--ignored`.
    #[test]
    #[ignore = "needs an AMX CPU: run with --ignored on one"]
    fn hardware_tiles_match_a_plain_product() {
        let f = crate::backend::cpu::isa::CpuFeatures::detect();
        assert!(
            f.amx_bf16 && crate::backend::cpu::isa::amx_permitted(),
            "this CPU has no AMX-BF16 (or the OS refused it)"
        );
        // SAFETY: AMX-BF16 present and permitted (checked above).
        check_mac(&mut unsafe { Session::start() });
    }

    fn check_mac<T: Tiles>(t: &mut T) {
        let vals = crate::model::gen::uniform(4096, 11);
        let mut it = vals.iter().cycle();
        for (nm, nn, chunks, load_c) in [
            (2, 2, 3, true),
            (1, 2, 2, false),
            (2, 1, 1, true),
            (1, 1, 4, false),
        ] {
            let kk = 32 * chunks;
            // A: rows of kk bf16 at a 5-word padded stride; B: VNNI pairs.
            let a_stride = kk + 10;
            let a: Vec<u16> = (0..32 * a_stride)
                .map(|_| bf16(*it.next().unwrap()))
                .collect();
            let b: Vec<u16> = (0..(kk / 2) * 32 * 2)
                .map(|_| bf16(*it.next().unwrap()))
                .collect();
            let c0: Vec<f32> = (0..32 * 40).map(|_| *it.next().unwrap()).collect();
            let op_a = Operand {
                base: [
                    a.as_ptr() as *const u8,
                    a[16 * a_stride..].as_ptr() as *const u8,
                ],
                stride: a_stride * 2,
                step: 64,
            };
            // B rows are K pairs, 32 columns (two tiles) per row.
            let op_b = Operand {
                base: [b.as_ptr() as *const u8, b[32..].as_ptr() as *const u8],
                stride: 32 * 4,
                step: 16 * 32 * 4,
            };
            // The same B with each K chunk in an allocation of its own.
            let apart: Vec<Vec<u16>> = b.chunks_exact(16 * 64).map(|k| k.to_vec()).collect();
            let chunk_at: Vec<*const u8> = apart.iter().map(|k| k.as_ptr() as *const u8).collect();
            let scattered = Scattered {
                chunks: &chunk_at,
                offset: [0, 64],
                stride: 32 * 4,
            };
            for placed in ["at a step", "scattered"] {
                let mut c = c0.clone();
                let cp = c.as_mut_ptr();
                let acc = Acc {
                    base: [
                        [cp as *mut u8, cp.wrapping_add(16) as *mut u8],
                        [
                            cp.wrapping_add(16 * 40) as *mut u8,
                            cp.wrapping_add(16 * 40 + 16) as *mut u8,
                        ],
                    ],
                    stride: 40 * 4,
                };
                let mut ticks = 0;
                let mut tick = || ticks += 1;
                // SAFETY: every tile lies inside a, b (or its chunks) or c
                // (sizes above).
                unsafe {
                    match placed {
                        "scattered" => {
                            mac_dyn(t, (nm, nn), op_a, scattered, chunks, acc, load_c, &mut tick)
                        }
                        _ => mac_dyn(t, (nm, nn), op_a, op_b, chunks, acc, load_c, &mut tick),
                    }
                };
                assert_eq!(ticks, chunks, "one tick per K chunk");
                let bv = |x: u16| f32::from_bits((x as u32) << 16) as f64;
                for m in 0..32 {
                    for n in 0..40 {
                        let (i, j) = (m / 16, n / 16);
                        let got = c[m * 40 + n] as f64;
                        if i >= nm || j >= nn || n >= 32 {
                            assert_eq!(got, c0[m * 40 + n] as f64, "untouched C[{m}][{n}]");
                            continue;
                        }
                        let mut want = if load_c { c0[m * 40 + n] as f64 } else { 0.0 };
                        for k in 0..kk {
                            want += bv(a[m * a_stride + k]) * bv(b[(k / 2) * 64 + 2 * n + k % 2]);
                        }
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{nm}x{nn} B {placed}: C[{m}][{n}] {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
