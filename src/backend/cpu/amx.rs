//! AMX tiles (`tdpbf16ps`), through `asm!` since the intrinsics are not
//! stable, and a software model of them ([`Emu`]) for tests on CPUs
//! without AMX. Three 16-row x 64-byte tiles: tmm0 = C (16 x 16 f32),
//! tmm1 = A (16 rows x 32 bf16), tmm2 = B (16 bf16 pairs x 16 columns, the
//! VNNI layout). Used for the attention's Q·Kᵀ and P·V, and the model's
//! prefill GEMM.

use super::kernel::K_TILE;
use std::arch::asm;

/// Loads the tile configuration on this thread (palette 1, three 16 x 64-byte tiles).
///
/// # Safety
/// The CPU must support AMX and the process must hold AMX permission.
pub unsafe fn configure() {
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    for t in 0..3 {
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

/// Operations on the 16-row x 64-byte tiles 0..2: the hardware's, or
/// (tests on machines without AMX) a software model of them.
pub trait Tiles {
    /// # Safety
    /// `p + r * stride .. + 64` readable for r in 0..16; tiles configured.
    unsafe fn load(&mut self, t: usize, p: *const u8, stride: usize);
    /// # Safety
    /// `p + r * stride .. + 64` writable for r in 0..16; tiles configured.
    unsafe fn store(&mut self, t: usize, p: *mut u8, stride: usize);
    /// `tdpbf16ps tmm0, tmm1, tmm2`.
    ///
    /// # Safety
    /// Tiles configured.
    unsafe fn dpbf16(&mut self);
}

/// The CPU's tiles (`asm!`).
pub struct Hw;

impl Tiles for Hw {
    unsafe fn load(&mut self, t: usize, p: *const u8, stride: usize) {
        // SAFETY: caller contract.
        unsafe {
            match t {
                0 => {
                    asm!("tileloadd tmm0, [{p} + {s}]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly))
                }
                1 => {
                    asm!("tileloadd tmm1, [{p} + {s}]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly))
                }
                _ => {
                    asm!("tileloadd tmm2, [{p} + {s}]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly))
                }
            }
        }
    }

    unsafe fn store(&mut self, t: usize, p: *mut u8, stride: usize) {
        debug_assert_eq!(t, 0);
        // SAFETY: caller contract.
        unsafe {
            asm!("tilestored [{p} + {s}], tmm0", p = in(reg) p, s = in(reg) stride, options(nostack))
        };
    }

    unsafe fn dpbf16(&mut self) {
        // SAFETY: caller contract.
        unsafe { asm!("tdpbf16ps tmm0, tmm1, tmm2", options(nostack, nomem)) };
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
    unsafe fn load(&mut self, t: usize, p: *const u8, stride: usize) {
        // SAFETY: caller contract; tiles configured by start().
        unsafe { self.0.load(t, p, stride) }
    }
    unsafe fn store(&mut self, t: usize, p: *mut u8, stride: usize) {
        // SAFETY: as above.
        unsafe { self.0.store(t, p, stride) }
    }
    unsafe fn dpbf16(&mut self) {
        // SAFETY: as above.
        unsafe { self.0.dpbf16() }
    }
}

/// A software model of tiles 0..2 (row r of tile t at `t[t][64 r..]`).
#[cfg(test)]
pub struct Emu(pub [[u8; 1024]; 3]);

#[cfg(test)]
impl Tiles for Emu {
    unsafe fn load(&mut self, t: usize, p: *const u8, stride: usize) {
        for r in 0..16 {
            // SAFETY: caller contract.
            let row = unsafe { std::slice::from_raw_parts(p.add(r * stride), 64) };
            self.0[t][64 * r..64 * r + 64].copy_from_slice(row);
        }
    }

    unsafe fn store(&mut self, t: usize, p: *mut u8, stride: usize) {
        for r in 0..16 {
            // SAFETY: caller contract.
            let row = unsafe { std::slice::from_raw_parts_mut(p.add(r * stride), 64) };
            row.copy_from_slice(&self.0[t][64 * r..64 * r + 64]);
        }
    }

    unsafe fn dpbf16(&mut self) {
        let bf = |t: &[u8; 1024], r: usize, i: usize| {
            f32::from_bits(
                (u16::from_le_bytes([t[64 * r + 2 * i], t[64 * r + 2 * i + 1]]) as u32) << 16,
            )
        };
        for m in 0..16 {
            for n in 0..16 {
                let at = 64 * m + 4 * n;
                let mut c = f32::from_le_bytes(self.0[0][at..at + 4].try_into().unwrap_or([0; 4]));
                for k in 0..16 {
                    c += bf(&self.0[1], m, 2 * k) * bf(&self.0[2], k, 2 * n)
                        + bf(&self.0[1], m, 2 * k + 1) * bf(&self.0[2], k, 2 * n + 1);
                }
                self.0[0][at..at + 4].copy_from_slice(&c.to_le_bytes());
            }
        }
    }
}

/// P of a tile (`st [n][rp]`) as bf16 pairs along the keys in the A
/// layout: `pa[r][jp]` = (P[2jp][r], P[2jp + 1][r]) rounded to nearest
/// even, zero for pairs past `n` up to `np16`.
pub fn p_pairs_rows(st: &[f32], rp: usize, n: usize, np16: usize, pa: &mut [u32]) {
    let bf = |x: f32| {
        // P is finite and >= 0: round to nearest even by adding.
        let b = x.to_bits();
        (b + 0x7fff + ((b >> 16) & 1)) >> 16
    };
    for r in 0..rp {
        let row = &mut pa[r * np16..(r + 1) * np16];
        for (jp, x) in row.iter_mut().enumerate() {
            let (e, o) = (2 * jp, 2 * jp + 1);
            let lo = if e < n { bf(st[e * rp + r]) } else { 0 };
            let hi = if o < n { bf(st[o * rp + r]) } else { 0 };
            *x = lo | (hi << 16);
        }
    }
}

/// `o[r][..dv] += Σ_jp P·V` on tiles, for the first `rows` of `rp` rows:
/// `pa [rp][np16]` holds P as bf16 pairs along the keys (row-major, the
/// A layout), `vp [np16][dv]` V as bf16 pairs (the VNNI B layout);
/// pairs past the tile's keys are zero. A 16 x 16 block of O stays in
/// tile 0 over all key pairs.
///
/// # Safety
/// Tiles configured (16 rows x 64 bytes); `np16 % 16 == 0`,
/// `rp % 16 == 0`, `dv % 16 == 0`; `pa` holds `rp * np16`, `vp`
/// `np16 * dv`, `o` `rows * dv` with `rows <= rp`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn pv_tiles<T: Tiles>(
    tiles: &mut T,
    pa: &[u32],
    rp: usize,
    np16: usize,
    vp: &[u32],
    dv: usize,
    o: &mut [f32],
    rows: usize,
) {
    debug_assert!(np16.is_multiple_of(16) && rp.is_multiple_of(16) && dv.is_multiple_of(16));
    debug_assert!(
        pa.len() >= rp * np16 && vp.len() >= np16 * dv && o.len() >= rows * dv && rows <= rp
    );
    let mut c = [0f32; 256];
    for rb in (0..rows).step_by(16) {
        let live = 16.min(rows - rb);
        for cb in (0..dv).step_by(16) {
            for r in 0..16 {
                for x in 0..16 {
                    c[r * 16 + x] = if r < live {
                        o[(rb + r) * dv + cb + x]
                    } else {
                        0.0
                    };
                }
            }
            // SAFETY: c is 16 x 64 bytes; the A rows rb..rb+16 of pa and
            // the B rows kc..kc+16 of vp (columns cb..cb+16) are in bounds.
            unsafe {
                tiles.load(0, c.as_ptr() as *const u8, 64);
                for kc in (0..np16).step_by(16) {
                    tiles.load(1, pa.as_ptr().add(rb * np16 + kc) as *const u8, np16 * 4);
                    tiles.load(2, vp.as_ptr().add(kc * dv + cb) as *const u8, dv * 4);
                    tiles.dpbf16();
                }
                tiles.store(0, c.as_mut_ptr() as *mut u8, 64);
            }
            for r in 0..live {
                o[(rb + r) * dv + cb..(rb + r) * dv + cb + 16]
                    .copy_from_slice(&c[r * 16..r * 16 + 16]);
            }
        }
    }
}

/// `st[j*rp + r] = scale * Σ_d qa[r][d] k[j][d]` for all `rp` rows and the
/// first `n` keys (rounded up to 16; keys past `n` are zero in `k2t`).
///
/// # Safety
/// Tiles configured on this thread; `qa` holds `rp` rows of `d` bf16
/// (`d/2` u32), `k2t` holds `d/2` rows of `K_TILE` u32, `d % 32 == 0`,
/// `rp % 16 == 0`, `st` holds `K_TILE * rp`.
pub unsafe fn scores_tile(
    qa: &[u32],
    rp: usize,
    d: usize,
    k2t: &[u32],
    n: usize,
    scale: f32,
    st: &mut [f32],
) {
    debug_assert!(
        d.is_multiple_of(32)
            && rp.is_multiple_of(16)
            && qa.len() >= rp * d / 2
            && k2t.len() >= d / 2 * K_TILE
    );
    debug_assert!(st.len() >= K_TILE * rp && n <= K_TILE);
    let mut c = [0f32; 256];
    let a_stride = d * 2;
    let b_stride = K_TILE * 4;
    for rb in (0..rp).step_by(16) {
        for jb in (0..n.div_ceil(16) * 16).step_by(16) {
            // SAFETY: every tile row read lies inside qa (rows rb..rb+16,
            // bytes kc*2..kc*2+64 of each) or k2t (rows kc/2..kc/2+16,
            // keys jb..jb+16); c holds 16 x 64 bytes.
            unsafe {
                asm!("tilezero tmm0", options(nostack, nomem));
                for kc in (0..d).step_by(32) {
                    let a = (qa.as_ptr() as *const u8).add(rb * a_stride + kc * 2);
                    let b = k2t.as_ptr().add((kc / 2) * K_TILE + jb) as *const u8;
                    asm!(
                        "tileloadd tmm1, [{a} + {sa}]",
                        "tileloadd tmm2, [{b} + {sb}]",
                        "tdpbf16ps tmm0, tmm1, tmm2",
                        a = in(reg) a,
                        sa = in(reg) a_stride,
                        b = in(reg) b,
                        sb = in(reg) b_stride,
                        options(nostack, readonly),
                    );
                }
                asm!(
                    "tilestored [{c} + {sc}], tmm0",
                    c = in(reg) c.as_mut_ptr(),
                    sc = in(reg) 64usize,
                    options(nostack),
                );
            }
            for r in 0..16 {
                for jj in 0..16 {
                    st[(jb + jj) * rp + rb + r] = c[r * 16 + jj] * scale;
                }
            }
        }
    }
}
