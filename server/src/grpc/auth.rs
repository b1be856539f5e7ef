//! The API key, as gRPC metadata: `authorization: Bearer <key>` on every call when the server has
//! a key, as the HTTP front asks of its requests.

use std::sync::Arc;

use tonic::{Request, Status};

/// Refuses calls without the key, when there is one.
#[derive(Clone)]
pub struct ApiKey(Option<Arc<str>>);

impl ApiKey {
    /// A check for `key`; `None` lets every call through.
    pub fn new(key: Option<&str>) -> Self {
        Self(key.map(Arc::from))
    }
}

impl tonic::service::Interceptor for ApiKey {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(key) = &self.0 else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(&**key) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "a valid API key is required: metadata `authorization: Bearer <key>`",
            ))
        }
    }
}
