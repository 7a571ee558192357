//! Africa's Talking (`kind = "africastalking"`): its SMS API at
//! `{base_url}/version1/messaging`, form-encoded, authenticated by the
//! `apiKey` header and the account's `username`. What is sent and how each
//! answer is classified (the table, each row citing its page) is in
//! [`send`].
//!
//! Its delivery reports, authenticated by the path token
//! `/v1/callbacks/{instance}/{callback_token}` and mapped onto the
//! normalized statuses (the table, citing its pages), are read in
//! [`callback`].
//!
//! Settings (`[providers.<name>]`): `username`, `api_key` (secret), `from`
//! (optional: the sender when a command has no `senderId`; without either
//! the account's default sender is used) and `callback_token` (secret: the
//! path token of its delivery reports; without it the instance takes
//! none). `base_url` defaults to
//! `https://api.africastalking.com`; the sandbox is
//! `https://api.sandbox.africastalking.com` with `username = "sandbox"`
//! (<https://developers.africastalking.com/docs/sms/sending/bulk>,
//! "Endpoints").
//!
//! Africa's Talking takes no idempotency key or client reference when
//! sending, so it cannot deduplicate a retry: see [`send`].

mod callback;
mod send;

use async_trait::async_trait;
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};

use super::http::{self, ClientSettings};
use crate::config::{check_header_secret, Instance};
use crate::domain::{SendSms, SenderId};
use crate::ports::{
    Accepted, CallbackError, CallbackRequest, ProviderError, ProviderReport, SmsService,
};

/// One Africa's Talking account (an instance).
pub struct AfricasTalkingProvider {
    name: String,
    client: reqwest::Client,
    /// Parsed once: `{base_url}/version1/messaging`.
    url: reqwest::Url,
    username: String,
    /// The `apiKey` header, marked sensitive so no debug output shows it.
    api_key: HeaderValue,
    /// The sender when the command names none.
    from: Option<SenderId>,
    /// The path token of its delivery reports; without one it takes none.
    callback_token: Option<secrecy::SecretString>,
}

impl AfricasTalkingProvider {
    /// The adapter of one configured instance; a missing or malformed
    /// setting is an error naming its key (never a secret's value).
    pub fn new(instance: &Instance) -> Result<Self, String> {
        let settings = &instance.settings;
        let username = instance
            .required("username", &settings.username)?
            .trim()
            .to_owned();
        let api_key = instance.secret("api_key", &settings.api_key)?;
        let key = instance.key("api_key");
        check_header_secret(&key, api_key).map_err(|e| e.0)?;
        let mut api_key = HeaderValue::from_str(api_key)
            .map_err(|_| format!("{key}: not a valid header value"))?;
        api_key.set_sensitive(true);
        let from = settings
            .from
            .as_deref()
            .filter(|f| !f.is_empty())
            .map(|f| SenderId::parse(f).map_err(|e| format!("{}: {e}", instance.key("from"))))
            .transpose()?;
        let url = format!("{}{}", instance.base_url.trim_end_matches('/'), send::PATH);
        let url =
            reqwest::Url::parse(&url).map_err(|e| format!("{}: {e}", instance.key("base_url")))?;
        let client = http::client(ClientSettings {
            connect_timeout: instance.connect_timeout,
            request_timeout: instance.request_timeout,
            max_idle_connections: instance.max_idle_connections,
            http2: http::Http2::for_base_url(instance.http2, &instance.base_url),
        })?;
        Ok(Self {
            name: instance.name.clone(),
            client,
            url,
            username,
            api_key,
            from,
            callback_token: settings.callback_token.clone(),
        })
    }
}

#[async_trait]
impl SmsService for AfricasTalkingProvider {
    fn name(&self) -> &str {
        &self.name
    }

    /// Token-authenticated reports only: see [`callback`].
    fn read_callback(
        &self,
        request: &CallbackRequest<'_>,
    ) -> Result<Vec<ProviderReport>, CallbackError> {
        callback::read(self.callback_token.as_ref(), request)
    }

    async fn send(&self, sms: &SendSms) -> Result<Accepted, ProviderError> {
        let from = sms.sender_id.as_ref().or(self.from.as_ref());
        let body = send::form(
            &self.username,
            sms.phone_number.as_str(),
            sms.text.as_str(),
            from.map(SenderId::as_str),
        );
        let request = self
            .client
            .post(self.url.clone())
            .header("apiKey", self.api_key.clone())
            .header(ACCEPT, "application/json")
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .headers(http::trace_headers())
            .body(body);
        let response = request
            .send()
            .await
            .map_err(|e| http::transport_error(&e))?;
        let status = response.status();
        let retry_after = http::retry_after(&response);
        // The recipient's status is in the body: an answer cut short may
        // have followed a send, so it is ambiguous (not a connect error).
        let body = http::read_bounded(response)
            .await
            .map_err(|e| http::transport_error(&e))?;
        send::classify(status, retry_after, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    /// Loads settings from `env` (start-up builds every instance's adapter,
    /// so a bad setting fails here) and builds the first instance's adapter.
    fn build(env: &[(&str, &str)]) -> Result<AfricasTalkingProvider, String> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let settings = Settings::load_from(None, crate::config::environment().source(Some(env)))
            .map_err(|e| e.to_string())?;
        AfricasTalkingProvider::new(&settings.instances().map_err(|e| e.0)?.0[0])
    }

    const KIND: (&str, &str) = ("SMS__PROVIDERS__AT__KIND", "africastalking");
    const USERNAME: (&str, &str) = ("SMS__PROVIDERS__AT__USERNAME", "mkopa");
    const KEY: (&str, &str) = ("SMS__PROVIDERS__AT__API_KEY", "atsk_s3cret");

    #[test]
    fn a_missing_username_or_api_key_is_named_by_its_key() {
        let err = build(&[KIND, KEY]).err().unwrap();
        assert!(err.contains("providers.at.username"), "{err}");
        let err = build(&[KIND, USERNAME]).err().unwrap();
        assert!(err.contains("providers.at.api_key"), "{err}");
        assert!(err.contains("SMS__PROVIDERS__AT__API_KEY"), "{err}");
        assert!(build(&[KIND, USERNAME, KEY]).is_ok());
    }

    #[test]
    fn a_malformed_api_key_is_refused_without_showing_it() {
        let settings = Settings::load_from(
            None,
            crate::config::environment().source(Some(
                [KIND, USERNAME, KEY]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )),
        )
        .unwrap();
        let mut instance = settings.instances().unwrap().0.remove(0);
        for key in ["s3cr\u{e9}t-key", "s3cret key", "s3cret\tkey"] {
            // Through the environment (checked at start-up) ...
            let err = build(&[KIND, USERNAME, ("SMS__PROVIDERS__AT__API_KEY", key)])
                .err()
                .unwrap();
            assert!(err.contains("providers.at.api_key"), "{key:?}: {err}");
            assert!(!err.contains("s3cr"), "{key:?}: {err}");
            // ... and in settings built by hand.
            instance.settings.api_key = Some(key.to_owned().into());
            let err = AfricasTalkingProvider::new(&instance).err().unwrap();
            assert!(err.contains("providers.at.api_key"), "{key:?}: {err}");
            assert!(!err.contains("s3cr"), "{key:?}: {err}");
        }
    }

    #[test]
    fn a_sender_that_is_no_valid_sender_id_is_named_by_its_key() {
        let err = build(&[
            KIND,
            USERNAME,
            KEY,
            ("SMS__PROVIDERS__AT__FROM", "A-SENDER-FAR-TOO-LONG"),
        ])
        .err()
        .unwrap();
        assert!(err.contains("providers.at.from"), "{err}");
        assert!(build(&[KIND, USERNAME, KEY, ("SMS__PROVIDERS__AT__FROM", "MKOPA")]).is_ok());
    }

    #[test]
    fn delivery_reports_are_read_with_the_configured_callback_token_only() {
        let token = "at-callback-token-0123456789";
        let form = b"id=ATXid_1&status=Success&phoneNumber=%2B254711222333&networkCode=63902";
        let request = |given: Option<&'static str>| CallbackRequest {
            method: "POST",
            url: "https://sms.example.com/v1/callbacks/at/x",
            token: given,
            query: "",
            headers: &[],
            body: form,
            now: std::time::SystemTime::now(),
        };
        let with = build(&[
            KIND,
            USERNAME,
            KEY,
            ("SMS__PROVIDERS__AT__CALLBACK_TOKEN", token),
        ])
        .unwrap();
        let reports = with.read_callback(&request(Some(token))).unwrap();
        assert_eq!(reports[0].provider_message_id, "ATXid_1");
        assert_eq!(
            with.read_callback(&request(Some("at-callback-token-0123456788"))),
            Err(CallbackError::WrongToken)
        );
        let without = build(&[KIND, USERNAME, KEY]).unwrap();
        assert!(matches!(
            without.read_callback(&request(Some(token))),
            Err(CallbackError::NotHere(_))
        ));
    }

    #[test]
    fn the_api_path_is_appended_to_the_base_url() {
        for base in [
            "https://api.sandbox.africastalking.com",
            "https://api.sandbox.africastalking.com/",
        ] {
            let provider =
                build(&[KIND, USERNAME, KEY, ("SMS__PROVIDERS__AT__BASE_URL", base)]).unwrap();
            assert_eq!(
                provider.url.as_str(),
                "https://api.sandbox.africastalking.com/version1/messaging"
            );
        }
        let provider = build(&[KIND, USERNAME, KEY]).unwrap();
        assert_eq!(
            provider.url.as_str(),
            "https://api.africastalking.com/version1/messaging"
        );
        assert_eq!(provider.name(), "at");
    }
}
