//! How `tooz` fails: one line on stderr and an exit status.

use std::fmt::Write as _;

use tooz::ToozError;

use crate::exit;

/// A failure of the `tooz` command: an optional message (printed as one line,
/// prefixed `tooz: `) and the exit status.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) message: Option<String>,
    pub(crate) code: i32,
}

impl Failure {
    /// A failure of `tooz` itself ([`exit::ERROR`]).
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Failure::with_code(exit::ERROR, message)
    }

    /// A failure with an explicit status.
    pub(crate) fn with_code(code: i32, message: impl Into<String>) -> Self {
        Failure {
            message: Some(message.into()),
            code,
        }
    }

    /// A failure without a message (interrupted by a signal).
    pub(crate) fn silent(code: i32) -> Self {
        Failure {
            message: None,
            code,
        }
    }

    /// The same message, but keeping the command's own non-zero status.
    pub(crate) fn keeping_status(mut self, command_status: i32) -> Self {
        if command_status != 0 {
            self.code = command_status;
        }
        self
    }

    /// The message as printed: `tooz: ...` on a single line.
    pub(crate) fn line(&self) -> Option<String> {
        self.message
            .as_ref()
            .map(|m| format!("tooz: {}", one_line(m)))
    }
}

impl From<ToozError> for Failure {
    fn from(e: ToozError) -> Self {
        Failure::new(describe(&e))
    }
}

/// The error's Display, followed by the causes its message does not already
/// include.
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !cause.is_empty() && !text.contains(&cause) {
            let _ = write!(text, ": {cause}");
        }
        source = s.source();
    }
    text
}

/// Collapses whitespace runs (including newlines) into single spaces.
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line() {
        let f = Failure::new("first\n  second\tthird ");
        assert_eq!(f.line().as_deref(), Some("tooz: first second third"));
        assert_eq!(Failure::silent(130).line(), None);
    }

    #[test]
    fn tooz_errors_use_display_and_causes() {
        let e = ToozError::connection("redis", "at h:1", std::io::Error::other("refused"));
        let f = Failure::from(e);
        assert_eq!(f.code, exit::ERROR);
        let line = f.line().unwrap();
        assert!(
            line.starts_with("tooz: cannot reach the redis backend: at h:1"),
            "{line}"
        );
        assert!(line.contains("refused"), "{line}");
    }

    #[test]
    fn command_status_wins_when_non_zero() {
        assert_eq!(Failure::new("x").keeping_status(7).code, 7);
        assert_eq!(Failure::new("x").keeping_status(0).code, exit::ERROR);
    }
}
