//! The `extern "C"` boundary: handles, argument structs, errors, panics.
//!
//! Conventions (see README "API conventions"): every fallible function
//! returns `mlart_error*` (NULL on success); out-params are written only on
//! success; argument structs start with `struct_size` and have an `_init`
//! function; `_free(NULL)` is a no-op; no panic crosses the boundary.

#![allow(non_camel_case_types)]
// The C docs write array shapes as `[batch, h_q]`, which rustdoc would
// read as links; they are copied into the header verbatim, so they stay.
#![allow(rustdoc::broken_intra_doc_links)]
// The exports are C entry points: their safety contract (valid handles,
// buffers of the documented sizes) is stated in the header, and every
// pointer is checked for NULL and alignment before use. Marking them
// `unsafe fn` would change nothing for C callers.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod decode;
pub mod device;
pub mod engine;
pub mod error;
pub mod format;
pub mod model;
pub mod panic;
pub mod pool;
pub mod types;

use crate::error::{checked_size, Error, Result};
use std::ffi::c_char;

/// Reads an argument struct whose first field is `uint32_t struct_size`,
/// at its current layout only.
///
/// # Safety
/// A non-NULL `p` must point to readable memory of `struct_size` bytes.
pub(crate) unsafe fn read_struct<T: Copy>(p: *const T, name: &str, init: &str) -> Result<T> {
    // SAFETY: forwarded caller contract.
    unsafe { read_struct_versions(p, name, init, &[], None) }
}

/// [`read_struct_versions`] whose defaults are what the struct's `_init`
/// function (`init`, named `init_name` in errors) writes: the fields an
/// older layout lacks keep them.
///
/// # Safety
/// As [`read_struct_versions`]; `init` writes every field of a `T` (each
/// `mlart_*_init` does).
pub(crate) unsafe fn read_versioned<T: Copy>(
    p: *const T,
    name: &str,
    init_name: &str,
    init: extern "C" fn(*mut T),
    older: &[usize],
) -> Result<T> {
    let mut defaults = std::mem::MaybeUninit::<T>::uninit();
    init(defaults.as_mut_ptr());
    // SAFETY: `init` initialized every field (caller contract); the rest
    // is forwarded.
    unsafe { read_struct_versions(p, name, init_name, older, Some(defaults.assume_init())) }
}

/// Reads an argument struct that has grown since it was first published.
///
/// Fields are only ever appended, so a binary built against an older
/// header passes a shorter struct: `struct_size` is one of `older` (the
/// `sizeof` of each earlier layout, which is the offset of the first field
/// added after it). Its bytes are read over `defaults` (the `_init`
/// values), so the newer fields keep their defaults. A size that is
/// neither current nor listed, or larger (a newer header), is an error.
///
/// # Safety
/// A non-NULL `p` must point to readable memory of `struct_size` bytes;
/// `T` must be a `repr(C)` struct whose every byte pattern of the first
/// `older` bytes that a C caller can write is a valid prefix (plain
/// integers, floats, pointers, C `bool` written as 0/1).
pub(crate) unsafe fn read_struct_versions<T: Copy>(
    p: *const T,
    name: &str,
    init: &str,
    older: &[usize],
    defaults: Option<T>,
) -> Result<T> {
    if p.is_null() {
        return Err(Error::null(name));
    }
    // SAFETY: p is non-NULL and, per the caller contract, starts with a u32.
    let size = unsafe { (p as *const u32).read_unaligned() } as usize;
    let want = std::mem::size_of::<T>();
    if size == want {
        // SAFETY: struct_size says the caller's struct has exactly our layout.
        return Ok(unsafe { p.read_unaligned() });
    }
    match defaults {
        Some(mut value) if older.contains(&size) && size < want => {
            // SAFETY: the caller's struct has `size` readable bytes, a
            // prefix of our layout (older layouts are prefixes); `value`
            // is a T, at least `want > size` bytes, and does not overlap
            // the caller's memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    p as *const u8,
                    &mut value as *mut T as *mut u8,
                    size,
                );
            }
            Ok(value)
        }
        _ => {
            let mut accepted: Vec<String> = older.iter().map(|s| s.to_string()).collect();
            accepted.push(want.to_string());
            Err(Error::invalid(format!(
                "{name}->struct_size = {size} but this library expects {}; fill the struct with {init}() first",
                accepted.join(" or ")
            )))
        }
    }
}

/// Writes `value` into a caller's out-struct of `size` bytes (its
/// `struct_size`, accepted by [`read_struct_versions`]): only that prefix,
/// so a binary built against an older header gets its older layout.
///
/// # Safety
/// `p` is non-NULL and points to `size` writable bytes; `size <=
/// size_of::<T>()`.
pub(crate) unsafe fn write_struct_prefix<T: Copy>(p: *mut T, value: &T, size: usize) {
    let size = size.min(std::mem::size_of::<T>());
    // SAFETY: caller contract; `value` is a T, so `size` bytes of it are
    // readable, and it cannot overlap the caller's struct (a local copy).
    unsafe { std::ptr::copy_nonoverlapping(value as *const T as *const u8, p as *mut u8, size) };
}

/// Checks that `p` is non-NULL and aligned for `T`.
pub(crate) fn check_ptr<T>(p: *const T, name: &str) -> Result<()> {
    if p.is_null() {
        return Err(Error::null(name));
    }
    if !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Error::invalid(format!(
            "{name} = {p:?} is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    Ok(())
}

/// Borrows `n` elements at `p` after checking NULL, alignment and size.
///
/// # Safety
/// A non-NULL `p` must point to `n` readable elements that stay valid and
/// unmodified for `'a` (the caller contract of every export).
pub(crate) unsafe fn slice<'a, T>(p: *const T, n: usize, name: &str) -> Result<&'a [T]> {
    check_slice(p, n, name)?;
    // SAFETY: non-NULL, aligned, size fits isize; validity is the caller contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// What [`slice`] and [`slice_mut`] check: NULL, alignment, size.
fn check_slice<T>(p: *const T, n: usize, name: &str) -> Result<()> {
    check_ptr(p, name)?;
    checked_size(name, &[n, std::mem::size_of::<T>()])?;
    Ok(())
}

/// Mutable twin of [`slice`].
///
/// # Safety
/// As [`slice`], and the memory must be writable and not aliased by any
/// other argument (checked with [`check_disjoint`]).
pub(crate) unsafe fn slice_mut<'a, T>(p: *mut T, n: usize, name: &str) -> Result<&'a mut [T]> {
    check_slice(p as *const T, n, name)?;
    // SAFETY: non-NULL, aligned, size fits isize; validity and exclusivity
    // are the caller contract plus check_disjoint. Built from `p` itself:
    // a `&mut` derived from a shared slice of the same memory would be
    // undefined behaviour on its first write (Miri found that here).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// A named byte range, for overlap checks between outputs and inputs.
#[derive(Clone, Copy)]
pub(crate) struct Region<'a> {
    pub name: &'a str,
    pub start: usize,
    pub len: usize,
}

impl<'a> Region<'a> {
    pub fn of<T>(name: &'a str, s: &[T]) -> Self {
        Region {
            name,
            start: s.as_ptr() as usize,
            len: std::mem::size_of_val(s),
        }
    }
}

/// Fails if output `out` overlaps any region in `others`.
pub(crate) fn check_disjoint(out: &Region<'_>, others: &[Region<'_>]) -> Result<()> {
    for o in others {
        let (a0, a1) = (out.start, out.start + out.len);
        let (b0, b1) = (o.start, o.start + o.len);
        if out.len > 0 && o.len > 0 && a0 < b1 && b0 < a1 {
            return Err(Error::invalid(format!(
                "{} overlaps {}: outputs must not alias inputs",
                out.name, o.name
            )));
        }
    }
    Ok(())
}

/// Converts a non-negative C size, naming it otherwise.
pub(crate) fn non_negative(name: &str, v: i64) -> Result<usize> {
    if v < 0 {
        return Err(Error::invalid(format!("{name} = {v} must be >= 0")));
    }
    usize::try_from(v).map_err(|_| Error::invalid(format!("{name} = {v} is too large")))
}

/// Copies `s` into a fixed C char array, truncating at a UTF-8 boundary.
pub(crate) fn write_c_str(dst: &mut [c_char], s: &str) {
    let mut n = s.len().min(dst.len().saturating_sub(1));
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    for (d, &b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = b as c_char;
    }
    if let Some(last) = dst.get_mut(n) {
        *last = 0;
    }
}

/// The library version as "MAJOR.MINOR.PATCH" (static storage).
#[no_mangle]
pub extern "C" fn mlart_version() -> *const c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr() as *const c_char
}

/// The ABI version of the loaded library; compare with `MLART_ABI_VERSION`
/// to detect a header/library mismatch.
#[no_mangle]
pub extern "C" fn mlart_abi_version() -> u32 {
    types::MLART_ABI_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_str_truncates_on_char_boundary() {
        let mut buf = [1 as c_char; 4];
        write_c_str(&mut buf, "aé€");
        // "a" (1) + "é" (2) fit in 3 bytes + NUL.
        assert_eq!(buf.map(|c| c as u8), [b'a', 0xc3, 0xa9, 0]);
        let mut buf = [1 as c_char; 3];
        write_c_str(&mut buf, "a€");
        assert_eq!(buf.map(|c| c as u8)[..2], [b'a', 0]);
    }

    #[test]
    fn overlap_is_detected() {
        let v = [0u8; 16];
        let a = Region {
            name: "out",
            start: v.as_ptr() as usize,
            len: 8,
        };
        let b = Region {
            name: "q",
            start: v.as_ptr() as usize + 4,
            len: 8,
        };
        let c = Region {
            name: "kv",
            start: v.as_ptr() as usize + 8,
            len: 8,
        };
        assert!(check_disjoint(&a, &[c]).is_ok());
        let b2 = Region { name: "q", ..b };
        assert_eq!(
            check_disjoint(&a, &[b2]).unwrap_err().message,
            "out overlaps q: outputs must not alias inputs"
        );
    }
}
