//! Error kinds and messages shared by every layer.
//!
//! An [`Error`] carries a stable [`Status`] (mirrored one-to-one by the C
//! `mlart_status` constants) and a message that names the argument and the
//! value that was wrong, so a host can log it as it is.

use std::fmt;

/// Stable error categories. The numbers are part of the C ABI: append only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    InvalidArgument = 1,
    NullPointer = 2,
    OutOfMemory = 3,
    PoolExhausted = 4,
    Unsupported = 5,
    Device = 6,
    Io = 7,
    Format = 8,
    NotFound = 9,
    Cancelled = 10,
    Internal = 11,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::InvalidArgument => "invalid argument",
            Status::NullPointer => "null pointer",
            Status::OutOfMemory => "out of memory",
            Status::PoolExhausted => "pool exhausted",
            Status::Unsupported => "unsupported",
            Status::Device => "device error",
            Status::Io => "i/o error",
            Status::Format => "format error",
            Status::NotFound => "not found",
            Status::Cancelled => "cancelled",
            Status::Internal => "internal error",
        }
    }
}

/// An error with its category and a human-readable message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Status::InvalidArgument, message)
    }

    /// `name` is NULL where a value is required.
    pub fn null(name: &str) -> Self {
        Self::new(Status::NullPointer, format!("{name} is NULL"))
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(Status::Unsupported, message)
    }

    /// Prefixes the message with where it happened.
    pub fn with_context(mut self, context: &str) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// A GPU driver or device failure.
    pub fn device(message: impl Into<String>) -> Self {
        Self::new(Status::Device, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Status::NotFound, message)
    }

    pub fn out_of_memory(what: &str, bytes: usize) -> Self {
        Self::new(
            Status::OutOfMemory,
            format!("could not allocate {bytes} bytes for {what}"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Status::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.name(), self.message)
    }
}

impl std::error::Error for Error {}

/// Checks `lo <= value < hi` and names the argument otherwise.
pub fn check_range(name: &str, value: i64, lo: i64, hi: i64) -> Result<()> {
    if value < lo || value >= hi {
        return Err(Error::invalid(format!(
            "{name} = {value} is outside [{lo}, {hi})"
        )));
    }
    Ok(())
}

/// Multiplies sizes, reporting overflow as an invalid argument about `what`.
pub fn checked_size(what: &str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| {
            Error::invalid(format!(
                "{what}: size {factors:?} overflows the address space"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_message_names_argument_and_bounds() {
        let e = check_range("block_table[3][7]", 2147480000, 0, 512).unwrap_err();
        assert_eq!(e.status, Status::InvalidArgument);
        assert_eq!(
            e.message,
            "block_table[3][7] = 2147480000 is outside [0, 512)"
        );
        assert!(check_range("x", 0, 0, 1).is_ok());
        assert!(check_range("x", 1, 0, 1).is_err());
    }

    #[test]
    fn size_overflow_is_an_error() {
        assert_eq!(checked_size("q", &[2, 3, 4]).unwrap(), 24);
        assert!(checked_size("q", &[usize::MAX, 2]).is_err());
    }
}
