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

/// The text after `Bearer ` in `Authorization` (the scheme in any case).
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
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
    let access = &state.api_access;
    let refusal = match (access, bearer(&request)) {
        (ApiAccess::OpenOnLoopback, _) => None,
        (ApiAccess::Closed, _) => Some((
            "no API key is configured (http.api_keys) and http.bind is not a loopback address",
            "Bearer realm=\"sms-service\"",
        )),
        (ApiAccess::Keys(_), None) => Some((
            "send Authorization: Bearer <API key>",
            "Bearer realm=\"sms-service\"",
        )),
        (ApiAccess::Keys(_), Some(key)) if !access.accepts(key) => Some((
            "API key not accepted",
            "Bearer realm=\"sms-service\", error=\"invalid_token\"",
        )),
        (ApiAccess::Keys(_), Some(_)) => None,
    };
    match refusal {
        None => next.run(request).await,
        Some((detail, challenge)) => {
            debug!(path = request.uri().path(), detail, "request refused: 401");
            let mut response = problem(StatusCode::UNAUTHORIZED, "unauthorized", detail);
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
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
}
