//! Authentication of the message routes (`POST /v1/messages`,
//! `GET /v1/messages/{key}`): `Authorization: Bearer <key>` with one of
//! `http.api_keys`, else 401. With no key configured the routes are open
//! only when `http.bind` is a loopback address, so a service reachable from
//! other machines never takes commands from anyone who finds the port.
//!
//! Keys are kept as SHA-256 digests and a presented key is hashed and
//! compared with every digest in constant time (`subtle`): neither the
//! time taken nor an early exit tells a caller how much of a key, or which
//! key, it got right, and the keys' lengths do not show either.
//!
//! The gRPC door applies the same rules ([`ApiAccess::check`]) to its
//! `authorization` metadata, with `grpc.bind` for the loopback rule.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use tracing::debug;

use super::{problem, HttpState};

/// Who may use the message routes.
#[derive(Clone)]
pub enum ApiAccess {
    /// A caller presenting one of these keys (SHA-256 digests).
    Keys(Arc<[[u8; 32]]>),
    /// Anyone: no key is configured and the API listens on loopback only.
    OpenOnLoopback,
    /// No one: no key is configured and the API is reachable from outside.
    Closed,
}

impl ApiAccess {
    /// The access `http.api_keys` and `http.bind` give.
    pub fn new(keys: &[SecretString], bind: &str) -> Self {
        if !keys.is_empty() {
            let digests = keys.iter().map(|k| digest(k.expose_secret())).collect();
            Self::Keys(digests)
        } else if is_loopback(bind) {
            Self::OpenOnLoopback
        } else {
            Self::Closed
        }
    }

    /// Whether `presented` (the text after `Bearer `) is one of the keys.
    /// Every key is compared, in constant time, whatever matches.
    pub fn accepts(&self, presented: &str) -> bool {
        match self {
            Self::Keys(digests) => {
                let presented = digest(presented);
                let matched = digests.iter().fold(Choice::from(0), |any, key| {
                    any | key[..].ct_eq(&presented[..])
                });
                bool::from(matched)
            }
            Self::OpenOnLoopback => true,
            Self::Closed => false,
        }
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether a bind address (`IP:port`, `[IPv6]:port`, `localhost:port`)
/// only accepts connections from this machine: 127.0.0.0/8, ::1 (also
/// IPv4-mapped) or `localhost`. `0.0.0.0` and `::` are not loopback.
pub fn is_loopback(bind: &str) -> bool {
    let host = match bind.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => bind,
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Why a caller may not act on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No key is configured and the door is reachable from outside.
    NoKeyConfigured,
    /// No `Bearer` credentials were presented.
    NoKey,
    /// The key presented is not one of the configured keys.
    WrongKey,
}

impl Denial {
    /// What the caller is told; `bind_setting` names the door's address
    /// setting (`http.bind`, `grpc.bind`).
    pub fn detail(self, bind_setting: &str) -> String {
        match self {
            Self::NoKeyConfigured => format!(
                "no API key is configured (http.api_keys) and {bind_setting} is not a loopback address"
            ),
            Self::NoKey => "send Authorization: Bearer <API key>".to_owned(),
            Self::WrongKey => "API key not accepted".to_owned(),
        }
    }

    /// The HTTP `WWW-Authenticate` challenge.
    fn challenge(self) -> &'static str {
        match self {
            Self::WrongKey => "Bearer realm=\"sms-service\", error=\"invalid_token\"",
            Self::NoKeyConfigured | Self::NoKey => "Bearer realm=\"sms-service\"",
        }
    }
}

impl ApiAccess {
    /// Whether a caller whose `Authorization` header (or gRPC
    /// `authorization` metadata) is `authorization` may act on messages.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Denial> {
        match (self, authorization.and_then(bearer)) {
            (Self::OpenOnLoopback, _) => Ok(()),
            (Self::Closed, _) => Err(Denial::NoKeyConfigured),
            (Self::Keys(_), None) => Err(Denial::NoKey),
            (Self::Keys(_), Some(key)) if !self.accepts(key) => Err(Denial::WrongKey),
            (Self::Keys(_), Some(_)) => Ok(()),
        }
    }
}

/// The text after `Bearer ` in an `Authorization` value (the scheme in
/// any case).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Middleware on the message routes: lets the request through only with
/// an accepted key; otherwise 401 with `WWW-Authenticate: Bearer`, before
/// the body is read.
pub async fn require_api_key(
    State(state): State<HttpState>,
    request: Request,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.api_access.check(authorization) {
        Ok(()) => next.run(request).await,
        Err(denial) => {
            let detail = denial.detail("http.bind");
            debug!(path = request.uri().path(), detail, "request refused: 401");
            let mut response = problem(StatusCode::UNAUTHORIZED, "unauthorized", detail);
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(denial.challenge()),
            );
            response.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(keys: &[&str]) -> ApiAccess {
        let keys: Vec<SecretString> = keys.iter().map(|k| SecretString::from(*k)).collect();
        ApiAccess::new(&keys, "0.0.0.0:8080")
    }

    #[test]
    fn a_key_is_accepted_only_when_it_equals_one_of_the_configured_keys() {
        let access = keys(&["first-key-0123456789", "second-key-abcdefghij"]);
        assert!(access.accepts("first-key-0123456789"));
        assert!(
            access.accepts("second-key-abcdefghij"),
            "any key of the list"
        );
        for wrong in [
            "",
            "first-key-012345678",
            "first-key-01234567890",
            "FIRST-KEY-0123456789",
            "second-key-abcdefghi",
            "first-key-0123456789second-key-abcdefghij",
        ] {
            assert!(!access.accepts(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn without_keys_only_a_loopback_bind_is_open() {
        for bind in [
            "127.0.0.1:8080",
            "127.8.9.10:0",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:80",
            "localhost:8080",
        ] {
            assert!(is_loopback(bind), "{bind}");
            assert!(ApiAccess::new(&[], bind).accepts(""), "{bind}");
        }
        for bind in [
            "0.0.0.0:8080",
            "[::]:8080",
            "10.1.2.3:8080",
            "192.168.0.1:0",
            "example.com:8080",
        ] {
            assert!(!is_loopback(bind), "{bind}");
            assert!(!ApiAccess::new(&[], bind).accepts("anything"), "{bind}");
        }
        let configured = [SecretString::from("a-key-of-16-chars")];
        assert!(
            !ApiAccess::new(&configured, "127.0.0.1:8080").accepts(""),
            "configured keys apply on loopback too"
        );
    }

    #[test]
    fn check_reads_the_bearer_scheme_in_any_case_and_names_why_it_refuses() {
        let access = keys(&["first-key-0123456789"]);
        assert_eq!(access.check(Some("Bearer first-key-0123456789")), Ok(()));
        assert_eq!(access.check(Some("bearer  first-key-0123456789 ")), Ok(()));
        assert_eq!(access.check(None), Err(Denial::NoKey));
        assert_eq!(access.check(Some("Basic Zm9vOmJhcg==")), Err(Denial::NoKey));
        assert_eq!(access.check(Some("Bearer ")), Err(Denial::NoKey));
        assert_eq!(access.check(Some("Bearer nope")), Err(Denial::WrongKey));
        let closed = ApiAccess::new(&[], "0.0.0.0:50051");
        assert_eq!(closed.check(None), Err(Denial::NoKeyConfigured));
        assert!(Denial::NoKeyConfigured
            .detail("grpc.bind")
            .contains("grpc.bind is not a loopback address"));
        assert_eq!(ApiAccess::new(&[], "127.0.0.1:50051").check(None), Ok(()));
    }
}
