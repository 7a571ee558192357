//! The generic HTTP provider of docs/reference.md (section 6):
//! `POST {base_url}/messages` with `{"to", "text", "from"?}`,
//! `Idempotency-Key`, optional bearer token.
//!
//! | answer | classification |
//! |---|---|
//! | 2xx | accepted (the id from `{"id": ...}`; a 2xx is never retried, since the message is out) |
//! | 408, 429, 5xx, connect error, timeout | transient, with `Retry-After` seconds if given |
//! | any other 4xx (and 1xx/3xx) | rejected |
//!
//! A detail quotes the provider's answer, which often names the number
//! (`The 'To' number +254... is not valid`): every number in it is masked
//! here, before it can reach a log, an event, a header or the store.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::config::{check_header_secret, configured, ProviderSettings};
use crate::domain::{mask_numbers, SendSms};
use crate::ports::{Accepted, ProviderError, SmsService};

/// Longest provider answer read, and longest id kept.
const MAX_ANSWER_BYTES: usize = 16 * 1024;
const MAX_ID_CHARS: usize = 256;
/// A `Retry-After` beyond this is treated as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

pub struct GenericProvider {
    client: reqwest::Client,
    /// Parsed once: parsing a URL string per request showed in profiles.
    url: reqwest::Url,
    authorization: Option<HeaderValue>,
}

#[derive(Serialize)]
struct Request<'a> {
    to: &'a str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
}

#[derive(Deserialize)]
struct Answer {
    id: String,
}

impl GenericProvider {
    pub fn new(settings: &ProviderSettings) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .timeout(Duration::from_millis(settings.request_timeout_ms))
            .pool_max_idle_per_host(settings.max_idle_connections)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // A provider that redirects a POST is misconfigured, and retries
            // are this service's own business (with the lease and breaker
            // in view): both layers cost time on every request.
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .user_agent(concat!("sms-service/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("provider client: {e}"))?;
        let authorization = configured(&settings.token)
            .map(|token| {
                // The same rule as at start-up, for settings built by hand.
                check_header_secret("provider.token", token).map_err(|e| e.0)?;
                let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| "provider.token: not a valid header value".to_owned())?;
                value.set_sensitive(true);
                Ok::<_, String>(value)
            })
            .transpose()?;
        Ok(Self {
            client,
            url: reqwest::Url::parse(&format!(
                "{}/messages",
                settings.base_url.trim_end_matches('/')
            ))
            .map_err(|e| format!("provider.base_url: {e}"))?,
            authorization,
        })
    }

    async fn classify(&self, response: reqwest::Response) -> Result<Accepted, ProviderError> {
        let status = response.status();
        if status.is_success() {
            let body = read_bounded(response).await.unwrap_or_default();
            let id = match serde_json::from_slice::<Answer>(&body) {
                Ok(answer) => answer.id.chars().take(MAX_ID_CHARS).collect(),
                Err(e) => {
                    // The provider took the message; resending would
                    // duplicate it. Record it sent without an id.
                    let error = mask_numbers(&e.to_string());
                    warn!(%status, %error, "provider accepted without a usable id");
                    String::new()
                }
            };
            return Ok(Accepted {
                provider_message_id: id,
            });
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER));
        let body = read_bounded(response).await.unwrap_or_default();
        let detail = format!("HTTP {}: {}", status.as_u16(), snippet(&body));
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            Err(ProviderError::Transient {
                detail,
                retry_after,
            })
        } else {
            Err(ProviderError::Rejected { detail })
        }
    }
}

/// Reads at most [`MAX_ANSWER_BYTES`] of an answer.
async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
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

/// The start of an answer, short, on one line and with its numbers
/// masked, for a failure's detail.
fn snippet(body: &[u8]) -> String {
    let start: String = String::from_utf8_lossy(body)
        .chars()
        .take(200)
        .filter(|c| !c.is_control())
        .collect();
    mask_numbers(&start)
}

#[async_trait]
impl SmsService for GenericProvider {
    fn name(&self) -> &str {
        "generic"
    }

    async fn send(&self, sms: &SendSms) -> Result<Accepted, ProviderError> {
        let body = Request {
            to: sms.phone_number.as_str(),
            text: sms.text.as_str(),
            from: sms.sender_id.as_ref().map(|s| s.as_str()),
        };
        let mut request = self
            .client
            .post(self.url.clone())
            .header("Idempotency-Key", sms.idempotency_key.as_str())
            .json(&body);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        match request.send().await {
            Ok(response) => self.classify(response).await,
            Err(e) => Err(ProviderError::Transient {
                detail: describe(&e),
                retry_after: None,
            }),
        }
    }
}

/// A transport error without the URL's secrets.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn a_quoted_answer_has_its_numbers_masked() {
        let body = b"{\"message\": \"The 'To' number +254798765432 is not a valid phone number\",\n\"to\": \"254798765432\"}";
        let detail = snippet(body);
        assert!(!detail.contains("254798765432"), "{detail}");
        assert!(detail.contains("+********5432"), "{detail}");
        assert!(!detail.contains('\n'), "{detail}");
    }

    #[test]
    fn a_provider_built_by_hand_refuses_a_token_that_is_no_clean_header_value() {
        let mut settings = Settings::load_from(
            None,
            crate::config::environment().source(Some(Default::default())),
        )
        .unwrap()
        .provider;
        for token in ["s3cr\u{e9}t", "s3 cret", "s3cret\t"] {
            settings.token = token.to_owned().into();
            let err = GenericProvider::new(&settings).err().unwrap();
            assert!(err.contains("provider.token"), "{token:?}: {err}");
            assert!(!err.contains("s3cr"), "{token:?}: {err}");
        }
        settings.token = "s3cret".to_owned().into();
        assert!(GenericProvider::new(&settings).is_ok());
    }
}
