//! How cases report: [`CaseError`], the [`Ctx`] extension and the assertion macros.

use std::fmt;

use tooz_core::ToozError;

/// Why a case did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseError {
    /// The driver behaved differently from the contract.
    Failed(String),
    /// The driver lacks what the case needs (it returned `NotImplemented`, or the
    /// case cannot be set up for it). Counted and shown, never passed.
    Unsupported(String),
}

impl fmt::Display for CaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaseError::Failed(m) => write!(f, "failed: {m}"),
            CaseError::Unsupported(m) => write!(f, "unsupported: {m}"),
        }
    }
}

impl std::error::Error for CaseError {}

/// What a case returns: `Ok(())` when it passed.
pub type CaseResult = Result<(), CaseError>;

impl CaseError {
    /// The error a [`ToozError`] becomes: `NotImplemented` is unsupported, anything
    /// else a failure that names the operation being checked.
    pub fn from_tooz(what: &str, e: &ToozError) -> Self {
        match e {
            ToozError::NotImplemented { driver, operation } => CaseError::Unsupported(format!(
                "{what}: {operation} is not implemented by driver {driver}"
            )),
            other => CaseError::Failed(format!("{what}: unexpected error: {other} ({other:?})")),
        }
    }
}

impl From<ToozError> for CaseError {
    fn from(e: ToozError) -> Self {
        CaseError::from_tooz("call", &e)
    }
}

/// Attaches the name of the checked operation to an error.
///
/// ```
/// use tooz_conformance::{CaseResult, Ctx};
///
/// fn check(r: tooz_core::Result<()>) -> CaseResult {
///     r.ctx("create_group")?;
///     Ok(())
/// }
/// ```
pub trait Ctx<T> {
    /// Maps the error to a [`CaseError`] mentioning `what`.
    ///
    /// # Errors
    /// The mapped error.
    fn ctx(self, what: &str) -> Result<T, CaseError>;
}

impl<T> Ctx<T> for Result<T, ToozError> {
    fn ctx(self, what: &str) -> Result<T, CaseError> {
        self.map_err(|e| CaseError::from_tooz(what, &e))
    }
}

impl<T> Ctx<T> for std::io::Result<T> {
    fn ctx(self, what: &str) -> Result<T, CaseError> {
        self.map_err(|e| CaseError::Failed(format!("{what}: {e}")))
    }
}

impl<T> Ctx<T> for Result<T, tokio::time::error::Elapsed> {
    fn ctx(self, what: &str) -> Result<T, CaseError> {
        self.map_err(|_| CaseError::Failed(format!("{what}: did not finish in time")))
    }
}

/// Fails the case with a formatted message.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::CaseError::Failed(format!($($arg)*)))
    };
}

/// Ends the case as unsupported with a formatted reason.
macro_rules! unsupported {
    ($($arg:tt)*) => {
        return Err($crate::CaseError::Unsupported(format!($($arg)*)))
    };
}

/// Fails the case unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            fail!($($arg)*);
        }
    };
}

/// Fails the case unless `actual == expected`; the message says what was compared.
macro_rules! ensure_eq {
    ($actual:expr, $expected:expr, $($arg:tt)*) => {
        match (&$actual, &$expected) {
            (actual, expected) => {
                if *actual != *expected {
                    fail!(
                        "{}: expected {:?}, got {:?}",
                        format_args!($($arg)*),
                        expected,
                        actual
                    );
                }
            }
        }
    };
}

/// Fails the case unless the result is an error matching the pattern.
/// `NotImplemented` makes the case unsupported.
macro_rules! expect_err {
    ($res:expr, $pat:pat $(if $guard:expr)?, $($arg:tt)*) => {
        match $res {
            Err($pat) $(if $guard)? => {}
            Err(tooz_core::ToozError::NotImplemented { driver, operation }) => {
                unsupported!(
                    "{}: {operation} is not implemented by driver {driver}",
                    format_args!($($arg)*)
                )
            }
            Err(e) => fail!(
                "{}: expected {}, got error {e} ({e:?})",
                format_args!($($arg)*),
                stringify!($pat)
            ),
            Ok(v) => fail!(
                "{}: expected error {}, got Ok({:?})",
                format_args!($($arg)*),
                stringify!($pat),
                v
            ),
        }
    };
}
