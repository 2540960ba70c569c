//! The C ABI: the only place with `extern "C"` and raw pointers (besides `backend`). Every entry point goes
//! through [`guard`], so no panic crosses the boundary. Entry points keep the spec's names.
#![allow(non_snake_case)]

pub mod args;
pub mod backup;
pub mod exports;
pub mod lifecycle;
pub mod mechanism;
pub mod objects;
pub mod sessions;
pub mod table;
pub mod token;

use cryptoki_sys::{CKR_GENERAL_ERROR, CK_RV};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs the body of an entry point: `Err(rv)` and `Ok(rv)` both become `rv`; a panic becomes
/// CKR_GENERAL_ERROR and a log line instead of unwinding into C.
#[inline(always)]
pub(crate) fn guard(name: &'static str, body: impl FnOnce() -> Result<CK_RV, CK_RV>) -> CK_RV {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(rv)) | Ok(Err(rv)) => rv,
        Err(panic) => {
            panicked(name, panic.as_ref());
            CKR_GENERAL_ERROR
        }
    }
}

#[cold]
fn panicked(name: &str, panic: &(dyn std::any::Any + Send)) {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    crate::error!("internal error in {name}: {message}; returned CKR_GENERAL_ERROR");
}
