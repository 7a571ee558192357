//! The SendSms command and its parts, parsed from the wire exactly as
//! docs/reference.md (section 2) describes it.
//!
//! Parsing sorts every body into one of three: a valid [`SendSms`]; an
//! invalid command that still has a usable key (it gets an SmsFailed event
//! and a dead letter); or a malformed body (not JSON, or no usable key: it is
//! only dead-lettered, since no event could name it).

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;

use super::encoding::Smart;
use super::phone::{mask_phone, PhoneNumber};

/// Longest idempotency key, in characters.
pub const MAX_KEY_LEN: usize = 128;
/// Longest text, in characters (ten concatenated GSM-7 parts and some).
pub const MAX_TEXT_CHARS: usize = 1600;
/// Longest sender id (alphanumeric ids are at most 11 on most networks,
/// numeric ones up to 15 digits).
pub const MAX_SENDER_LEN: usize = 15;

/// 1 to 128 printable ASCII characters without spaces (`!` to `~`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.is_empty() || raw.len() > MAX_KEY_LEN {
            return Err("idempotencyKey must be 1 to 128 characters");
        }
        if !raw.bytes().all(|b| (b'!'..=b'~').contains(&b)) {
            return Err("idempotencyKey must be printable ASCII without spaces");
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The text of a message: not empty, not only whitespace, bounded.
#[derive(Clone, PartialEq, Eq)]
pub struct MessageText(String);

impl MessageText {
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.trim().is_empty() {
            return Err("text must not be empty");
        }
        if raw.chars().count() > MAX_TEXT_CHARS {
            return Err("text must be at most 1600 characters");
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Message texts are private: Debug shows only their length.
impl fmt::Debug for MessageText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageText({} chars)", self.0.chars().count())
    }
}

/// The sender shown on the handset: 1 to 15 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderId(String);

impl SenderId {
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let printable = raw.bytes().all(|b| (b' '..=b'~').contains(&b));
        if raw.is_empty() || raw.len() > MAX_SENDER_LEN || !printable || raw.trim() != raw {
            return Err("senderId must be 1 to 15 printable ASCII characters");
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a command ended in SmsFailed; the `reason` field of the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    InvalidCommand,
    InvalidPhoneNumber,
    ProviderRejected,
    RetriesExhausted,
    /// Its `expiresAt` passed before it could be sent.
    Expired,
    /// A per-recipient limit refused it (`limits.per_recipient`).
    RecipientRateLimited,
    /// Cancelled (`DELETE /v1/messages/{key}`) before it was sent.
    Cancelled,
}

impl FailureReason {
    /// Every reason, as the `sms_failed_total{reason}` series list them.
    pub const ALL: [Self; 7] = [
        Self::InvalidCommand,
        Self::InvalidPhoneNumber,
        Self::ProviderRejected,
        Self::RetriesExhausted,
        Self::Expired,
        Self::RecipientRateLimited,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidCommand => "invalid_command",
            Self::InvalidPhoneNumber => "invalid_phone_number",
            Self::ProviderRejected => "provider_rejected",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Expired => "expired",
            Self::RecipientRateLimited => "recipient_rate_limited",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == raw)
    }
}

/// How urgent a message is (`priority`): `high` commands have a queue and
/// capacity of their own and bypass quiet hours; `bulk` ones yield to
/// everything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    Bulk,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub const ALL: [Self; 3] = [Self::High, Self::Normal, Self::Bulk];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Bulk => "bulk",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == raw)
    }
}

/// Farthest ahead a `sendAt` may be.
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(30 * 24 * 3600);

/// A valid SendSms command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendSms {
    pub idempotency_key: IdempotencyKey,
    pub phone_number: PhoneNumber,
    pub text: MessageText,
    pub sender_id: Option<SenderId>,
    /// Not sent after this instant (`expiresAt`); passed on as the
    /// provider's validity period where it has one.
    pub expires_at: Option<SystemTime>,
    /// Not sent before this instant (`sendAt`); at most
    /// [`MAX_SCHEDULE_AHEAD`] after the command was parsed.
    pub send_at: Option<SystemTime>,
    /// `priority`; `normal` when absent.
    pub priority: Priority,
}

/// Parses an RFC 3339 time (`2026-12-01T10:00:00Z`, `...+03:00`).
pub fn parse_rfc3339(raw: &str) -> Option<SystemTime> {
    let at =
        time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339).ok()?;
    Some(SystemTime::from(at))
}

/// Why a body is not a valid command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// Not JSON, not an object, or no usable `idempotencyKey`: dead-letter only.
    Malformed(String),
    /// A usable key but an invalid command: SmsFailed, then dead-letter.
    Invalid {
        key: IdempotencyKey,
        /// The phone number as given (truncated), for the event; may be empty.
        phone_number: String,
        reason: FailureReason,
        detail: String,
    },
}

impl CommandError {
    /// The short reason put in the dead letter's `x-sms-error` header.
    pub fn dead_letter_reason(&self) -> String {
        match self {
            Self::Malformed(detail) => format!("malformed: {detail}"),
            Self::Invalid { reason, detail, .. } => format!("{}: {detail}", reason.as_str()),
        }
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "idempotencyKey", borrow)]
    idempotency_key: Option<Cow<'a, str>>,
    #[serde(rename = "phoneNumber", borrow)]
    phone_number: Option<Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(rename = "senderId", borrow)]
    sender_id: Option<Cow<'a, str>>,
    #[serde(rename = "expiresAt", borrow)]
    expires_at: Option<Cow<'a, str>>,
    #[serde(rename = "sendAt", borrow)]
    send_at: Option<Cow<'a, str>>,
    #[serde(borrow)]
    priority: Option<Cow<'a, str>>,
}

impl SendSms {
    /// The command with its text smart-encoded ([`Smart`]), when that
    /// changes the text; `None` when it is sent as written. Its key, and
    /// the fingerprint the store keeps, stay the received command's.
    pub fn smart_encoded(&self) -> Option<SendSms> {
        match Smart::of(self.text.as_str()) {
            // Smart::of only replaces into a text that obeys these rules.
            Smart::Replaced { text, .. } => Some(SendSms {
                text: MessageText(text),
                ..self.clone()
            }),
            _ => None,
        }
    }

    /// Identifies what the command asks for (not its key): two commands
    /// with one key and different fingerprints are a reused key, not a
    /// duplicate. Hex SHA-256 over the fields, each length-prefixed.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        let sender = self.sender_id.as_ref().map_or("", |s| s.as_str());
        for field in [self.phone_number.as_str(), self.text.as_str(), sender] {
            hash.update((field.len() as u64).to_be_bytes());
            hash.update(field.as_bytes());
        }
        // Only when given, so that fingerprints of commands without it
        // stay what they were.
        if let Some(at) = self.expires_at {
            let ms = at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            hash.update(b"expiresAt");
            hash.update(ms.to_be_bytes());
        }
        if let Some(at) = self.send_at {
            let ms = at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            hash.update(b"sendAt");
            hash.update(ms.to_be_bytes());
        }
        // The priority decides when and how, not what: a command re-sent
        // with another priority is the same message, not a reused key.
        hex::encode(hash.finalize())
    }

    /// Parses a command body. The caller bounds the body's size first.
    pub fn from_json(body: &[u8]) -> Result<Self, CommandError> {
        match serde_json::from_slice::<Wire>(body) {
            Ok(wire) => Self::from_wire(wire),
            Err(typed_error) => Err(Self::explain(body, typed_error)),
        }
    }

    fn from_wire(wire: Wire<'_>) -> Result<Self, CommandError> {
        let key = match wire.idempotency_key.as_deref() {
            None => return Err(CommandError::Malformed("idempotencyKey is required".into())),
            Some(raw) => {
                IdempotencyKey::parse(raw).map_err(|e| CommandError::Malformed(e.to_owned()))?
            }
        };
        let raw_phone = wire.phone_number.as_deref().unwrap_or_default();
        let invalid = |reason, detail: &str| CommandError::Invalid {
            key: key.clone(),
            phone_number: truncate(raw_phone),
            reason,
            detail: detail.to_owned(),
        };
        let phone_number = match wire.phone_number.as_deref() {
            None => {
                return Err(invalid(
                    FailureReason::InvalidCommand,
                    "phoneNumber is required",
                ))
            }
            Some(raw) => PhoneNumber::parse(raw)
                .map_err(|e| invalid(FailureReason::InvalidPhoneNumber, e))?,
        };
        let text = match wire.text.as_deref() {
            None => return Err(invalid(FailureReason::InvalidCommand, "text is required")),
            Some(raw) => {
                MessageText::parse(raw).map_err(|e| invalid(FailureReason::InvalidCommand, e))?
            }
        };
        let sender_id = wire
            .sender_id
            .as_deref()
            .map(SenderId::parse)
            .transpose()
            .map_err(|e| invalid(FailureReason::InvalidCommand, e))?;
        let expires_at = wire
            .expires_at
            .as_deref()
            .map(|raw| {
                parse_rfc3339(raw).ok_or_else(|| {
                    invalid(
                        FailureReason::InvalidCommand,
                        "expiresAt must be an RFC 3339 time (2026-12-01T10:00:00Z)",
                    )
                })
            })
            .transpose()?;
        let send_at = match wire.send_at.as_deref() {
            None => None,
            Some(raw) => {
                let at = parse_rfc3339(raw).ok_or_else(|| {
                    invalid(
                        FailureReason::InvalidCommand,
                        "sendAt must be an RFC 3339 time (2026-12-01T10:00:00Z)",
                    )
                })?;
                if at > SystemTime::now() + MAX_SCHEDULE_AHEAD {
                    return Err(invalid(
                        FailureReason::InvalidCommand,
                        "sendAt must be at most 30 days ahead",
                    ));
                }
                if expires_at.is_some_and(|expires| at >= expires) {
                    return Err(invalid(
                        FailureReason::InvalidCommand,
                        "sendAt must be before expiresAt",
                    ));
                }
                Some(at)
            }
        };
        let priority = match wire.priority.as_deref() {
            None => Priority::Normal,
            Some(raw) => Priority::parse(raw).ok_or_else(|| {
                invalid(
                    FailureReason::InvalidCommand,
                    "priority must be high, normal or bulk",
                )
            })?,
        };
        Ok(Self {
            idempotency_key: key,
            phone_number,
            text,
            sender_id,
            expires_at,
            send_at,
            priority,
        })
    }

    /// The slow path, taken only for bodies the typed parse refused: finds
    /// whether a usable key exists and names the field that is wrong.
    fn explain(body: &[u8], typed_error: serde_json::Error) -> CommandError {
        let value: Value = match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(e) => return CommandError::Malformed(format!("body is not valid JSON: {e}")),
        };
        let Some(object) = value.as_object() else {
            return CommandError::Malformed("body is not a JSON object".into());
        };
        let key = match object.get("idempotencyKey") {
            Some(Value::String(raw)) => match IdempotencyKey::parse(raw) {
                Ok(key) => key,
                Err(e) => return CommandError::Malformed(e.to_owned()),
            },
            Some(_) => return CommandError::Malformed("idempotencyKey must be a string".into()),
            None => return CommandError::Malformed("idempotencyKey is required".into()),
        };
        let phone = object.get("phoneNumber");
        let phone_number = truncate(phone.and_then(Value::as_str).unwrap_or_default());
        let (reason, detail) = if phone.is_some_and(|p| !p.is_string() && !p.is_null()) {
            (
                FailureReason::InvalidPhoneNumber,
                "phoneNumber must be a string".to_owned(),
            )
        } else if let Some(field) = ["text", "senderId", "expiresAt", "sendAt", "priority"]
            .into_iter()
            .find(|f| {
                object
                    .get(*f)
                    .is_some_and(|v| !v.is_string() && !v.is_null())
            })
        {
            (
                FailureReason::InvalidCommand,
                format!("{field} must be a string"),
            )
        } else {
            (FailureReason::InvalidCommand, typed_error.to_string())
        };
        CommandError::Invalid {
            key,
            phone_number,
            reason,
            detail,
        }
    }

    /// The command as JSON, as producers publish it.
    pub fn to_json(&self) -> Vec<u8> {
        let mut body = serde_json::json!({
            "idempotencyKey": self.idempotency_key.as_str(),
            "phoneNumber": self.phone_number.as_str(),
            "text": self.text.as_str(),
        });
        if let Some(at) = self.expires_at {
            body["expiresAt"] = Value::from(super::rfc3339(at));
        }
        if let Some(at) = self.send_at {
            body["sendAt"] = Value::from(super::rfc3339(at));
        }
        if self.priority != Priority::Normal {
            body["priority"] = Value::from(self.priority.as_str());
        }
        if let Some(sender) = &self.sender_id {
            body["senderId"] = Value::from(sender.as_str());
        }
        serde_json::to_vec(&body).expect("a JSON value always serialises")
    }
}

/// An invalid phone number is echoed in events, but never a huge one.
fn truncate(raw: &str) -> String {
    raw.chars().take(32).collect()
}

impl fmt::Display for SendSms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SendSms(key={}, to={})",
            self.idempotency_key,
            mask_phone(self.phone_number.as_str())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(body: &str) -> (FailureReason, String) {
        match SendSms::from_json(body.as_bytes()) {
            Err(CommandError::Invalid {
                reason,
                detail,
                key,
                ..
            }) => {
                assert_eq!(key.as_str(), "k1");
                (reason, detail)
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn malformed(body: &[u8]) -> String {
        match SendSms::from_json(body) {
            Err(CommandError::Malformed(detail)) => detail,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn the_smart_encoded_command_differs_in_its_text_only() {
        let text = format!("Can\u{2019}t wait \u{2014} {}", "a".repeat(80));
        let body = serde_json::json!({"idempotencyKey": "k1", "phoneNumber": "+254712345678",
            "text": text, "senderId": "MKOPA", "priority": "high"});
        let cmd = SendSms::from_json(body.to_string().as_bytes()).unwrap();
        let sent = cmd
            .smart_encoded()
            .expect("two UCS-2 parts become one GSM-7 part");
        assert_eq!(
            sent.text.as_str(),
            format!("Can't wait - {}", "a".repeat(80))
        );
        assert_eq!(
            SendSms {
                text: cmd.text.clone(),
                ..sent
            },
            cmd
        );
        let short = SendSms::from_json(
            br#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"Can\u2019t wait"}"#,
        )
        .unwrap();
        assert_eq!(short.smart_encoded(), None, "one part either way");
    }

    #[test]
    fn a_valid_command_parses_and_ignores_unknown_fields() {
        let cmd = SendSms::from_json(
            br#"{"idempotencyKey":"pay-8812-reminder","phoneNumber":"+254712345678",
                "text":"Payment received. Thank you!","senderId":"MKOPA","extra":{"a":[1]}}"#,
        )
        .unwrap();
        assert_eq!(cmd.idempotency_key.as_str(), "pay-8812-reminder");
        assert_eq!(cmd.phone_number.as_str(), "+254712345678");
        assert_eq!(cmd.text.as_str(), "Payment received. Thank you!");
        assert_eq!(cmd.sender_id.unwrap().as_str(), "MKOPA");
    }

    #[test]
    fn json_escapes_in_strings_are_decoded() {
        let cmd = SendSms::from_json(
            br#"{"idempotencyKey":"k\u0031","phoneNumber":"+254712345678","text":"a\nb \u00e9"}"#,
        )
        .unwrap();
        assert_eq!(cmd.idempotency_key.as_str(), "k1");
        assert_eq!(cmd.text.as_str(), "a\nb é");
        assert!(cmd.sender_id.is_none());
    }

    #[test]
    fn send_at_is_at_most_30_days_ahead_and_fingerprinted_only_when_given() {
        let with = |extra: &str| {
            let body = format!(
                r#"{{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi"{extra}}}"#
            );
            SendSms::from_json(body.as_bytes())
        };
        let plain = with("").unwrap();
        assert_eq!(plain.send_at, None);
        let soon = SystemTime::now() + Duration::from_secs(3600);
        let soon_raw = crate::domain::rfc3339(soon);
        let scheduled = with(&format!(r#","sendAt":"{soon_raw}""#)).unwrap();
        assert!(scheduled.send_at.is_some());
        assert_ne!(scheduled.fingerprint(), plain.fingerprint());
        let again = SendSms::from_json(&scheduled.to_json()).unwrap();
        assert_eq!(again.send_at, scheduled.send_at);

        let far = crate::domain::rfc3339(SystemTime::now() + Duration::from_secs(31 * 24 * 3600));
        let (reason, detail) = invalid(&format!(
            r#"{{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","sendAt":"{far}"}}"#
        ));
        assert_eq!(reason, FailureReason::InvalidCommand);
        assert!(detail.contains("30 days"), "{detail}");
        let (_, detail) = invalid(&format!(
            r#"{{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","sendAt":"{soon_raw}","expiresAt":"{soon_raw}"}}"#
        ));
        assert_eq!(detail, "sendAt must be before expiresAt");
        let (_, detail) = invalid(
            r#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","sendAt":"tomorrow"}"#,
        );
        assert!(detail.contains("sendAt"), "{detail}");
        let (_, detail) = invalid(
            r#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","sendAt":5}"#,
        );
        assert_eq!(detail, "sendAt must be a string");
    }

    #[test]
    fn priority_is_high_normal_or_bulk_and_does_not_change_the_fingerprint() {
        let with = |p: &str| {
            let body = format!(
                r#"{{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","priority":"{p}"}}"#
            );
            SendSms::from_json(body.as_bytes())
        };
        let high = with("high").unwrap();
        assert_eq!(high.priority, Priority::High);
        assert_eq!(with("bulk").unwrap().priority, Priority::Bulk);
        let normal = with("normal").unwrap();
        assert_eq!(normal.priority, Priority::Normal);
        assert_eq!(high.fingerprint(), normal.fingerprint());
        assert_eq!(
            SendSms::from_json(&high.to_json()).unwrap().priority,
            Priority::High
        );
        let (reason, detail) = invalid(
            r#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","priority":"urgent"}"#,
        );
        assert_eq!(reason, FailureReason::InvalidCommand);
        assert_eq!(detail, "priority must be high, normal or bulk");
    }

    #[test]
    fn expires_at_is_rfc_3339_with_any_offset_and_fingerprinted_only_when_given() {
        let with = |at: &str| {
            let body = format!(
                r#"{{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","expiresAt":"{at}"}}"#
            );
            SendSms::from_json(body.as_bytes())
        };
        let utc = with("2026-12-01T10:00:00Z").unwrap().expires_at.unwrap();
        let nairobi = with("2026-12-01T13:00:00+03:00")
            .unwrap()
            .expires_at
            .unwrap();
        assert_eq!(utc, nairobi);
        assert_eq!(
            utc.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_796_119_200
        );
        for bad in ["tomorrow", "2026-12-01", "2026-12-01 10:00:00", ""] {
            match with(bad) {
                Err(CommandError::Invalid { reason, detail, .. }) => {
                    assert_eq!(reason, FailureReason::InvalidCommand);
                    assert!(detail.starts_with("expiresAt"), "{detail}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        let body =
            br#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","expiresAt":5}"#;
        assert!(matches!(
            SendSms::from_json(body),
            Err(CommandError::Invalid { detail, .. }) if detail == "expiresAt must be a string"
        ));
        let plain = SendSms::from_json(
            br#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi"}"#,
        )
        .unwrap();
        let expiring = with("2026-12-01T10:00:00Z").unwrap();
        assert_ne!(plain.fingerprint(), expiring.fingerprint());
        assert_eq!(
            plain.fingerprint(),
            "e760c83e5233479e0ba5264cabb9d284630e811e4ac55d543148ec1c44e0fb1c",
            "a command without expiresAt keeps the fingerprint it had before expiresAt existed"
        );
        assert_eq!(SendSms::from_json(&expiring.to_json()).unwrap(), expiring);
    }

    #[test]
    fn round_trips_through_to_json() {
        let body =
            br#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","senderId":"X"}"#;
        let cmd = SendSms::from_json(body).unwrap();
        assert_eq!(SendSms::from_json(&cmd.to_json()).unwrap(), cmd);
    }

    #[test]
    fn bodies_without_a_usable_key_are_malformed() {
        malformed(b"not json");
        malformed(b"\xff\xfe{}");
        malformed(br#"{"idempotencyKey":"caf\xc3"}"#);
        malformed(b"[1,2,3]");
        malformed(b"\"just a string\"");
        malformed(br#"{"phoneNumber":"+254712345678","text":"hi"}"#);
        malformed(br#"{"idempotencyKey":42,"phoneNumber":"+254712345678","text":"hi"}"#);
        malformed(br#"{"idempotencyKey":"","phoneNumber":"+254712345678","text":"hi"}"#);
        malformed(br#"{"idempotencyKey":"has space","phoneNumber":"+254712345678","text":"hi"}"#);
        let long = format!(r#"{{"idempotencyKey":"{}","text":"hi"}}"#, "k".repeat(129));
        malformed(long.as_bytes());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(malformed(deep.as_bytes()).contains("not valid JSON"));
    }

    #[test]
    fn keys_of_128_printable_characters_are_usable() {
        let key = "!~".repeat(64);
        assert!(IdempotencyKey::parse(&key).is_ok());
        assert!(IdempotencyKey::parse("tab\there").is_err());
        assert!(IdempotencyKey::parse("é").is_err());
    }

    #[test]
    fn a_bad_phone_number_is_invalid_phone_number() {
        let (reason, detail) =
            invalid(r#"{"idempotencyKey":"k1","phoneNumber":"0712345678","text":"hi"}"#);
        assert_eq!(reason, FailureReason::InvalidPhoneNumber);
        assert_eq!(detail, "phoneNumber must be E.164");
        let (reason, _) =
            invalid(r#"{"idempotencyKey":"k1","phoneNumber":254712345678,"text":"hi"}"#);
        assert_eq!(reason, FailureReason::InvalidPhoneNumber);
    }

    #[test]
    fn missing_or_wrong_fields_are_invalid_command() {
        let cases = [
            (
                r#"{"idempotencyKey":"k1","text":"hi"}"#,
                "phoneNumber is required",
            ),
            (
                r#"{"idempotencyKey":"k1","phoneNumber":"+254712345678"}"#,
                "text is required",
            ),
            (
                r#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"  \n\t"}"#,
                "text must not be empty",
            ),
            (
                r#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":["hi"]}"#,
                "text must be a string",
            ),
            (
                r#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","senderId":7}"#,
                "senderId must be a string",
            ),
            (
                r#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","senderId":"WAY-TOO-LONG-SENDER"}"#,
                "senderId must be 1 to 15 printable ASCII characters",
            ),
        ];
        for (body, expected) in cases {
            let (reason, detail) = invalid(body);
            assert_eq!(reason, FailureReason::InvalidCommand, "{body}");
            assert_eq!(detail, expected, "{body}");
        }
    }

    #[test]
    fn texts_longer_than_the_limit_are_invalid() {
        let body = format!(
            r#"{{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"{}"}}"#,
            "a".repeat(MAX_TEXT_CHARS + 1)
        );
        assert_eq!(invalid(&body).0, FailureReason::InvalidCommand);
    }

    #[test]
    fn invalid_phone_numbers_are_echoed_truncated() {
        let body = format!(
            r#"{{"idempotencyKey":"k1","phoneNumber":"{}","text":"hi"}}"#,
            "9".repeat(1000)
        );
        match SendSms::from_json(body.as_bytes()) {
            Err(CommandError::Invalid { phone_number, .. }) => assert_eq!(phone_number.len(), 32),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failure_reasons_round_trip() {
        for r in [
            "invalid_command",
            "invalid_phone_number",
            "provider_rejected",
            "retries_exhausted",
        ] {
            assert_eq!(FailureReason::parse(r).unwrap().as_str(), r);
        }
        assert!(FailureReason::parse("other").is_none());
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = SendSms::from_json(&body);
        }

        #[test]
        fn any_valid_parts_make_a_valid_command(
            key in "[!-~]{1,128}",
            digits in "[1-9][0-9]{7,14}",
            text in "[^\u{0}-\u{20}][ -~]{0,200}",
        ) {
            let body = serde_json::json!({"idempotencyKey": key, "phoneNumber": format!("+{digits}"), "text": text});
            let cmd = SendSms::from_json(body.to_string().as_bytes()).unwrap();
            proptest::prop_assert_eq!(cmd.idempotency_key.as_str(), key.as_str());
        }
    }

    #[test]
    fn the_fingerprint_tells_payloads_apart_but_not_keys() {
        let parse = |json: &str| SendSms::from_json(json.as_bytes()).unwrap().fingerprint();
        let a = parse(r#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi"}"#);
        let same = parse(r#"{"idempotencyKey":"k2","text":"hi","phoneNumber":"+254712345678"}"#);
        let other = parse(r#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi!"}"#);
        let sender = parse(
            r#"{"idempotencyKey":"k1","phoneNumber":"+254712345678","text":"hi","senderId":"X"}"#,
        );
        assert_eq!(a, same);
        assert_ne!(a, other);
        assert_ne!(a, sender);
    }
}
