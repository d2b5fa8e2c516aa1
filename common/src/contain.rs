//! Containing a panic in code a library runs for its user.
//!
//! Our services abort on any panic ([`crate::logging::abort_on_panic`]): a
//! panic in our code is a broken invariant, and the process recovers from
//! its durable log on restart. A participant's own operation code (the
//! SDK's `Resource`) is not ours: a bug there must cost that one request,
//! not the service. [`contained`] runs such code, turns its panic into an
//! error, and tells the panic hook not to abort meanwhile; the caller then
//! rolls back what the code wrote.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// A panic in contained code: where, and its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the service's {what} panicked: {message}")]
pub struct Panicked {
    pub what: &'static str,
    pub message: String,
}

impl Panicked {
    /// As a SQLite error, so that a database job returning it is rolled
    /// back to its savepoint like any failed job.
    pub fn into_sqlite(self) -> rusqlite::Error {
        rusqlite::Error::ToSqlConversionFailure(Box::new(self))
    }
}

/// Runs `f`; a panic in it is returned as [`Panicked`] instead of
/// unwinding further (or aborting the process).
pub fn contained<T>(what: &'static str, f: impl FnOnce() -> T) -> Result<T, Panicked> {
    DEPTH.with(|d| d.set(d.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    DEPTH.with(|d| d.set(d.get() - 1));
    result.map_err(|payload| Panicked {
        what,
        message: payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into()),
    })
}

/// Whether this thread is inside [`contained`] code (the panic hook does
/// not abort then).
pub fn is_contained() -> bool {
    DEPTH.with(|d| d.get() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_returned_and_the_thread_goes_on() {
        assert_eq!(contained("hold", || 7), Ok(7));
        let e = contained("hold", || -> u32 { panic!("boom {}", 1) }).unwrap_err();
        assert_eq!(e.what, "hold");
        assert_eq!(e.message, "boom 1");
        assert!(!is_contained());
        let inner = contained("outer", || {
            assert!(is_contained());
            contained("inner", || panic!("x")).is_err() && is_contained()
        });
        assert_eq!(inner, Ok(true));
        assert!(e
            .into_sqlite()
            .to_string()
            .contains("hold panicked: boom 1"));
    }
}
