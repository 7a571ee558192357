//! Twilio Programmable Messaging: one message per
//! `POST {base_url}/2010-04-01/Accounts/{account_sid}/Messages.json`,
//! form-encoded, HTTP Basic authentication with the Account SID and Auth
//! Token, as Twilio's own libraries send it (`base_url` is
//! `https://api.twilio.com` unless set).
//!
//! Settings (`[providers.<name>]` with `kind = "twilio"`): `account_sid`
//! (`AC` and 32 hex digits), `auth_token` (a secret), and `from` (a Twilio
//! number, short code or alphanumeric sender id) or `messaging_service_sid`
//! (`MG` and 32 hex digits), or both (Twilio then sends from that sender of
//! the service's pool). A command's `senderId` is sent as `From` in place of
//! `from`.
//!
//! What is sent and how every answer is classified: `send.rs`. Twilio takes
//! no idempotency key and does not deduplicate: a request retried after an
//! ambiguous answer (a timeout, a 5xx) may send the message twice; the core
//! retries such a command at Twilio only, never at another provider.
//!
//! Delivery reports: with `http.public_url` set, each message is sent with
//! `StatusCallback` = the instance's callback URL
//! (`{http.public_url}/v1/callbacks/{name}`), and Twilio posts its status
//! changes there, signed with the Auth Token (`X-Twilio-Signature`); how
//! they are authenticated and what each status becomes: `callback.rs`.
//! Without `http.public_url` no `StatusCallback` is sent. A command's
//! `expiresAt` goes as `ValidityPeriod` (the seconds left, 1 to 36,000).

pub mod callback;
mod send;

use async_trait::async_trait;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use secrecy::SecretString;

use super::http::{self, ClientSettings};
use crate::config::{check_header_secret, Instance};
use crate::domain::SendSms;
use crate::ports::{
    Accepted, CallbackError, CallbackRequest, ProviderError, ProviderReport, SmsService,
};

const FORM: &str = "application/x-www-form-urlencoded";

pub struct TwilioProvider {
    name: String,
    client: reqwest::Client,
    /// Parsed once, with the Account SID in its path.
    url: reqwest::Url,
    /// `Basic base64(account_sid:auth_token)`, marked sensitive so that it
    /// never shows in a debug print.
    authorization: HeaderValue,
    /// The default sender; a command's `senderId` replaces it.
    from: Option<String>,
    messaging_service_sid: Option<String>,
    /// Keys the signatures of Twilio's status callbacks.
    auth_token: SecretString,
    /// `StatusCallback` of every message: the instance's callback URL, when
    /// `http.public_url` is set. Never logged.
    status_callback: Option<String>,
}

/// `prefix` and 32 hex digits: the form of a Twilio SID
/// (`^AC[0-9a-fA-F]{32}$` in Twilio's API description).
pub(crate) fn is_sid(prefix: &str, value: &str) -> bool {
    value.len() == 34
        && value.starts_with(prefix)
        && value[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

impl TwilioProvider {
    /// Checks the instance's credentials and sender; an error names the key
    /// (never a secret's value).
    pub fn new(instance: &Instance) -> Result<Self, String> {
        let s = &instance.settings;
        let account_sid = instance.required("account_sid", &s.account_sid)?.trim();
        if !is_sid("AC", account_sid) {
            return Err(format!(
                "{}: not a Twilio Account SID (AC and 32 hex digits, from the Twilio Console)",
                instance.key("account_sid")
            ));
        }
        let auth_token = instance.secret("auth_token", &s.auth_token)?;
        check_header_secret(&instance.key("auth_token"), auth_token).map_err(|e| e.0)?;
        let optional = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let from = optional(&s.from);
        let messaging_service_sid = optional(&s.messaging_service_sid);
        if let Some(sid) = &messaging_service_sid {
            if !is_sid("MG", sid) {
                return Err(format!(
                    "{}: not a Messaging Service SID (MG and 32 hex digits)",
                    instance.key("messaging_service_sid")
                ));
            }
        }
        if from.is_none() && messaging_service_sid.is_none() {
            return Err(format!(
                "{}: required for kind twilio unless {} is set",
                instance.key("from"),
                instance.key("messaging_service_sid")
            ));
        }
        let client = http::client(ClientSettings {
            connect_timeout: instance.connect_timeout,
            request_timeout: instance.request_timeout,
            max_idle_connections: instance.max_idle_connections,
            http2: http::Http2::for_base_url(instance.http2, &instance.base_url),
        })?;
        let url = format!(
            "{}/2010-04-01/Accounts/{account_sid}/Messages.json",
            instance.base_url.trim_end_matches('/')
        );
        let url =
            reqwest::Url::parse(&url).map_err(|e| format!("{}: {e}", instance.key("base_url")))?;
        // reqwest encodes Basic credentials (and marks the header
        // sensitive); built once here rather than per message.
        let authorization = client
            .post(url.clone())
            .basic_auth(account_sid, Some(auth_token))
            .build()
            .ok()
            .and_then(|request| request.headers().get(AUTHORIZATION).cloned())
            .ok_or_else(|| format!("{}: not usable", instance.key("auth_token")))?;
        Ok(Self {
            name: instance.name.clone(),
            client,
            url,
            authorization,
            from,
            messaging_service_sid,
            auth_token: SecretString::from(auth_token),
            status_callback: instance.callback_url.clone(),
        })
    }

    async fn answer(&self, response: reqwest::Response) -> Result<Accepted, ProviderError> {
        let status = response.status();
        let retry_after = http::retry_after(&response);
        let body = http::read_bounded(response).await.unwrap_or_default();
        if status.is_success() {
            Ok(send::accepted(&body))
        } else {
            Err(send::failure(status, &body, retry_after))
        }
    }
}

#[async_trait]
impl SmsService for TwilioProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, sms: &SendSms) -> Result<Accepted, ProviderError> {
        let from = sms
            .sender_id
            .as_ref()
            .map(|s| s.as_str())
            .or(self.from.as_deref());
        let body = send::form(
            sms.phone_number.as_str(),
            sms.text.as_str(),
            from,
            self.messaging_service_sid.as_deref(),
            self.status_callback.as_deref(),
            http::seconds_left(sms),
        );
        let request = self
            .client
            .post(self.url.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, FORM)
            .headers(http::trace_headers())
            .body(body);
        match request.send().await {
            Ok(response) => self.answer(response).await,
            Err(e) => Err(http::transport_error(&e)),
        }
    }

    fn read_callback(
        &self,
        request: &CallbackRequest<'_>,
    ) -> Result<Vec<ProviderReport>, CallbackError> {
        callback::read(&self.auth_token, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    /// An instance from the environment, as an operator configures one.
    /// Loading the settings builds every instance's adapter, so a bad
    /// setting fails here, as it fails the service's start.
    fn instance(env: &[(&str, &str)]) -> Result<Instance, String> {
        let env = env
            .iter()
            .map(|(k, v)| (format!("SMS__PROVIDERS__TW__{k}"), v.to_string()))
            .chain([("SMS__PROVIDERS__TW__KIND".into(), "twilio".into())])
            .collect();
        let settings = Settings::load_from(None, crate::config::environment().source(Some(env)))
            .map_err(|e| e.0)?;
        Ok(settings.instances().unwrap().0.remove(0))
    }

    const SID: &str = "AC0123456789abcdef0123456789abcdef";
    const TOKEN: &str = "s3cr3t-t0ken";

    #[test]
    fn a_complete_instance_builds_with_from_or_a_messaging_service_or_both() {
        for sender in [
            vec![("FROM", "+15005550006")],
            vec![(
                "MESSAGING_SERVICE_SID",
                "MG0123456789abcdef0123456789abcdef",
            )],
            vec![
                ("FROM", "MKOPA"),
                (
                    "MESSAGING_SERVICE_SID",
                    "MG0123456789abcdef0123456789abcdef",
                ),
            ],
        ] {
            let mut env = vec![("ACCOUNT_SID", SID), ("AUTH_TOKEN", TOKEN)];
            env.extend(sender.clone());
            let provider = TwilioProvider::new(&instance(&env).unwrap()).unwrap();
            assert_eq!(provider.name(), "tw");
            assert_eq!(
                provider.url.as_str(),
                format!("https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json"),
                "{sender:?}"
            );
            assert!(provider.authorization.is_sensitive());
        }
    }

    #[test]
    fn a_missing_or_malformed_setting_is_named_and_no_secret_is_shown() {
        let cases: [(&[(&str, &str)], &str); 7] = [
            (&[("AUTH_TOKEN", TOKEN), ("FROM", "X")], "providers.tw.account_sid: required"),
            (
                &[("ACCOUNT_SID", "AC123"), ("AUTH_TOKEN", TOKEN), ("FROM", "X")],
                "providers.tw.account_sid: not a Twilio Account SID",
            ),
            (
                &[("ACCOUNT_SID", "SK0123456789abcdef0123456789abcdef"), ("AUTH_TOKEN", TOKEN), ("FROM", "X")],
                "providers.tw.account_sid: not a Twilio Account SID",
            ),
            (&[("ACCOUNT_SID", SID), ("FROM", "X")], "providers.tw.auth_token: required"),
            (
                &[("ACCOUNT_SID", SID), ("AUTH_TOKEN", "s3cr3t t0ken"), ("FROM", "X")],
                "providers.tw.auth_token: must be visible ASCII",
            ),
            (
                &[("ACCOUNT_SID", SID), ("AUTH_TOKEN", TOKEN)],
                "providers.tw.from: required for kind twilio unless providers.tw.messaging_service_sid is set",
            ),
            (
                &[("ACCOUNT_SID", SID), ("AUTH_TOKEN", TOKEN), ("MESSAGING_SERVICE_SID", "MG12")],
                "providers.tw.messaging_service_sid: not a Messaging Service SID",
            ),
        ];
        for (env, expected) in cases {
            let err = instance(env).err().unwrap();
            assert!(err.contains(expected), "{env:?}: {err}");
            assert!(!err.contains("s3cr3t"), "{env:?}: {err}");
        }
    }

    #[test]
    fn sids_are_a_prefix_and_32_hex_digits() {
        assert!(is_sid("AC", SID));
        assert!(is_sid("MG", "MGAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
        assert!(!is_sid("AC", "MG0123456789abcdef0123456789abcdef"));
        assert!(!is_sid("AC", "AC0123456789abcdef0123456789abcdeg"));
        assert!(!is_sid("AC", "AC0123456789abcdef0123456789abcde"));
        assert!(!is_sid("AC", "AC0123456789abcdef0123456789abcdéf"));
    }
}
