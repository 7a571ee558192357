//! What every HTTP provider adapter shares: the client, a bounded read of
//! an answer, `Retry-After`, short masked snippets for failure details, the
//! classification of transport errors; and for callbacks, the form fields,
//! the path-token check and bounded report fields.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, RETRY_AFTER};

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::domain::{mask_numbers, SendSms};
use crate::ports::{CallbackError, CallbackRequest, ProviderError};

/// Longest provider answer read.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024;
/// Longest provider message id kept.
pub const MAX_ID_CHARS: usize = 256;
/// Most part ids kept of one message, the first included (parts beyond
/// are not tracked for delivery).
pub const MAX_PARTS: usize = 32;
/// A `Retry-After` beyond this is treated as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How one instance's client is built.
#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_idle_connections: usize,
    /// `providers.<name>.http2`: HTTP/2 where the provider speaks it.
    pub http2: Http2,
}

/// Which HTTP versions an instance's client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Http2 {
    /// HTTP/1.1 only (the default): over https, ALPN offers `http/1.1`
    /// alone.
    #[default]
    Off,
    /// Over https, ALPN offers `h2` and `http/1.1` and the provider's TLS
    /// server picks; HTTP/1.1 stays the fallback.
    Alpn,
    /// Over cleartext `http://` there is no ALPN to negotiate with, so
    /// HTTP/2 is spoken from the first byte ("prior knowledge", RFC 9113
    /// section 3.3): a provider that speaks only HTTP/1.1 fails every call.
    PriorKnowledge,
}

impl Http2 {
    /// The mode for an instance with `http2 = enabled` and this base URL.
    pub fn for_base_url(enabled: bool, base_url: &str) -> Self {
        match (enabled, base_url.get(..8)) {
            (false, _) => Self::Off,
            (true, Some(scheme)) if scheme.eq_ignore_ascii_case("https://") => Self::Alpn,
            (true, _) => Self::PriorKnowledge,
        }
    }
}

/// A pooled client without redirects or retries: a provider that
/// redirects a POST is misconfigured, and retries are the service's own
/// business (with the lease and the breaker in view).
///
/// HTTP/1.1 unless the instance turned HTTP/2 on. With the crate's
/// `http2` feature reqwest's default would offer `h2` by ALPN to every
/// https provider, hence the explicit `http1_only()`
/// (<https://docs.rs/reqwest/0.13/reqwest/struct.ClientBuilder.html#method.http1_only>,
/// <https://docs.rs/reqwest/0.13/reqwest/struct.ClientBuilder.html#method.http2_prior_knowledge>).
/// Under HTTP/2 one connection multiplexes every concurrent request (up
/// to the provider's `SETTINGS_MAX_CONCURRENT_STREAMS`), so the pool
/// keeps one connection per host and `max_idle_connections` no longer
/// bounds anything in practice.
pub fn client(s: ClientSettings) -> Result<reqwest::Client, String> {
    let builder = reqwest::Client::builder()
        .connect_timeout(s.connect_timeout)
        .timeout(s.request_timeout)
        .pool_max_idle_per_host(s.max_idle_connections)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .retry(reqwest::retry::never())
        .user_agent(concat!("sms-service/", env!("CARGO_PKG_VERSION")));
    let builder = match s.http2 {
        Http2::Off => builder.http1_only(),
        Http2::Alpn => builder,
        Http2::PriorKnowledge => builder.http2_prior_knowledge(),
    };
    builder.build().map_err(|e| format!("provider client: {e}"))
}

/// The `Retry-After` of an answer, in seconds (an HTTP date or garbage is
/// ignored), capped.
pub fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// The W3C trace context of the provider call (`traceparent`, and
/// `tracestate` when there is one), for every adapter's request builder
/// (`.headers(http::trace_headers())`): the provider's side of a call can
/// join the message's trace. Empty when no trace is recorded.
pub fn trace_headers() -> HeaderMap {
    crate::telemetry::trace_headers()
        .into_iter()
        .filter_map(|(name, value)| Some((HeaderName::from_static(name), value.parse().ok()?)))
        .collect()
}

/// Reads at most [`MAX_ANSWER_BYTES`] of an answer. Every adapter reads
/// its answers through here, so this is where the HTTP status is noted on
/// the provider call's span.
pub async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    tracing::Span::current().record(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    );
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_ANSWER_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ANSWER_BYTES {
            break;
        }
    }
    Ok(body)
}

/// The start of an answer, short, on one line, phone numbers masked: for a
/// failure's detail, which reaches logs, events and dead-letter headers.
pub fn snippet(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .take(200)
        .filter(|c| !c.is_control())
        .collect();
    mask_numbers(&text)
}

/// A provider's id, bounded.
pub fn bounded_id(id: &str) -> String {
    id.chars().take(MAX_ID_CHARS).collect()
}

/// What is left of a message's `expiresAt`, in whole seconds (at least 1,
/// rounded up), for the providers' validity periods; `None` without one.
/// The core never calls a provider once it has passed.
pub fn seconds_left(sms: &SendSms) -> Option<u64> {
    let at = sms.expires_at?;
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    Some(left.as_secs() + u64::from(left.subsec_nanos() > 0)).map(|s| s.max(1))
}

/// The form fields of a callback: its body (POST), or its query (GET).
pub fn callback_form(request: &CallbackRequest<'_>) -> Vec<(String, String)> {
    let raw = if request.method == "GET" {
        request.query.as_bytes()
    } else {
        request.body
    };
    url::form_urlencoded::parse(raw).into_owned().collect()
}

/// The value of form field `name`, if given.
pub fn field<'f>(form: &'f [(String, String)], name: &str) -> Option<&'f str> {
    form.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The path token of a provider that signs nothing (`callback_token`),
/// compared in constant time. With no token configured the instance takes
/// no callbacks: an unauthenticated report could move any message.
pub fn check_path_token(
    expected: Option<&SecretString>,
    request: &CallbackRequest<'_>,
) -> Result<(), CallbackError> {
    let Some(expected) = expected.filter(|t| !t.expose_secret().is_empty()) else {
        return Err(CallbackError::NotHere(
            "callbacks need providers.<name>.callback_token".into(),
        ));
    };
    let given = request.token.unwrap_or_default();
    if bool::from(given.as_bytes().ct_eq(expected.expose_secret().as_bytes())) {
        Ok(())
    } else {
        Err(CallbackError::WrongToken)
    }
}

/// A report's field (a status, an error code), bounded to 64 characters.
pub fn bounded_text(text: &str) -> String {
    text.chars().take(64).collect()
}

/// A transport error, classified: a connect error (or a connect timeout)
/// means the request never reached the provider, so the message was not
/// sent; any other failure (a timeout while waiting for the answer, a
/// connection reset after the request was written) may have sent it.
pub fn transport_error(e: &reqwest::Error) -> ProviderError {
    let detail = describe(e);
    if e.is_connect() {
        ProviderError::transient(detail)
    } else {
        ProviderError::Ambiguous {
            detail,
            retry_after: None,
        }
    }
}

/// A transport error without the URL's secrets, numbers masked.
pub fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "connect error"
    } else if e.is_timeout() {
        "timeout"
    } else {
        "request error"
    };
    let mut detail = kind.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        detail = format!("{detail}: {inner}");
        source = inner.source();
    }
    mask_numbers(&detail)
}

/// The generic classification of a failed HTTP status, for providers whose
/// documentation says no more: 408, 429 and 503 not sent (transient); 500,
/// 502 and 504 ambiguous (the provider may have sent it); any other 4xx
/// rejected.
pub fn classify_status(
    status: reqwest::StatusCode,
    detail: String,
    retry_after: Option<Duration>,
) -> ProviderError {
    match status.as_u16() {
        408 | 429 | 503 => ProviderError::Transient {
            detail,
            retry_after,
        },
        500 | 502 | 504 => ProviderError::Ambiguous {
            detail,
            retry_after,
        },
        s if s >= 500 => ProviderError::Ambiguous {
            detail,
            retry_after,
        },
        _ => ProviderError::rejected(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_fall_in_one_class_each() {
        let class = |s: u16| {
            classify_status(
                reqwest::StatusCode::from_u16(s).unwrap(),
                String::new(),
                None,
            )
            .class()
        };
        for s in [408, 429, 503] {
            assert_eq!(class(s), "transient", "{s}");
        }
        for s in [500, 502, 504, 599] {
            assert_eq!(class(s), "ambiguous", "{s}");
        }
        for s in [400, 401, 403, 404, 422] {
            assert_eq!(class(s), "rejected", "{s}");
        }
    }

    #[test]
    fn a_quoted_answer_has_its_numbers_masked_and_fits_one_line() {
        let body = b"{\"message\": \"The 'To' number +254798765432 is not a valid phone number\",\n\"to\": \"254798765432\"}";
        let detail = snippet(body);
        assert!(!detail.contains("254798765432"), "{detail}");
        assert!(detail.contains("+********5432"), "{detail}");
        assert!(!detail.contains('\n'), "{detail}");
    }
}
