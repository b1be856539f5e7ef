//! Runtime errors as gRPC statuses, with the codes the HTTP front's statuses correspond to: an
//! unknown or closed session is `NOT_FOUND`, a full server `RESOURCE_EXHAUSTED`, a request the
//! runtime cannot take `INVALID_ARGUMENT`, a runtime that is stopping or has failed `UNAVAILABLE`.

use tonic::Status;
use troupe::RuntimeError;

use crate::error::{classify, ErrorClass};

/// The status a client receives for `e`, its message saying what went wrong.
pub fn status(e: &RuntimeError) -> Status {
    let message = e.to_string();
    match classify(e) {
        ErrorClass::Overloaded => Status::resource_exhausted(message),
        ErrorClass::NotFound => Status::not_found(message),
        ErrorClass::BadInput { .. } => Status::invalid_argument(message),
        ErrorClass::Unavailable => Status::unavailable(message),
        ErrorClass::Cancelled => Status::cancelled(message),
        ErrorClass::Internal => Status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use troupe::engine::EngineError;

    use super::*;

    #[test]
    fn each_kind_of_error_has_its_code() {
        let refused = RuntimeError::AdmissionRefused {
            limit: troupe::Limit::Sessions,
            requested: 1,
            available: 0,
            over: 1,
        };
        let cases = [
            (refused, Code::ResourceExhausted),
            (RuntimeError::UnknownSession(7), Code::NotFound),
            (RuntimeError::SessionClosed(7), Code::NotFound),
            (
                RuntimeError::PromptTooLong {
                    tokens: 9,
                    limit: 8,
                },
                Code::InvalidArgument,
            ),
            (
                EngineError::InvalidWindow("empty".into()).into(),
                Code::InvalidArgument,
            ),
            (
                EngineError::TokenOutOfRange {
                    token: 900,
                    vocab: 256,
                }
                .into(),
                Code::InvalidArgument,
            ),
            (RuntimeError::ShuttingDown, Code::Unavailable),
            (
                RuntimeError::RuntimeFailed("gone".into()),
                Code::Unavailable,
            ),
            (RuntimeError::Cancelled(7), Code::Cancelled),
            (RuntimeError::TurnInProgress(7), Code::Internal),
        ];
        for (e, code) in cases {
            let s = status(&e);
            assert_eq!(s.code(), code, "{e}");
            assert_eq!(s.message(), e.to_string());
        }
    }
}
