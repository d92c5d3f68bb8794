//! Identifiers: group ids, member ids and lock names.
//!
//! Python tooz treats all three as byte strings; so do we. Each type converts
//! cheaply from `&str`, `String`, `&[u8]` and `Vec<u8>`, clones in O(1), and
//! displays losslessly: valid UTF-8 as text, anything else with `\xNN` escapes.

use std::fmt;
use std::sync::Arc;

use crate::error::{Result, ToozError};

/// The longest id accepted by the core (drivers may accept less).
pub const MAX_ID_LEN: usize = 1024;

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<[u8]>);

        impl $name {
            /// Builds an id from bytes.
            pub fn new(bytes: impl AsRef<[u8]>) -> Self {
                $name(Arc::from(bytes.as_ref()))
            }
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8] {
                &self.0
            }
            /// The id as text when it is valid UTF-8.
            pub fn as_str(&self) -> Option<&str> {
                std::str::from_utf8(&self.0).ok()
            }
            /// The id as text, replacing invalid UTF-8.
            pub fn to_string_lossy(&self) -> String {
                String::from_utf8_lossy(&self.0).into_owned()
            }
            /// Checks the id is non-empty and at most [`MAX_ID_LEN`] bytes.
            ///
            /// # Errors
            /// [`ToozError::InvalidId`] naming the id and the rule it breaks.
            pub fn validate(&self) -> Result<()> {
                validate_bytes($kind, &self.0, MAX_ID_LEN)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                display_bytes(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(\"", stringify!($name))?;
                display_bytes(&self.0, f)?;
                f.write_str("\")")
            }
        }

        impl AsRef<[u8]> for $name {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::new(s)
            }
        }
        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(Arc::from(s.into_bytes().into_boxed_slice()))
            }
        }
        impl From<&String> for $name {
            fn from(s: &String) -> Self {
                $name::new(s)
            }
        }
        impl From<&[u8]> for $name {
            fn from(s: &[u8]) -> Self {
                $name::new(s)
            }
        }
        impl<const N: usize> From<&[u8; N]> for $name {
            fn from(s: &[u8; N]) -> Self {
                $name::new(s)
            }
        }
        impl From<Vec<u8>> for $name {
            fn from(s: Vec<u8>) -> Self {
                $name(Arc::from(s.into_boxed_slice()))
            }
        }
        impl From<&$name> for $name {
            fn from(s: &$name) -> Self {
                s.clone()
            }
        }
    };
}

byte_id!(
    /// A group id. Groups are named sets of members.
    GroupId,
    "group id"
);
byte_id!(
    /// A member id: one per coordinator (process or service instance).
    MemberId,
    "member id"
);
impl MemberId {
    /// Wraps bytes already shared (the hash ring's nodes) without copying them.
    pub(crate) fn from_shared(bytes: Arc<[u8]>) -> Self {
        MemberId(bytes)
    }
}

byte_id!(
    /// A lock name.
    LockName,
    "lock name"
);

/// Checks an id: non-empty and at most `max` bytes.
///
/// # Errors
/// [`ToozError::InvalidId`] naming the id and the rule it breaks.
pub fn validate_bytes(kind: &'static str, bytes: &[u8], max: usize) -> Result<()> {
    if bytes.is_empty() {
        return Err(ToozError::InvalidId {
            kind,
            id: String::new(),
            reason: "must not be empty".into(),
        });
    }
    if bytes.len() > max {
        return Err(ToozError::InvalidId {
            kind,
            id: format!(
                "{}…",
                String::from_utf8_lossy(&bytes[..32.min(bytes.len())])
            ),
            reason: format!("is {} bytes long, the limit is {max}", bytes.len()),
        });
    }
    Ok(())
}

fn display_bytes(bytes: &[u8], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match std::str::from_utf8(bytes) {
        Ok(s) => f.write_str(s),
        Err(_) => {
            for chunk in bytes.utf8_chunks() {
                f.write_str(chunk.valid())?;
                for b in chunk.invalid() {
                    write!(f, "\\x{b:02x}")?;
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_and_display() {
        let g = GroupId::from("grp");
        assert_eq!(g.as_bytes(), b"grp");
        assert_eq!(g.to_string(), "grp");
        let raw = MemberId::from(&b"a\xffb"[..]);
        assert_eq!(raw.to_string(), "a\\xffb");
        assert_eq!(raw.as_str(), None);
        assert_eq!(format!("{g:?}"), "GroupId(\"grp\")");
    }

    #[test]
    fn validation() {
        assert!(GroupId::from("").validate().is_err());
        assert!(
            GroupId::from("x".repeat(MAX_ID_LEN + 1))
                .validate()
                .is_err()
        );
        assert!(LockName::from("ok").validate().is_ok());
    }
}
