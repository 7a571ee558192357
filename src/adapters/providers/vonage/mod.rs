//! Vonage's SMS API (the "legacy" SMS API, not the Messages API).
//!
//! # The request
//!
//! `POST {base_url}/sms/json`, as the API reference
//! (<https://developer.vonage.com/en/api/sms>) and Vonage's own SDKs
//! (`vonage-java-sdk` `SmsClient`, `vonage-python-sdk` `vonage_sms`) send it:
//!
//! - `Authorization: Basic base64(api_key:api_secret)`. The API reference
//!   names this header as the authentication, with `api_key` in the body
//!   "only required if setting sig"; the older form, `api_key` and
//!   `api_secret` as body fields
//!   (<https://developer.vonage.com/en/getting-started/concepts/authentication>),
//!   is still accepted by Vonage and by our fake, but not sent. Request
//!   signing (`sig`) is not used: `signature_secret` checks the delivery
//!   receipts ([`callback`]).
//! - `Content-Type: application/x-www-form-urlencoded` (the reference's
//!   request body type), fields:
//!   - `from`: the command's `senderId`, else the instance's `from`; a
//!     number is sent without its `+` (E.164 digits, as for `to`);
//!   - `to`: the number's E.164 digits without `+` (the reference's pattern
//!     is `\d{7,15}`);
//!   - `text`;
//!   - `type`: `unicode` when the text needs UCS-2 (see
//!     [`crate::domain::count_segments`]), else `text`
//!     (<https://developer.vonage.com/en/messaging/sms/guides/concatenation-and-encoding>);
//!   - `client-ref`: the idempotency key (echoed in the answer and in
//!     delivery receipts). The SDKs cap it at 100 characters (the old
//!     OpenAPI file said 40; Vonage's page does not say what the server does
//!     with a longer one), so a key over 100 characters is sent as its
//!     first 35 characters, `~`, and the hex SHA-256 of the whole key:
//!     still one reference per key.
//!
//!   - `callback`: the instance's callback URL
//!     (`{http.public_url}/v1/callbacks/{name}`, plus `/{callback_token}`
//!     when set), only when `http.public_url` is set; it "overrides the
//!     webhook endpoint you set in Dashboard" for this message's delivery
//!     receipts (<https://developer.vonage.com/en/api/sms>). Without it
//!     Vonage sends them to the dashboard's URL, which must then be the
//!     same. The URL may hold the path token: it is never logged.
//!
//!   `ttl`: a command's `expiresAt`, the milliseconds left, 20,000 to
//!   604,800,000.
//!
//! Vonage does not deduplicate on `client-ref` (the reference calls it
//! "your own reference" and says nothing more): a retry after an ambiguous
//! answer may send the message twice.
//!
//! # The answer
//!
//! HTTP 200 with `{"message-count": "N", "messages": [...]}`, one entry per
//! SMS part; each entry has a `status` ("0" = queued for sending) and
//! either a `message-id` or an `error-text`
//! (<https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms>).
//! The status, not the HTTP status, decides:
//!
//! | answer | class | source |
//! |---|---|---|
//! | 200, every part's `status` "0" | accepted: id = the first part's `message-id`, parts = `message-count` (else the number of entries) | <https://developer.vonage.com/en/api/sms>, <https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms> |
//! | status "1" Throttled | transient (`Retry-After` honoured if sent) | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "2" Missing Parameters | rejected | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "3" Invalid Parameters | rejected | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "4" Invalid Credentials | account | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "5" Internal Error | transient: a non-zero status means the message was not queued; "if the error persists, contact support" | <https://developer.vonage.com/en/api-errors/sms>, <https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms> |
//! | status "6" Invalid Message ("for example, an un-recognized number prefix") | route refused: Vonage cannot route this destination, another provider may | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "7" Number Barred | rejected | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "8" Partner Account Barred | account | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "9" Partner Quota Violation (no credit) | account | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "10" Too Many Existing Binds ("back-off and retry") | transient | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "11" Account Not Enabled For HTTP | account | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "12" Message Too Long | rejected | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "14" Invalid Signature | account (we sign nothing; it is the account's set-up) | <https://developer.vonage.com/en/api-errors/sms> |
//! | status "15" Invalid Sender Address (non-authorized sender id) | route refused | <https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms> |
//! | status "22" Invalid Network Code | route refused | <https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms> |
//! | status "23" Invalid Callback URL | rejected | <https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms> |
//! | status "29" Non-Whitelisted Destination (account in demo mode) | route refused: this account cannot reach this number, another provider may | <https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms> |
//! | status "32" Signature And API Secret Disallowed | rejected | <https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms> |
//! | status "33" Number De-activated | rejected, invalid number | <https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms> |
//! | any other status (13 and 16 to 20 are "no longer used" in the Java SDK's `MessageStatus`) | rejected: not queued, and nothing says a retry helps | <https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms> |
//! | 200, some parts "0" and some not | rejected (see below) | <https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms> |
//! | 200 whose body has no readable `messages` entry | ambiguous: not documented; Vonage may have queued it | (not documented) |
//! | 401 | account ("unauthorized": wrong credentials) | <https://developer.vonage.com/en/api-errors> |
//! | 403 | account ("forbidden", "low-balance", "account-suspended") | <https://developer.vonage.com/en/api-errors> |
//! | 408, 429, 503, connect error | transient (`Retry-After` honoured) | not documented for the SMS API: [`http::classify_status`] |
//! | 500, 502, 504, any other 5xx, timeout after the request was written | ambiguous | not documented for the SMS API: [`http::classify_status`], [`http::transport_error`] |
//! | any other status (other 4xx, 1xx, 3xx) | rejected | not documented for the SMS API: [`http::classify_status`] |
//!
//! The SMS API documents only HTTP 200 answers; the non-200 rows are the
//! generic errors page of Vonage's APIs and this project's rules.
//!
//! ## When parts disagree
//!
//! A long text is one entry per part, each with its own status, and the
//! SDKs raise a "partial failure" when some parts are "0" and some are not.
//! Then part of the message is already on its way: resending it (here or at
//! another provider) would deliver those parts twice, so it is **rejected**
//! (SmsFailed `provider_rejected`), its detail saying how many parts were
//! queued and the first failing part's status. When no part is "0",
//! nothing was queued and the first part's status decides the class.
//!
//! Every detail quotes Vonage's `error-text` with numbers masked
//! ([`http::snippet`]); credentials never appear in one.
//!
//! # Delivery receipts
//!
//! Read and authenticated in [`callback`], whose module doc has the status
//! table and the signature methods.

pub mod callback;
mod send;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use tracing::warn;

use super::http::{self, ClientSettings};
use crate::config::{check_header_secret, Instance};
use crate::domain::SendSms;
use crate::ports::{
    Accepted, CallbackError, CallbackRequest, ProviderError, ProviderReport, SmsService,
};

/// One Vonage account (an `api_key` and its `api_secret`).
pub struct VonageProvider {
    name: String,
    client: reqwest::Client,
    /// `{base_url}/sms/json`, parsed once.
    url: reqwest::Url,
    api_key: SecretString,
    api_secret: SecretString,
    /// The instance's sender, `+` already stripped from a number.
    from: String,
    /// Sent with each message as `callback`; a secret, as it may end in
    /// the path token.
    callback_url: Option<SecretString>,
    /// How its delivery receipts are authenticated.
    callback_auth: callback::CallbackAuth,
}

/// The longest `callback` URL Vonage takes.
const MAX_CALLBACK_CHARS: usize = 100;

impl VonageProvider {
    /// The adapter of a `kind = "vonage"` instance: `api_key`,
    /// `api_secret` and `from` are required, `signature_secret`,
    /// `signature_method` and `callback_token` optional; an error names the
    /// missing or malformed key, never a secret's value.
    pub fn new(instance: &Instance) -> Result<Self, String> {
        let s = &instance.settings;
        let api_key = instance.secret("api_key", &s.api_key)?;
        let api_secret = instance.secret("api_secret", &s.api_secret)?;
        let from = instance.required("from", &s.from)?;
        for (key, value) in [("api_key", api_key), ("api_secret", api_secret)] {
            check_header_secret(&instance.key(key), value).map_err(|e| e.0)?;
        }
        // Basic authentication's user id cannot hold a colon (RFC 7617).
        if api_key.contains(':') {
            return Err(format!(
                "{}: must not contain ':' (it is the user of HTTP Basic authentication)",
                instance.key("api_key")
            ));
        }
        let client = http::client(ClientSettings {
            connect_timeout: instance.connect_timeout,
            request_timeout: instance.request_timeout,
            max_idle_connections: instance.max_idle_connections,
            http2: http::Http2::for_base_url(instance.http2, &instance.base_url),
        })?;
        let url = format!("{}/sms/json", instance.base_url.trim_end_matches('/'));
        let method = match s.signature_method.as_deref().map(str::trim) {
            None | Some("") => callback::SignatureMethod::default(),
            Some(name) => callback::SignatureMethod::parse(name).ok_or_else(|| {
                let names: Vec<&str> = callback::SignatureMethod::ALL
                    .iter()
                    .map(|m| m.as_str())
                    .collect();
                format!(
                    "{}: must be one of {} (the dashboard's signature method)",
                    instance.key("signature_method"),
                    names.join(", ")
                )
            })?,
        };
        let configured = |secret: &Option<SecretString>| {
            secret
                .clone()
                .filter(|s| !s.expose_secret().trim().is_empty())
        };
        // `callback` is at most 100 characters (vonage-python-sdk's
        // sms/requests.py checks the same): a longer one would refuse
        // every message, so it is a start-up error.
        if let Some(url) = instance.callback_url.as_deref() {
            if url.len() > MAX_CALLBACK_CHARS {
                return Err(format!(
                    "{}: its callback URL (http.public_url + /v1/callbacks/{}, plus the \
                     callback_token) is {} characters; Vonage takes at most {MAX_CALLBACK_CHARS}: \
                     shorten http.public_url or the token",
                    instance.key("callback_token"),
                    instance.name,
                    url.len()
                ));
            }
        }
        let callback_auth = callback::CallbackAuth {
            signing: configured(&s.signature_secret).map(|secret| (secret, method)),
            token: configured(&s.callback_token),
        };
        Ok(Self {
            name: instance.name.clone(),
            client,
            url: reqwest::Url::parse(&url)
                .map_err(|e| format!("{}: {e}", instance.key("base_url")))?,
            api_key: api_key.to_owned().into(),
            api_secret: api_secret.to_owned().into(),
            from: send::address(from.trim()).to_owned(),
            callback_url: instance.callback_url.clone().map(SecretString::from),
            callback_auth,
        })
    }
}

#[async_trait]
impl SmsService for VonageProvider {
    fn name(&self) -> &str {
        &self.name
    }

    /// Delivery receipts: see [`callback`].
    fn read_callback(
        &self,
        request: &CallbackRequest<'_>,
    ) -> Result<Vec<ProviderReport>, CallbackError> {
        callback::read(&self.callback_auth, request)
    }

    async fn send(&self, sms: &SendSms) -> Result<Accepted, ProviderError> {
        let response = self
            .client
            .post(self.url.clone())
            .basic_auth(
                self.api_key.expose_secret(),
                Some(self.api_secret.expose_secret()),
            )
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(send::form(
                sms,
                &self.from,
                self.callback_url.as_ref().map(|url| url.expose_secret()),
            ))
            .headers(http::trace_headers())
            .send()
            .await
            .map_err(|e| http::transport_error(&e))?;
        let status = response.status();
        let retry_after = http::retry_after(&response);
        // An answer cut off while reading is classified as an empty one:
        // a 200 without its parts is ambiguous.
        let body = http::read_bounded(response).await.unwrap_or_default();
        let accepted = send::classify(status, &body, retry_after)?;
        if accepted.provider_message_id.is_empty() {
            warn!(provider = %self.name, "Vonage queued a message without a message-id");
        }
        Ok(accepted)
    }
}
