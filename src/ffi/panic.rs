//! The panic boundary every export sits behind.
//!
//! A panic inside an export becomes an `MLART_STATUS_INTERNAL` error carrying
//! the panic message; nothing unwinds into the host and nothing is printed
//! to its stderr (the default hook is silenced inside the boundary and on
//! mlart's own worker threads).

use super::error::mlart_error;
use crate::error::{Error, Result};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = DEPTH.with(|d| d.get() > 0)
                || std::thread::current()
                    .name()
                    .is_some_and(|n| n.starts_with("mlart-"));
            if !ours {
                previous(info);
            }
        }));
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs `f`, turning a panic into `Err(INTERNAL)` that names `func`.
pub(crate) fn catch<T>(func: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    install_hook();
    DEPTH.with(|d| d.set(d.get() + 1));
    let r = catch_unwind(AssertUnwindSafe(f));
    DEPTH.with(|d| d.set(d.get() - 1));
    match r {
        Ok(r) => r,
        Err(payload) => Err(Error::internal(format!(
            "{func}: internal panic: {} (please report this bug)",
            panic_message(&*payload)
        ))),
    }
}

/// The boundary for a fallible export: NULL on success, an error otherwise.
pub(crate) fn ffi_result(func: &str, f: impl FnOnce() -> Result<()>) -> *mut mlart_error {
    match catch(func, f) {
        Ok(()) => std::ptr::null_mut(),
        Err(e) => mlart_error::into_raw(e),
    }
}

/// The boundary for an infallible export: `fallback` if it panicked.
pub(crate) fn ffi_value<T>(func: &str, fallback: T, f: impl FnOnce() -> T) -> T {
    catch(func, || Ok(f())).unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Status;

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let e = catch("mlart_test_export", || -> Result<()> {
            panic!("boom {}", 42)
        })
        .unwrap_err();
        assert_eq!(e.status, Status::Internal);
        assert!(e.message.contains("mlart_test_export"), "{}", e.message);
        assert!(e.message.contains("boom 42"), "{}", e.message);
        // The boundary is re-entrant and leaves the depth balanced.
        assert_eq!(DEPTH.with(|d| d.get()), 0);
        assert!(catch("f", || Ok(1)).is_ok());
    }

    #[test]
    fn a_panic_on_a_worker_thread_is_caught_too() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .thread_name(|i| format!("mlart-test-{i}"))
            .build()
            .unwrap();
        let e = catch("worker", || -> Result<()> {
            pool.install(|| {
                use rayon::prelude::*;
                (0..64)
                    .into_par_iter()
                    .for_each(|i| assert!(i != 33, "bad item {i}"));
            });
            Ok(())
        })
        .unwrap_err();
        assert_eq!(e.status, Status::Internal);
        assert!(e.message.contains("bad item 33"), "{}", e.message);
    }

    #[test]
    fn ffi_result_returns_null_on_success_and_an_error_object_otherwise() {
        assert!(ffi_result("ok", || Ok(())).is_null());
        let e = ffi_result("bad", || Err(Error::invalid("x = 1 is wrong")));
        assert_eq!(
            super::super::error::mlart_error_code(e),
            Status::InvalidArgument as u32
        );
        super::super::error::mlart_error_free(e);
        let p = ffi_result("panics", || panic!("no"));
        assert_eq!(
            super::super::error::mlart_error_code(p),
            Status::Internal as u32
        );
        super::super::error::mlart_error_free(p);
    }
}
