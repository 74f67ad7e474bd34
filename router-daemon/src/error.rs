//! Errors a client can see, and whose fault they are.
//!
//! Every failure on the request path becomes an [`ApiError`]: an HTTP status
//! plus an OpenAI-shaped JSON body (`{"error": {"message", "type", "param",
//! "code"}}`), so SDKs surface a readable message. `Fault` says who caused
//! it, which decides the status class and whether the daemon may retry.
use std::fmt;

/// Who caused a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The request was bad: 4xx, never retried.
    Client,
    /// A backend failed or none was reachable: 502/503.
    Backend,
    /// The router itself failed: 500.
    Internal,
}

impl Fault {
    /// Short name for logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Backend => "backend",
            Fault::Internal => "internal",
        }
    }
}

/// A bound on what a client may make the router hold; each is a flag, and
/// each refusal is counted by the one it hit
/// (`router_limit_exceeded_total{limit}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Limit {
    /// The request head (`--max-head-bytes`, and at most 64 fields).
    Head,
    /// The body, decoded or as sent (`--max-body-bytes`).
    Body,
    /// A chunked body's trailers (the head's limits).
    Trailers,
    /// The whole request's time (`--request-timeout-ms`).
    RequestTime,
    /// A kept-alive connection's wait for its next request
    /// (`--idle-timeout-ms`).
    IdleTime,
    /// Open client connections (`--max-connections`).
    Connections,
    /// Pipelined request bytes read ahead while a response is relayed
    /// (`--max-pipelined-bytes`); the client is then held back, not refused.
    Pipelined,
}

impl Limit {
    /// Every limit, for metrics that pre-create their labels.
    pub(crate) const ALL: [Limit; 7] = [
        Limit::Head,
        Limit::Body,
        Limit::Trailers,
        Limit::RequestTime,
        Limit::IdleTime,
        Limit::Connections,
        Limit::Pipelined,
    ];

    /// Short name for logs and metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Limit::Head => "head",
            Limit::Body => "body",
            Limit::Trailers => "trailers",
            Limit::RequestTime => "request_time",
            Limit::IdleTime => "idle_time",
            Limit::Connections => "connections",
            Limit::Pipelined => "pipelined",
        }
    }
}

/// A bound on how long the router waits for a backend; each is a flag, and
/// each time one passes is counted (`router_backend_timeouts_total{timeout}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Timeout {
    /// Opening a connection (`--connect-timeout-ms`); the next backend is
    /// tried.
    Connect,
    /// From the request sent to the response's first byte
    /// (`--first-byte-timeout-ms`).
    FirstByte,
    /// A silence between response bytes once the response began
    /// (`--response-idle-timeout-ms`).
    ResponseIdle,
}

impl Timeout {
    /// Every timeout, for metrics that pre-create their labels.
    pub(crate) const ALL: [Timeout; 3] =
        [Timeout::Connect, Timeout::FirstByte, Timeout::ResponseIdle];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Timeout::Connect => "connect",
            Timeout::FirstByte => "first_byte",
            Timeout::ResponseIdle => "response_idle",
        }
    }

    /// The flag that sets it.
    pub(crate) fn flag(self) -> &'static str {
        match self {
            Timeout::Connect => "--connect-timeout-ms",
            Timeout::FirstByte => "--first-byte-timeout-ms",
            Timeout::ResponseIdle => "--response-idle-timeout-ms",
        }
    }
}

/// Seconds a 503's `Retry-After` asks the client to wait.
pub(crate) const RETRY_AFTER_SECS: u32 = 1;

/// An error answered to the client as an HTTP response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// Human-readable message, returned in `error.message`.
    pub(crate) message: String,
    /// The limit the request passed, if that is why it failed.
    pub(crate) limit: Option<Limit>,
}

impl ApiError {
    /// 400: the request could not be understood.
    pub(crate) fn bad_request(message: impl fmt::Display) -> Self {
        Self::new(400, message)
    }

    /// 404: unknown path or model.
    pub(crate) fn not_found(message: impl fmt::Display) -> Self {
        Self::new(404, message)
    }

    /// 405: the path exists but not for this method.
    pub(crate) fn method_not_allowed(message: impl fmt::Display) -> Self {
        Self::new(405, message)
    }

    /// 408: the client did not finish its request in time.
    pub(crate) fn request_timeout(message: impl fmt::Display) -> Self {
        Self::new(408, message)
    }

    /// 413: the body is over the configured limit.
    pub(crate) fn payload_too_large(message: impl fmt::Display) -> Self {
        Self::new(413, message)
    }

    /// 431: the request head is over the configured limit.
    pub(crate) fn header_too_large(message: impl fmt::Display) -> Self {
        Self::new(431, message)
    }

    /// 501: a valid HTTP feature this router does not implement yet.
    pub(crate) fn not_implemented(message: impl fmt::Display) -> Self {
        Self::new(501, message)
    }

    /// 502: a backend failed before answering.
    pub(crate) fn bad_gateway(message: impl fmt::Display) -> Self {
        Self::new(502, message)
    }

    /// 503: no backend can take the request.
    pub(crate) fn unavailable(message: impl fmt::Display) -> Self {
        Self::new(503, message)
    }

    /// 504: the backend did not answer in time.
    pub(crate) fn gateway_timeout(message: impl fmt::Display) -> Self {
        Self::new(504, message)
    }

    fn new(status: u16, message: impl fmt::Display) -> Self {
        Self {
            status,
            message: message.to_string(),
            limit: None,
        }
    }

    /// The same error, marked as caused by passing `limit`.
    #[must_use]
    pub(crate) fn over(self, limit: Limit) -> Self {
        Self {
            limit: Some(limit),
            ..self
        }
    }

    /// Who caused this error.
    pub(crate) fn fault(&self) -> Fault {
        match self.status {
            400..=499 => Fault::Client,
            502..=504 => Fault::Backend,
            _ => Fault::Internal,
        }
    }

    /// The OpenAI error `type` for this status, as OpenAI's SDKs name them.
    pub(crate) fn kind(&self) -> &'static str {
        match self.status {
            400 | 408 | 413 | 431 => "BadRequestError",
            404 => "NotFoundError",
            405 => "MethodNotAllowed",
            501 => "NotImplementedError",
            502..=504 => "ServiceUnavailableError",
            _ => "InternalServerError",
        }
    }

    /// The full HTTP/1.1 response: status line, headers, JSON body. A 503
    /// says `Retry-After` ([`RETRY_AFTER_SECS`]): nothing was sent to a
    /// backend, and the fleet or the connection count may have changed by
    /// then.
    ///
    /// It always closes the connection: after an error the client's byte
    /// stream may be out of sync with request boundaries.
    pub(crate) fn to_response(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": null,
                "code": self.status,
            }
        })
        .to_string();
        let retry_after = if self.status == 503 {
            format!("retry-after: {RETRY_AFTER_SECS}\r\n")
        } else {
            String::new()
        };
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry_after}connection: close\r\n\r\n{}",
            self.status,
            reason_phrase(self.status),
            body.len(),
            body
        )
        .into_bytes()
    }
}

/// The reason phrase for the statuses this router produces.
pub(crate) fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_is_openai_error_json_with_matching_length() {
        let response = ApiError::bad_request("prompt: expected a string").to_response();
        let text = String::from_utf8(response).expect("ascii response");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).expect("json body");
        assert_eq!(json["error"]["message"], "prompt: expected a string");
        assert_eq!(json["error"]["type"], "BadRequestError");
        assert_eq!(json["error"]["code"], 400);
    }

    #[test]
    fn fault_follows_status_class() {
        assert_eq!(ApiError::not_found("x").fault(), Fault::Client);
        assert_eq!(ApiError::bad_gateway("x").fault(), Fault::Backend);
        assert_eq!(ApiError::new(500, "x").fault(), Fault::Internal);
    }
}
