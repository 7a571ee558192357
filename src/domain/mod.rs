//! The vocabulary of the service: commands, events and the values inside
//! them. Everything here is pure (no I/O) and parses at the edge, so a value
//! of one of these types is valid by construction.

mod command;
mod encoding;
mod events;
mod limits;
mod phone;
mod quiet_hours;
mod segments;
mod zones;

pub use command::{
    CommandError, FailureReason, IdempotencyKey, MessageText, Priority, SendSms, SenderId,
    MAX_KEY_LEN, MAX_SCHEDULE_AHEAD, MAX_SENDER_LEN, MAX_TEXT_CHARS,
};
pub use encoding::{look_alike, Cost, LookAlike, Replacement, Smart, LOOK_ALIKES, MAX_NAMED};
pub use events::{DeliveryReport, DeliveryStatus, Event, EventKind, SmsFailed, SmsSent};
pub use limits::{
    LimitAction, LimitActions, RateWindow, MAX_WINDOW, MAX_WINDOWS, MAX_WINDOW_LIMIT,
};
pub use phone::{mask_numbers, mask_phone, PhoneNumber};
pub use quiet_hours::{QuietHours, MAX_RELEASE_SPREAD};
pub use segments::{count_segments, Encoding};
pub use zones::{country_of, zones_of, zones_of_country};

/// Formats a time as RFC 3339 UTC with second precision, as the events carry it.
pub fn rfc3339(at: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}
