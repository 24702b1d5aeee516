//! How a use case ended: the canonical status codes (`google.rpc.Code`), independent of
//! the transport. Audit entries record an outcome by its canonical name; the service layer
//! classifies its errors with it; only `api` turns it into a `tonic::Code` (and back, for
//! calls refused before a handler ran). The store and the writer never see tonic.

/// A canonical status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Outcome {
    /// Every outcome, in the order of their canonical numbers (0 to 16).
    pub const ALL: [Outcome; 17] = [
        Outcome::Ok,
        Outcome::Cancelled,
        Outcome::Unknown,
        Outcome::InvalidArgument,
        Outcome::DeadlineExceeded,
        Outcome::NotFound,
        Outcome::AlreadyExists,
        Outcome::PermissionDenied,
        Outcome::ResourceExhausted,
        Outcome::FailedPrecondition,
        Outcome::Aborted,
        Outcome::OutOfRange,
        Outcome::Unimplemented,
        Outcome::Internal,
        Outcome::Unavailable,
        Outcome::DataLoss,
        Outcome::Unauthenticated,
    ];

    /// The canonical name, as recorded in audit entries ("OK", "NOT_FOUND", ...).
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Cancelled => "CANCELLED",
            Outcome::Unknown => "UNKNOWN",
            Outcome::InvalidArgument => "INVALID_ARGUMENT",
            Outcome::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Outcome::NotFound => "NOT_FOUND",
            Outcome::AlreadyExists => "ALREADY_EXISTS",
            Outcome::PermissionDenied => "PERMISSION_DENIED",
            Outcome::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Outcome::FailedPrecondition => "FAILED_PRECONDITION",
            Outcome::Aborted => "ABORTED",
            Outcome::OutOfRange => "OUT_OF_RANGE",
            Outcome::Unimplemented => "UNIMPLEMENTED",
            Outcome::Internal => "INTERNAL",
            Outcome::Unavailable => "UNAVAILABLE",
            Outcome::DataLoss => "DATA_LOSS",
            Outcome::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The canonical number (`google.rpc.Code`).
    pub fn number(self) -> i32 {
        Outcome::ALL
            .iter()
            .position(|o| *o == self)
            .map_or(2, |i| i as i32)
    }

    /// The outcome of a canonical number; anything else is `Unknown`.
    pub fn from_number(n: i32) -> Outcome {
        usize::try_from(n)
            .ok()
            .and_then(|i| Outcome::ALL.get(i).copied())
            .unwrap_or(Outcome::Unknown)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_are_the_canonical_ones() {
        for (n, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome.number(), n as i32);
            assert_eq!(Outcome::from_number(n as i32), *outcome);
        }
        assert_eq!(Outcome::from_number(17), Outcome::Unknown);
        assert_eq!(Outcome::from_number(-1), Outcome::Unknown);
        assert_eq!(Outcome::FailedPrecondition.name(), "FAILED_PRECONDITION");
        assert_eq!(Outcome::Ok.number(), 0);
        assert_eq!(Outcome::Unauthenticated.number(), 16);
    }
}
