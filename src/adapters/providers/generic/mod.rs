//! The generic HTTP provider (reference section 6): `POST {base_url}/messages`
//! with `{"to", "text", "from"?}`, `Idempotency-Key`, optional bearer token.
//! A provider that honours `Idempotency-Key` makes every retry safe.
//!
//! | answer | class |
//! |---|---|
//! | 2xx | accepted (the id from `{"id": ...}`; a 2xx is never retried, since the message is out) |
//! | 408, 429, 503, connect error | transient: not sent (`Retry-After` seconds honoured) |
//! | 500, 502, 504 and other 5xx, timeout after the request was written | ambiguous: it may have been sent; retried here only |
//! | any other 4xx (and 1xx/3xx) | rejected |
//!
//! A detail quotes the provider's answer, which often names the number
//! (`The 'To' number +254... is not valid`): every number in it is masked
//! (see [`super::http::snippet`]) before it can reach a log, an event, a
//! header or the store.

pub mod callback;

use async_trait::async_trait;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::http::{self, ClientSettings};
use crate::config::{check_header_secret, Instance};
use crate::domain::{mask_numbers, SendSms};
use crate::ports::{
    Accepted, CallbackError, CallbackRequest, ProviderError, ProviderReport, SmsService,
};

pub struct GenericProvider {
    name: String,
    client: reqwest::Client,
    /// Parsed once: parsing a URL string per request showed in profiles.
    url: reqwest::Url,
    authorization: Option<HeaderValue>,
    /// Signs its delivery reports; without one it takes none at
    /// `/v1/callbacks/{name}` (part 1's unsigned route stays).
    callback_secret: Option<secrecy::SecretString>,
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
    pub fn new(instance: &Instance) -> Result<Self, String> {
        let client = http::client(ClientSettings {
            connect_timeout: instance.connect_timeout,
            request_timeout: instance.request_timeout,
            max_idle_connections: instance.max_idle_connections,
            http2: http::Http2::for_base_url(instance.http2, &instance.base_url),
        })?;
        let token = instance
            .settings
            .token
            .as_ref()
            .map(secrecy::ExposeSecret::expose_secret)
            .filter(|t| !t.is_empty());
        let authorization = token
            .map(|token| {
                // The same rule as at start-up, for settings built by hand.
                let key = instance.key("token");
                check_header_secret(&key, token).map_err(|e| e.0)?;
                let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| format!("{key}: not a valid header value"))?;
                value.set_sensitive(true);
                Ok::<_, String>(value)
            })
            .transpose()?;
        let url = format!("{}/messages", instance.base_url.trim_end_matches('/'));
        Ok(Self {
            name: instance.name.clone(),
            client,
            url: reqwest::Url::parse(&url)
                .map_err(|e| format!("{}: {e}", instance.key("base_url")))?,
            authorization,
            callback_secret: instance
                .settings
                .callback_secret
                .clone()
                .filter(|s| !secrecy::ExposeSecret::expose_secret(s).is_empty()),
        })
    }

    async fn classify(&self, response: reqwest::Response) -> Result<Accepted, ProviderError> {
        let status = response.status();
        if status.is_success() {
            let body = http::read_bounded(response).await.unwrap_or_default();
            let id = match serde_json::from_slice::<Answer>(&body) {
                Ok(answer) => http::bounded_id(&answer.id),
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
                segments: None,
                other_part_ids: Vec::new(),
            });
        }
        let retry_after = http::retry_after(&response);
        let body = http::read_bounded(response).await.unwrap_or_default();
        let detail = format!("HTTP {}: {}", status.as_u16(), http::snippet(&body));
        Err(http::classify_status(status, detail, retry_after))
    }
}

#[async_trait]
impl SmsService for GenericProvider {
    fn name(&self) -> &str {
        &self.name
    }

    /// Signed reports only: see [`callback`].
    fn read_callback(
        &self,
        request: &CallbackRequest<'_>,
    ) -> Result<Vec<ProviderReport>, CallbackError> {
        if request.token.is_some() {
            return Err(CallbackError::NotHere(
                "generic reports are signed, not sent to a token path".into(),
            ));
        }
        if self.callback_secret.is_none() {
            return Err(CallbackError::NotHere(format!(
                "providers.{}.callback_secret is not set: reports go to POST /v1/delivery-reports",
                self.name
            )));
        }
        callback::read(self.callback_secret.as_ref(), request)
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
            .headers(http::trace_headers())
            .json(&body);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        match request.send().await {
            Ok(response) => self.classify(response).await,
            Err(e) => Err(http::transport_error(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn a_provider_built_by_hand_refuses_a_token_that_is_no_clean_header_value() {
        let settings = Settings::load_from(
            None,
            crate::config::environment().source(Some(Default::default())),
        )
        .unwrap();
        let mut instance = settings.instances().unwrap().0.remove(0);
        for token in ["s3cr\u{e9}t", "s3 cret", "s3cret\t"] {
            instance.settings.token = Some(token.to_owned().into());
            let err = GenericProvider::new(&instance).err().unwrap();
            assert!(err.contains("providers.generic.token"), "{token:?}: {err}");
            assert!(!err.contains("s3cr"), "{token:?}: {err}");
        }
        instance.settings.token = Some("s3cret".to_owned().into());
        assert!(GenericProvider::new(&instance).is_ok());
    }
}
