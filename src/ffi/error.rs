//! `mlart_error`: the error object every fallible export returns.

use super::panic::ffi_value;
use super::types::mlart_status;
use crate::error::{Error, Status};
use std::ffi::{c_char, CString};

/// An error returned by a failed call. Owned by the caller, who releases it
/// with `mlart_error_free`. Immutable: safe to read from any thread.
pub struct mlart_error {
    status: Status,
    message: CString,
}

impl mlart_error {
    pub(crate) fn into_raw(e: Error) -> *mut mlart_error {
        // Interior NULs cannot be represented in a C string; replace them.
        let text = e.message.replace('\0', "\\0");
        let message = CString::new(text).unwrap_or_default();
        Box::into_raw(Box::new(mlart_error {
            status: e.status,
            message,
        }))
    }
}

/// The error's category. `mlart_error_code(NULL)` is `MLART_STATUS_OK`.
#[no_mangle]
pub extern "C" fn mlart_error_code(error: *const mlart_error) -> mlart_status {
    ffi_value(
        "mlart_error_code",
        super::types::MLART_STATUS_INTERNAL,
        || {
            // SAFETY: a non-NULL error was produced by this library and not yet freed (caller contract).
            unsafe { error.as_ref() }.map_or(super::types::MLART_STATUS_OK, |e| e.status as u32)
        },
    )
}

/// The error's message: UTF-8, NUL-terminated, naming the argument and value
/// at fault. Valid until `mlart_error_free(error)`. For NULL: `"ok"`.
#[no_mangle]
pub extern "C" fn mlart_error_message(error: *const mlart_error) -> *const c_char {
    ffi_value("mlart_error_message", c"internal error".as_ptr(), || {
        // SAFETY: as in mlart_error_code.
        match unsafe { error.as_ref() } {
            Some(e) => e.message.as_ptr(),
            None => c"ok".as_ptr(),
        }
    })
}

/// Releases an error. `mlart_error_free(NULL)` does nothing.
#[no_mangle]
pub extern "C" fn mlart_error_free(error: *mut mlart_error) {
    ffi_value("mlart_error_free", (), || {
        if !error.is_null() {
            // SAFETY: produced by Box::into_raw in into_raw and freed once (caller contract).
            drop(unsafe { Box::from_raw(error) });
        }
    })
}

/// A static, human-readable name for a status code ("invalid argument", ...).
#[no_mangle]
pub extern "C" fn mlart_status_name(status: mlart_status) -> *const c_char {
    let name: &'static std::ffi::CStr = match status {
        0 => c"ok",
        1 => c"invalid argument",
        2 => c"null pointer",
        3 => c"out of memory",
        4 => c"pool exhausted",
        5 => c"unsupported",
        6 => c"device error",
        7 => c"i/o error",
        8 => c"format error",
        9 => c"not found",
        10 => c"cancelled",
        11 => c"internal error",
        _ => c"unknown status",
    };
    name.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn status_names_match_the_rust_enum() {
        for s in [
            Status::Ok,
            Status::InvalidArgument,
            Status::NullPointer,
            Status::OutOfMemory,
            Status::PoolExhausted,
            Status::Unsupported,
            Status::Device,
            Status::Io,
            Status::Format,
            Status::NotFound,
            Status::Cancelled,
            Status::Internal,
        ] {
            // SAFETY: static C strings.
            let c = unsafe { CStr::from_ptr(mlart_status_name(s as u32)) };
            assert_eq!(c.to_str().unwrap(), s.name());
        }
    }

    #[test]
    fn message_survives_interior_nul() {
        let e = mlart_error::into_raw(Error::invalid("a\0b"));
        // SAFETY: e is a live error.
        let m = unsafe { CStr::from_ptr(mlart_error_message(e)) };
        assert_eq!(m.to_str().unwrap(), "a\\0b");
        mlart_error_free(e);
    }
}
