//! Runtime errors as gRPC statuses, with the codes the HTTP front's statuses correspond to: an
//! unknown or closed session is `NOT_FOUND`, a full server `RESOURCE_EXHAUSTED`, a request the
//! runtime cannot take `INVALID_ARGUMENT`, a runtime that is stopping or has failed `UNAVAILABLE`.

use tonic::Status;
use troupe::engine::EngineError;
use troupe::RuntimeError;

/// The status a client receives for `e`, its message saying what went wrong.
pub fn status(e: &RuntimeError) -> Status {
    let message = e.to_string();
    match e {
        RuntimeError::AdmissionRefused { .. } => Status::resource_exhausted(message),
        RuntimeError::UnknownSession(_) | RuntimeError::SessionClosed(_) => {
            Status::not_found(message)
        }
        RuntimeError::PromptTooLong { .. }
        | RuntimeError::EmptyPrompt
        | RuntimeError::InvalidConfig(_)
        | RuntimeError::NoTokenizer => Status::invalid_argument(message),
        RuntimeError::Engine(inner) => match inner.as_ref() {
            EngineError::WindowPastPositions { .. }
            | EngineError::InvalidWindow(_)
            | EngineError::TokenOutOfRange { .. } => Status::invalid_argument(message),
            _ => Status::internal(message),
        },
        RuntimeError::ShuttingDown
        | RuntimeError::ActorUnavailable(_)
        | RuntimeError::Timeout(_)
        | RuntimeError::RuntimeFailed(_)
        | RuntimeError::NoVerifier
        | RuntimeError::TooManyRestarts { .. }
        | RuntimeError::RebuildFailed(_) => Status::unavailable(message),
        RuntimeError::Cancelled(_) => Status::cancelled(message),
        _ => Status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

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
