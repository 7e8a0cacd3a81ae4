//! The one error type at the HTTP edge. Whatever goes wrong, Tencent gets its own body shape
//! (`ActionStatus`/`ErrorInfo`/`ErrorCode`) with a fitting HTTP status; `ErrorInfo` is short and
//! public — internal detail goes to the log, never to the caller.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Tencent's response body (https://www.tencentcloud.com/document/product/1047/34354).
#[derive(Debug, Serialize)]
pub struct TencentBody<'a> {
    #[serde(rename = "ActionStatus")]
    pub action_status: &'static str,
    #[serde(rename = "ErrorInfo")]
    pub error_info: &'a str,
    #[serde(rename = "ErrorCode")]
    pub error_code: u8,
}

impl TencentBody<'static> {
    pub const OK: TencentBody<'static> = TencentBody {
        action_status: "OK",
        error_info: "",
        error_code: 0,
    };
}

/// The acknowledgement Tencent waits for.
pub struct Ack;

impl IntoResponse for Ack {
    fn into_response(self) -> Response {
        (StatusCode::OK, Json(TencentBody::OK)).into_response()
    }
}

/// Why a request was refused. Each reason is a metric label, so the set is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    NotFound,
    MethodNotAllowed,
    SourceNotAllowed,
    DuplicateQueryParam,
    InvalidQueryParam,
    MissingSdkAppId,
    InvalidSdkAppId,
    UnknownSdkAppId,
    MissingSignature,
    InvalidRequestTime,
    StaleRequestTime,
    MalformedSignature,
    BadSignature,
    MissingCallbackCommand,
    BodyTooLarge,
    BodyReadFailed,
    RequestTimeout,
    EmptyBody,
    InvalidJson,
    CommandMismatch,
    InvalidMessage,
    RecordTooLarge,
    SpoolFull,
    SpoolUnavailable,
}

impl Reason {
    pub const ALL: [Reason; 24] = [
        Reason::NotFound,
        Reason::MethodNotAllowed,
        Reason::SourceNotAllowed,
        Reason::DuplicateQueryParam,
        Reason::InvalidQueryParam,
        Reason::MissingSdkAppId,
        Reason::InvalidSdkAppId,
        Reason::UnknownSdkAppId,
        Reason::MissingSignature,
        Reason::InvalidRequestTime,
        Reason::StaleRequestTime,
        Reason::MalformedSignature,
        Reason::BadSignature,
        Reason::MissingCallbackCommand,
        Reason::BodyTooLarge,
        Reason::BodyReadFailed,
        Reason::RequestTimeout,
        Reason::EmptyBody,
        Reason::InvalidJson,
        Reason::CommandMismatch,
        Reason::InvalidMessage,
        Reason::RecordTooLarge,
        Reason::SpoolFull,
        Reason::SpoolUnavailable,
    ];

    /// `(metric label, HTTP status, public ErrorInfo)`.
    fn parts(self) -> (&'static str, StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            Reason::NotFound => ("not_found", S::NOT_FOUND, "no such endpoint"),
            Reason::MethodNotAllowed => (
                "method_not_allowed",
                S::METHOD_NOT_ALLOWED,
                "callbacks must be POSTed",
            ),
            Reason::SourceNotAllowed => (
                "source_not_allowed",
                S::FORBIDDEN,
                "source address not allowed",
            ),
            Reason::DuplicateQueryParam => (
                "duplicate_query_param",
                S::BAD_REQUEST,
                "a query parameter appears more than once",
            ),
            Reason::InvalidQueryParam => (
                "invalid_query_param",
                S::BAD_REQUEST,
                "a query parameter holds a control character",
            ),
            Reason::MissingSdkAppId => {
                ("missing_sdk_app_id", S::BAD_REQUEST, "SdkAppid is missing")
            }
            Reason::InvalidSdkAppId => (
                "invalid_sdk_app_id",
                S::BAD_REQUEST,
                "SdkAppid is not a decimal integer",
            ),
            Reason::UnknownSdkAppId => (
                "unknown_sdk_app_id",
                S::FORBIDDEN,
                "SdkAppid is not served here",
            ),
            Reason::MissingSignature => (
                "missing_signature",
                S::UNAUTHORIZED,
                "Sign and RequestTime are required",
            ),
            Reason::InvalidRequestTime => (
                "invalid_request_time",
                S::BAD_REQUEST,
                "RequestTime is not a Unix time in seconds",
            ),
            Reason::StaleRequestTime => (
                "stale_request_time",
                S::UNAUTHORIZED,
                "RequestTime is outside the accepted window",
            ),
            Reason::MalformedSignature => (
                "malformed_signature",
                S::UNAUTHORIZED,
                "Sign is not 64 hex digits",
            ),
            Reason::BadSignature => ("bad_signature", S::UNAUTHORIZED, "Sign does not match"),
            Reason::MissingCallbackCommand => (
                "missing_callback_command",
                S::BAD_REQUEST,
                "CallbackCommand is missing",
            ),
            Reason::BodyTooLarge => (
                "body_too_large",
                S::PAYLOAD_TOO_LARGE,
                "body is larger than allowed",
            ),
            Reason::BodyReadFailed => {
                ("body_read_failed", S::BAD_REQUEST, "body could not be read")
            }
            Reason::RequestTimeout => (
                "request_timeout",
                S::REQUEST_TIMEOUT,
                "body did not arrive in time",
            ),
            Reason::EmptyBody => ("empty_body", S::BAD_REQUEST, "body is empty"),
            Reason::InvalidJson => ("invalid_json", S::BAD_REQUEST, "body is not a JSON object"),
            Reason::CommandMismatch => (
                "command_mismatch",
                S::BAD_REQUEST,
                "CallbackCommand differs between query and body",
            ),
            Reason::InvalidMessage => (
                "invalid_message",
                S::BAD_REQUEST,
                "body is not a valid message",
            ),
            Reason::RecordTooLarge => (
                "record_too_large",
                S::PAYLOAD_TOO_LARGE,
                "message is too large for the topic; kept in quarantine",
            ),
            Reason::SpoolFull => (
                "spool_full",
                S::SERVICE_UNAVAILABLE,
                "relay is full, try again later",
            ),
            Reason::SpoolUnavailable => (
                "spool_unavailable",
                S::SERVICE_UNAVAILABLE,
                "relay cannot store the message now, try again later",
            ),
        }
    }

    pub fn label(self) -> &'static str {
        self.parts().0
    }

    pub fn status(self) -> StatusCode {
        self.parts().1
    }

    pub fn public_info(self) -> &'static str {
        self.parts().2
    }
}

/// A refused request: the reason, plus an optional detail that is safe to show the caller
/// (which field was wrong — never a secret, never an internal error text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: Option<String>,
}

impl Rejection {
    pub fn with_detail(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: Some(detail.into()),
        }
    }

    pub fn error_info(&self) -> String {
        match &self.detail {
            Some(d) => format!("{}: {d}", self.reason.public_info()),
            None => self.reason.public_info().to_owned(),
        }
    }
}

impl From<Reason> for Rejection {
    fn from(reason: Reason) -> Self {
        Rejection {
            reason,
            detail: None,
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let info = self.error_info();
        let body = TencentBody {
            action_status: "FAIL",
            error_info: &info,
            error_code: 1,
        };
        (self.reason.status(), Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_reason_has_a_distinct_label_and_an_error_status() {
        let labels: HashSet<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
        for r in Reason::ALL {
            assert!(
                r.status().is_client_error() || r.status().is_server_error(),
                "{r:?}"
            );
            assert!(!r.public_info().is_empty());
        }
    }

    #[test]
    fn fail_body_has_tencent_shape() {
        let body = serde_json::to_string(&TencentBody {
            action_status: "FAIL",
            error_info: "x",
            error_code: 1,
        })
        .unwrap();
        assert_eq!(
            body,
            r#"{"ActionStatus":"FAIL","ErrorInfo":"x","ErrorCode":1}"#
        );
        assert_eq!(
            serde_json::to_string(&TencentBody::OK).unwrap(),
            r#"{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}"#
        );
    }
}
