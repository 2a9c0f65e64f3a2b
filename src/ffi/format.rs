//! Per-format helpers: sizes, and quantize/dequantize between plain rows and
//! cache blocks, so a host can prepare or inspect caches itself.

use super::decode::positive;
use super::error::mlart_error;
use super::panic::ffi_result;
use super::types::{mlart_dtype, mlart_kv_format};
use super::{check_disjoint, non_negative, slice, slice_mut, Region};
use crate::error::{checked_size, Error, Result};
use crate::format::{load_slice, store_slice, Dtype, KvFormat, KvLayout};
use std::ffi::c_void;

/// Writes a size to a caller's out-pointer.
fn emit(out: *mut usize, value: usize) -> Result<()> {
    if out.is_null() {
        return Err(Error::null("out"));
    }
    // SAFETY: non-NULL and writable (caller contract).
    unsafe { out.write(value) };
    Ok(())
}

fn layout(format: mlart_kv_format, d_qk: i32, block_size: i32) -> Result<KvLayout> {
    let format = KvFormat::from_raw("format", format)?;
    let d = positive("d_qk", d_qk)?;
    if d > crate::decode::desc::MAX_HEAD_DIM {
        return Err(Error::invalid(format!(
            "d_qk = {d_qk} exceeds the supported maximum 1024"
        )));
    }
    KvLayout::new(format, d, positive("block_size", block_size)?, "format")
}

/// Bytes one token occupies in `format` with rows of `d_qk` (FP8_V32: 656,
/// FP8_MODEL1: 584, plain: d_qk x element size), written to `*out`.
#[no_mangle]
pub extern "C" fn mlart_kv_row_bytes(
    format: mlart_kv_format,
    d_qk: i32,
    out: *mut usize,
) -> *mut mlart_error {
    ffi_result("mlart_kv_row_bytes", || {
        emit(out, layout(format, d_qk, 1)?.row_bytes)
    })
}

/// Bytes of one cache block of `block_size` tokens (padding included; the
/// stride between blocks), written to `*out`.
#[no_mangle]
pub extern "C" fn mlart_kv_block_bytes(
    format: mlart_kv_format,
    d_qk: i32,
    block_size: i32,
    out: *mut usize,
) -> *mut mlart_error {
    ffi_result("mlart_kv_block_bytes", || {
        emit(out, layout(format, d_qk, block_size)?.block_bytes)
    })
}

/// The validated arguments shared by quantize and dequantize.
struct Conversion {
    layout: KvLayout,
    tokens: usize,
    dtype: Dtype,
    blocks: usize,
}

/// Validates a conversion; `None` when there is nothing to convert.
fn conversion(
    format: mlart_kv_format,
    d_qk: i32,
    block_size: i32,
    n_tokens: i32,
    dtype: mlart_dtype,
    dtype_arg: &str,
) -> Result<Option<Conversion>> {
    let layout = layout(format, d_qk, block_size)?;
    let tokens = non_negative("n_tokens", n_tokens as i64)?;
    let dtype = Dtype::from_raw(dtype_arg, dtype)?.check_activation(dtype_arg)?;
    Ok((tokens > 0).then(|| Conversion {
        layout,
        tokens,
        dtype,
        blocks: tokens.div_ceil(layout.block_size),
    }))
}

/// Borrows `src` and `dst` after checking that they do not overlap.
///
/// # Safety
/// `src` must hold `src_len` readable bytes and `dst` `dst_len` writable ones.
unsafe fn src_dst<'a>(
    src: *const c_void,
    src_len: usize,
    dst: *mut c_void,
    dst_len: usize,
) -> Result<(&'a [u8], &'a mut [u8])> {
    // SAFETY: caller contract.
    let src = unsafe { slice(src as *const u8, src_len, "src") }?;
    let out = Region {
        name: "dst",
        start: dst as usize,
        len: dst_len,
    };
    check_disjoint(&out, &[Region::of("src", src)])?;
    // SAFETY: caller contract; disjoint from src (checked above).
    let dst = unsafe { slice_mut(dst as *mut u8, dst_len, "dst") }?;
    Ok((src, dst))
}

/// Writes `n_tokens` rows `src [n_tokens, d_qk]` of `src_dtype` (F32, BF16,
/// F16) into `dst`, which holds `ceil(n_tokens / block_size)` blocks of
/// `format`: token t goes to block t / block_size, slot t % block_size. FP8
/// formats are quantized exactly as FlashMLA does (per-tile power-of-two
/// scales, e4m3 round-to-nearest-even, saturating); MODEL1 block padding is
/// zeroed. Slots past `n_tokens` in the last block are left as they were.
#[no_mangle]
pub extern "C" fn mlart_kv_quantize(
    format: mlart_kv_format,
    d_qk: i32,
    block_size: i32,
    n_tokens: i32,
    src_dtype: mlart_dtype,
    src: *const c_void,
    dst: *mut c_void,
) -> *mut mlart_error {
    ffi_result("mlart_kv_quantize", || {
        let Some(c) = conversion(format, d_qk, block_size, n_tokens, src_dtype, "src_dtype")?
        else {
            return Ok(());
        };
        let (l, d) = (&c.layout, c.layout.d_qk);
        let row_in = d * c.dtype.size();
        let src_len = checked_size("src", &[c.tokens, row_in])?;
        // SAFETY: src holds n_tokens rows, dst `blocks` blocks (caller contract).
        let (src, dst) = unsafe { src_dst(src, src_len, dst, l.cache_bytes(c.blocks)?) }?;
        let mut row = [0f32; crate::decode::desc::MAX_HEAD_DIM];
        for t in 0..c.tokens {
            load_slice(c.dtype, &src[t * row_in..(t + 1) * row_in], &mut row[..d]);
            l.store_row(dst, t / l.block_size, t % l.block_size, &row[..d]);
        }
        l.clear_padding(dst, c.blocks);
        Ok(())
    })
}

/// The inverse of `mlart_kv_quantize`: reads `n_tokens` tokens from the
/// `ceil(n_tokens / block_size)` blocks of `src` and writes them as rows
/// `dst [n_tokens, d_qk]` of `dst_dtype` (F32 is exact for every format).
#[no_mangle]
pub extern "C" fn mlart_kv_dequantize(
    format: mlart_kv_format,
    d_qk: i32,
    block_size: i32,
    n_tokens: i32,
    src: *const c_void,
    dst_dtype: mlart_dtype,
    dst: *mut c_void,
) -> *mut mlart_error {
    ffi_result("mlart_kv_dequantize", || {
        let Some(c) = conversion(format, d_qk, block_size, n_tokens, dst_dtype, "dst_dtype")?
        else {
            return Ok(());
        };
        let (l, d) = (&c.layout, c.layout.d_qk);
        let row_out = d * c.dtype.size();
        let dst_len = checked_size("dst", &[c.tokens, row_out])?;
        // SAFETY: src holds `blocks` blocks, dst n_tokens rows (caller contract).
        let (src, dst) = unsafe { src_dst(src, l.cache_bytes(c.blocks)?, dst, dst_len) }?;
        let mut row = [0f32; crate::decode::desc::MAX_HEAD_DIM];
        for t in 0..c.tokens {
            l.load_row(src, t / l.block_size, t % l.block_size, &mut row[..d]);
            store_slice(c.dtype, &row[..d], &mut dst[t * row_out..(t + 1) * row_out]);
        }
        Ok(())
    })
}
