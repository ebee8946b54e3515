//! RFC 9457 problem details: every error of the API is an
//! `application/problem+json` body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The media type of a problem body (RFC 9457 §6.1).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Problem type of a malformed or unknown query parameter. A relative
/// reference (RFC 9457 §3.1.1), resolved against the API's own address.
pub const INVALID_PARAMETER: &str = "/problems/invalid-parameter";

/// One problem (RFC 9457 §3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// HTTP status (the `status` member).
    pub status: StatusCode,
    /// `type`; `about:blank` when the status says it all (§4.2.1).
    pub kind: &'static str,
    /// `title`: the same for every occurrence of the type.
    pub title: &'static str,
    /// `detail`: this occurrence.
    pub detail: String,
    /// Extension member `parameter`: the query parameter at fault.
    pub parameter: Option<String>,
}

impl Problem {
    /// 400: a parameter is missing, malformed, unknown or repeated.
    pub fn invalid(parameter: &str, detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: INVALID_PARAMETER,
            title: "Invalid query parameter",
            detail: detail.into(),
            parameter: Some(parameter.to_owned()),
        }
    }

    /// 401: no token, or an unknown or revoked one.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: "about:blank",
            title: "Unauthorized",
            detail: detail.into(),
            parameter: None,
        }
    }

    /// 403: the token's role may not do this.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            kind: "about:blank",
            title: "Forbidden",
            detail: detail.into(),
            parameter: None,
        }
    }

    /// 500: the database failed (the detail is logged, not sent).
    pub fn internal() -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "about:blank",
            title: "Internal Server Error",
            detail: "the archive database failed; the request was not answered".to_owned(),
            parameter: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "type": self.kind,
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(p) = &self.parameter {
            body["parameter"] = serde_json::Value::String(p.clone());
        }
        body
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))],
            self.body().to_string(),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3: the scheme the client must use.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"switchboard\""),
            );
        }
        response
    }
}
