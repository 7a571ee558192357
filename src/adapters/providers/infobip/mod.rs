//! Infobip SMS, API v3: `POST {base_url}/sms/3/messages` ([Send SMS
//! message][send]), JSON both ways (`Accept: application/json`: the API
//! also speaks XML), `Authorization: App <api_key>` (the API-key scheme of
//! [API authentication][auth]). `base_url` is the account's own host
//! ([base URL][base]; `https://api.infobip.com` by default).
//!
//! One message, one destination:
//!
//! ```json
//! {"messages": [{"sender": "<senderId, else from>",
//!                "destinations": [{"to": "254712345678", "messageId": "<idempotency key>"}],
//!                "content": {"text": "..."}}],
//!  "options": {"includeSmsCountInResponse": true}}
//! ```
//!
//! - `to` is the E.164 number without its `+`: the documented form is
//!   "international format (Example: `41793026727`)" and "plus prefixes +
//!   are not required" ([deliverability][format]).
//! - `messageId` is the idempotency key, as it is. Infobip documents it as
//!   a string of 0 to 200 characters ([Send SMS message][send]; the
//!   OpenAPI schema `SmsToDestination`) and no character set; a key is 1
//!   to 128 printable ASCII characters, so every key fits and none is
//!   hashed or cut (a compile-time check keeps it so). Infobip keeps the id
//!   as the message's id: its answer, delivery reports and logs carry it,
//!   so the recorded provider message id is the key.
//! - `includeSmsCountInResponse` makes the answer carry
//!   `details.messageCount`, the parts Infobip counted (`Accepted.segments`).
//! - `webhooks`: with `http.public_url` and a `callback_token` set, the
//!   instance's callback URL (`{public_url}/v1/callbacks/{name}/{token}`)
//!   as `delivery.url`, and `contentType: application/json` (the OpenAPI
//!   schemas `SmsWebhooks`, `SmsMessageDeliveryReporting`; the official
//!   SDKs' "specify your endpoint when sending SMS in the
//!   `webhooks.delivery.url` field"). Without a token no URL is named: a
//!   report to a URL without one would be refused, and Infobip would
//!   retry it for nothing; the account's own report subscription applies.
//!   No `intermediateReport`: the final report is what the service needs.
//!   The reports: [`callback`].
//! - A command's `expiresAt` goes as `options.validityPeriod` (the
//!   seconds left, at most 48 h).
//!
//! **Deduplication.** Infobip does not document that a resend with the same
//! `messageId` is answered like the first. Its status code
//! `REJECTED_DUPLICATE_MESSAGE_ID` (23) rejects "a duplicate message ID
//! specified in the submit request, while message ID-s should be a unique
//! value" ([status codes][codes]); its idempotent sending has to be enabled
//! for the account, and works within a grace period. The docs do not say
//! whether the earlier message was sent (a message Infobip rejected keeps
//! its id too). So a duplicate is classified **rejected**: it never fails
//! over (Infobip saw the key, so it may be out), and ends in SmsFailed
//! (`provider_rejected`, the detail saying an earlier attempt may have
//! been sent). Without deduplication enabled, a retry after an ambiguous
//! answer may send twice.
//!
//! # Classification
//!
//! A 2xx is read for `messages[0].status`: its `groupName` (else its
//! `groupId`) decides, and within `REJECTED` its `id` (ids are stable; some
//! names changed between versions of the page, noted as `old / new`).
//!
//! | answer | class | source |
//! |---|---|---|
//! | 2xx, group `PENDING` (1: ids 3, 7, 26), `ACCEPTED` (0) or `DELIVERED` (3) | accepted: `messageId` (else the one sent), `details.messageCount` | [send], [codes] `#pending-general-status-codes` |
//! | 2xx without a readable `messages[0].status` (malformed, empty) | accepted with the `messageId` sent: Infobip took the request, and a resend could only be refused as a duplicate | [send] (the 200 answer always carries `messages`) |
//! | 2xx, `REJECTED` 12 `REJECTED_NOT_ENOUGH_CREDITS`, 17 `REJECTED_PREPAID_PACKAGE_EXPIRED` | account | [codes] `#rejected-general-status-codes` |
//! | 2xx, `REJECTED` 6 `REJECTED_NETWORK` (network not covered or not set up on the account), 11 `REJECTED_SOURCE` (sender not registered), 13 `REJECTED_SENDER` (sender blacklisted), 18 `REJECTED_DESTINATION_NOT_REGISTERED` (test account: one number only), 19 `REJECTED_ROUTE_NOT_AVAILABLE` (no route on the account) | route refused | [codes] `#rejected-general-status-codes` |
//! | 2xx, `REJECTED` 23 `REJECTED_DUPLICATE_MESSAGE_ID` | rejected, never failed over (see Deduplication) | [codes] `#rejected-general-status-codes` |
//! | 2xx, `REJECTED` 20 `REJECTED_FLOODING_FILTER` (per-number hourly limit), 21 `REJECTED_SYSTEM_ERROR` ("please retry submission") | transient | [codes] `#rejected-general-status-codes` |
//! | 2xx, `REJECTED` 8 `REJECTED_PREFIX_MISSING`, 52 `REJECTED_INVALID_DESTINATION / REJECTED_DESTINATION` (number prefix or length not valid) | rejected, invalid number | [codes] `#rejected-general-status-codes` |
//! | 2xx, `REJECTED` 10 `REJECTED_DND`, 14 `REJECTED_DESTINATION / REJECTED_DESTINATION_BLOCKLISTED`, 24 `REJECTED_INVALID_UDH`, 25 `REJECTED_MESSAGE_TOO_LONG`, 51 `MISSING_TO`, any other `REJECTED` id | rejected | [codes] `#rejected-general-status-codes` |
//! | 2xx, group `UNDELIVERABLE` (2) or `EXPIRED` (4) | rejected: Infobip says it will not be delivered | [codes] `#undeliverable-general-status-codes`, `#expired-general-status-codes` |
//! | 2xx, any other group | ambiguous: not documented; retried here only, where a resend is refused as a duplicate | none (conservative) |
//! | 400 `E400` (`violations` say which property) | rejected | [send], [errors] ("sending the exact same request again will result in the same error") |
//! | 401 `E401`, 403 `E403` (key lacks the `sms:message:send` scope) | account | [send] |
//! | 404 | account: the endpoint does not exist, so `base_url` is wrong for every message | [errors] |
//! | 429 `E429` | transient (`Retry-After` seconds honoured if sent; Infobip does not document one) | [throttling] |
//! | 500 `E500` | ambiguous | [send] |
//! | any other 5xx (502, 503, 504, ...) | ambiguous: not documented for this endpoint | [errors] ("an error occurred on the API side") |
//! | any other 4xx, 1xx, 3xx (redirects are not followed) | rejected: not documented | none (conservative) |
//! | connect error / timeout after the request was written | transient / ambiguous | [`super::http::transport_error`] |
//!
//! What the docs do not say, and what is done: whether Infobip sends
//! `Retry-After` with a 429 (honoured if present); which `violations`
//! mean a bad number in a 400 (none is read as one: `provider_rejected`);
//! whether a `REJECTED` status other than 23 uses up the `messageId` (see
//! Deduplication); 5xx other than 500 (ambiguous).
//!
//! Every detail quotes Infobip's answer with phone numbers masked
//! ([`super::http::snippet`]); the API key is never in a detail or a log.
//!
//! Delivery reports come back to `/v1/callbacks/{name}/{token}`,
//! authenticated by the path token, read and mapped as [`callback`] says.
//!
//! [send]: https://www.infobip.com/docs/api/channels/sms/sms-messaging/outbound-sms/send-sms-messages
//! [codes]: https://www.infobip.com/docs/essentials/response-status-and-error-codes
//! [errors]: https://www.infobip.com/docs/developer-resources/errors-and-responses/schema-reference-and-error-handling
//! [throttling]: https://www.infobip.com/docs/developer-resources/errors-and-responses/rate-limits-and-throttling
//! [auth]: https://www.infobip.com/docs/essentials/api-authentication
//! [base]: https://www.infobip.com/docs/essentials/base-url
//! [format]: https://www.infobip.com/docs/sms/deliverability

mod callback;
mod send;
mod status;

use async_trait::async_trait;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION};

use secrecy::{ExposeSecret, SecretString};

use super::http::{self, ClientSettings};
use crate::config::{check_header_secret, Instance};
use crate::domain::{SendSms, SenderId};
use crate::ports::{
    Accepted, CallbackError, CallbackRequest, ProviderError, ProviderReport, SmsService,
};

/// The API path the adapter appends to `base_url`, as Infobip's SDKs do.
pub const SEND_PATH: &str = "/sms/3/messages";

pub struct InfobipProvider {
    name: String,
    client: reqwest::Client,
    /// Parsed once, as the generic adapter does.
    url: reqwest::Url,
    /// `App <api_key>`, marked sensitive so it is never printed.
    authorization: HeaderValue,
    /// The sender when a command has no `senderId`.
    from: String,
    /// The path token of its delivery reports; without one it takes none.
    callback_token: Option<SecretString>,
    /// Named in every request as the delivery webhook: the instance's
    /// callback URL, only when it carries the token. A secret (it holds
    /// the token): never logged.
    callback_url: Option<SecretString>,
}

impl InfobipProvider {
    /// Builds the adapter of one `kind = "infobip"` instance: `api_key`
    /// (secret) and `from` are required.
    pub fn new(instance: &Instance) -> Result<Self, String> {
        let api_key = instance.secret("api_key", &instance.settings.api_key)?;
        let key = instance.key("api_key");
        check_header_secret(&key, api_key).map_err(|e| e.0)?;
        let mut authorization = HeaderValue::from_str(&format!("App {api_key}"))
            .map_err(|_| format!("{key}: not a valid header value"))?;
        authorization.set_sensitive(true);
        let from = instance.required("from", &instance.settings.from)?;
        SenderId::parse(from).map_err(|_| {
            format!(
                "{}: must be 1 to 15 printable ASCII characters (Infobip's sender)",
                instance.key("from")
            )
        })?;
        let client = http::client(ClientSettings {
            connect_timeout: instance.connect_timeout,
            request_timeout: instance.request_timeout,
            max_idle_connections: instance.max_idle_connections,
            http2: http::Http2::for_base_url(instance.http2, &instance.base_url),
        })?;
        let url = format!("{}{SEND_PATH}", instance.base_url.trim_end_matches('/'));
        let callback_token = instance
            .settings
            .callback_token
            .clone()
            .filter(|t| !t.expose_secret().is_empty());
        Ok(Self {
            name: instance.name.clone(),
            client,
            url: reqwest::Url::parse(&url)
                .map_err(|e| format!("{}: {e}", instance.key("base_url")))?,
            authorization,
            from: from.to_owned(),
            callback_url: instance
                .callback_url
                .clone()
                .filter(|_| callback_token.is_some())
                .map(SecretString::from),
            callback_token,
        })
    }
}

#[async_trait]
impl SmsService for InfobipProvider {
    fn name(&self) -> &str {
        &self.name
    }

    /// Reports authenticated by their path token: see [`callback`].
    fn read_callback(
        &self,
        request: &CallbackRequest<'_>,
    ) -> Result<Vec<ProviderReport>, CallbackError> {
        callback::read(self.callback_token.as_ref(), request)
    }

    async fn send(&self, sms: &SendSms) -> Result<Accepted, ProviderError> {
        let callback_url = self.callback_url.as_ref().map(|u| u.expose_secret());
        let body = send::request(sms, &self.from, callback_url);
        let response = self
            .client
            .post(self.url.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header(ACCEPT, "application/json")
            .headers(http::trace_headers())
            .json(&body)
            .send()
            .await
            .map_err(|e| http::transport_error(&e))?;
        let status = response.status();
        let retry_after = http::retry_after(&response);
        // A 2xx whose body breaks off is still an acceptance (see the
        // table): an empty body reads as one without a status.
        let answer = http::read_bounded(response).await.unwrap_or_default();
        send::classify(status, retry_after, &answer, sms.idempotency_key.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    /// Loads settings from `env` (which builds every instance's adapter,
    /// as start-up does), then builds the first instance's adapter.
    fn build(env: &[(&str, &str)]) -> Result<(Instance, InfobipProvider), String> {
        let map = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let settings = Settings::load_from(None, crate::config::environment().source(Some(map)))
            .map_err(|e| e.to_string())?;
        let instance = settings.instances().map_err(|e| e.0)?.0.remove(0);
        let provider = InfobipProvider::new(&instance)?;
        Ok((instance, provider))
    }

    fn error(env: &[(&str, &str)]) -> String {
        build(env).err().expect("the settings are refused")
    }

    #[test]
    fn a_missing_api_key_or_sender_stops_the_settings_naming_the_key() {
        let err = error(&[
            ("SMS__PROVIDERS__IB__KIND", "infobip"),
            ("SMS__PROVIDERS__IB__FROM", "MKOPA"),
        ]);
        assert!(err.contains("providers.ib.api_key"), "{err}");
        assert!(err.contains("SMS__PROVIDERS__IB__API_KEY"), "{err}");

        let err = error(&[
            ("SMS__PROVIDERS__IB__KIND", "infobip"),
            ("SMS__PROVIDERS__IB__API_KEY", "s3cret-key"),
        ]);
        assert!(err.contains("providers.ib.from"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn a_malformed_api_key_or_sender_is_refused_without_showing_the_key() {
        let good = [
            ("SMS__PROVIDERS__IB__KIND", "infobip"),
            ("SMS__PROVIDERS__IB__API_KEY", "s3cret"),
            ("SMS__PROVIDERS__IB__FROM", "MKOPA"),
        ];
        let (mut instance, provider) = build(&good).unwrap();
        assert_eq!(provider.name(), "ib");
        assert_eq!(
            provider.url.as_str(),
            "https://api.infobip.com/sms/3/messages"
        );
        for key in ["s3cr\u{e9}t", "s3 cret", "s3cret\n"] {
            let mut env = good;
            env[1].1 = key;
            let err = error(&env);
            assert!(err.contains("providers.ib.api_key"), "{key:?}: {err}");
            assert!(!err.contains("s3cr"), "{key:?}: {err}");
            // The same rule for settings built by hand.
            instance.settings.api_key = Some(key.to_owned().into());
            let err = InfobipProvider::new(&instance).err().unwrap();
            assert!(err.contains("providers.ib.api_key"), "{key:?}: {err}");
            assert!(!err.contains("s3cr"), "{key:?}: {err}");
        }
        let mut env = good;
        env[2].1 = "A-SENDER-OF-20-CHARS";
        let err = error(&env);
        assert!(err.contains("providers.ib.from"), "{err}");
    }

    #[test]
    fn the_delivery_webhook_is_named_only_with_a_public_url_and_a_callback_token() {
        let url = |env: &[(&str, &str)]| {
            let mut all = vec![
                ("SMS__PROVIDERS__IB__KIND", "infobip"),
                ("SMS__PROVIDERS__IB__API_KEY", "s3cret"),
                ("SMS__PROVIDERS__IB__FROM", "MKOPA"),
            ];
            all.extend_from_slice(env);
            let (_, provider) = build(&all).unwrap();
            provider.callback_url.map(|u| u.expose_secret().to_owned())
        };
        let token = (
            "SMS__PROVIDERS__IB__CALLBACK_TOKEN",
            "cb-token-0123456789abcdef",
        );
        let public = ("SMS__HTTP__PUBLIC_URL", "https://sms.example.com");
        assert_eq!(
            url(&[token, public]).as_deref(),
            Some("https://sms.example.com/v1/callbacks/ib/cb-token-0123456789abcdef")
        );
        assert_eq!(
            url(&[token]),
            None,
            "no public URL: Infobip could not call back"
        );
        assert_eq!(
            url(&[public]),
            None,
            "no token: its reports would be refused"
        );
        assert_eq!(url(&[]), None);
    }
}
