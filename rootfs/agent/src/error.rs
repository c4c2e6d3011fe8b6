//! Errors as the RPC client sees them: each variant is one ttrpc status code, which the shim
//! maps to a containerd errdef (NotFound, AlreadyExists, FailedPrecondition,
//! InvalidArgument, Internal). Module errors convert into these with the code that fits.

use ttrpc::Code;

/// An RPC failure: the message says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    DeadlineExceeded(String),
}

impl RpcError {
    /// The ttrpc status code of this error.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) => Code::NOT_FOUND,
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Self::Internal(_) => Code::INTERNAL,
            Self::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
        }
    }
}

impl From<RpcError> for ttrpc::Error {
    fn from(err: RpcError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(err.code(), err.to_string()))
    }
}

/// Result of a request handler.
pub type RpcResult<T> = Result<T, RpcError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_ttrpc_status() {
        let err: ttrpc::Error = RpcError::NotFound("container x not found".into()).into();
        match err {
            ttrpc::Error::RpcStatus(status) => {
                assert_eq!(status.code(), Code::NOT_FOUND);
                assert_eq!(status.message(), "container x not found");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
