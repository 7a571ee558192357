//! Per-recipient limits (`limits.per_recipient`): sliding windows such as
//! `5/15m` (at most 5 messages to one number in any 15 minutes), and what
//! happens to a message over one. Pure: the counting itself is the
//! store's (`CacheService::record_recipient_send`).

use std::fmt;
use std::time::Duration;

use super::Priority;

/// Most messages one window may allow: the store keeps one entry per
/// message counted, so this bounds a recipient's record.
pub const MAX_WINDOW_LIMIT: u32 = 10_000;
/// Longest window: a recipient's record lives this long after its last
/// message at most.
pub const MAX_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most windows in `limits.per_recipient`.
pub const MAX_WINDOWS: usize = 10;

/// At most `limit` messages to one recipient in any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateWindow {
    pub limit: u32,
    pub window: Duration,
}

impl RateWindow {
    /// `N/<length><unit>`: `5/15m`, `20/24h`, `2/3s`, `100/7d` (units `s`,
    /// `m`, `h`, `d`); N from 1 to [`MAX_WINDOW_LIMIT`], the window from
    /// 1 s to [`MAX_WINDOW`].
    pub fn parse(raw: &str) -> Result<Self, String> {
        let expected = || format!("{raw:?} is not a window like \"5/15m\" (N/<length><s|m|h|d>)");
        let (limit, window) = raw.trim().split_once('/').ok_or_else(expected)?;
        let limit: u32 = digits(limit).ok_or_else(expected)?;
        let unit = window.chars().last().ok_or_else(expected)?;
        let length: u64 = digits(&window[..window.len() - unit.len_utf8()]).ok_or_else(expected)?;
        let unit_secs = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(expected()),
        };
        if limit == 0 || limit > MAX_WINDOW_LIMIT {
            return Err(format!(
                "{raw:?}: the count must be 1 to {MAX_WINDOW_LIMIT}"
            ));
        }
        let window = Duration::from_secs(length.saturating_mul(unit_secs));
        if window.is_zero() || window > MAX_WINDOW {
            return Err(format!("{raw:?}: the window must be 1s to 30d"));
        }
        Ok(Self { limit, window })
    }
}

/// Plain ASCII digits only (no sign, no blanks), as a number.
fn digits<T: std::str::FromStr>(raw: &str) -> Option<T> {
    (!raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()))
        .then(|| raw.parse().ok())
        .flatten()
}

impl fmt::Display for RateWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.window.as_secs();
        let (length, unit) = [(86_400, 'd'), (3600, 'h'), (60, 'm')]
            .into_iter()
            .find(|(unit, _)| secs % unit == 0)
            .map_or((secs, 's'), |(unit, name)| (secs / unit, name));
        write!(f, "{}/{length}{unit}", self.limit)
    }
}

/// What happens to a message over a per-recipient limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitAction {
    /// It waits in the delay tiers until the window lets it through.
    Delay,
    /// It fails: SmsFailed `recipient_rate_limited`.
    Fail,
}

impl LimitAction {
    /// Every action, as `sms_recipient_limited_total{action}` lists them.
    pub const ALL: [Self; 2] = [Self::Delay, Self::Fail];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delay => "delay",
            Self::Fail => "fail",
        }
    }
}

/// The action for each priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitActions {
    pub high: LimitAction,
    pub normal: LimitAction,
    pub bulk: LimitAction,
}

impl Default for LimitActions {
    /// A one-time password that cannot go now is worth nothing later:
    /// `high` fails; `normal` and `bulk` wait.
    fn default() -> Self {
        Self {
            high: LimitAction::Fail,
            normal: LimitAction::Delay,
            bulk: LimitAction::Delay,
        }
    }
}

impl LimitActions {
    pub fn for_priority(&self, priority: Priority) -> LimitAction {
        match priority {
            Priority::High => self.high,
            Priority::Normal => self.normal,
            Priority::Bulk => self.bulk,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_as_a_count_over_a_length_with_a_unit() {
        for (raw, limit, secs) in [
            ("5/15m", 5, 900),
            ("20/24h", 20, 86_400),
            ("2/3s", 2, 3),
            ("100/7d", 100, 604_800),
            (" 1/1s ", 1, 1),
            ("10000/30d", 10_000, 2_592_000),
        ] {
            let w = RateWindow::parse(raw).unwrap();
            assert_eq!((w.limit, w.window.as_secs()), (limit, secs), "{raw}");
        }
    }

    #[test]
    fn malformed_or_unbounded_windows_are_refused_saying_why() {
        for raw in [
            "", "5", "5/", "/15m", "5/15", "5/m", "5/15x", "-5/15m", "5/-15m", "+5/15m", "5 /15m",
            "5/1 5m", "five/15m", "5/15mm", "5/15é",
        ] {
            let err = RateWindow::parse(raw).unwrap_err();
            assert!(err.contains("N/<length>"), "{raw:?}: {err}");
        }
        for (raw, says) in [
            ("0/15m", "count"),
            ("10001/1h", "count"),
            ("99999999999/1h", "N/<length>"),
            ("5/0s", "window"),
            ("5/31d", "window"),
            ("5/99999999999999999d", "window"),
        ] {
            let err = RateWindow::parse(raw).unwrap_err();
            assert!(err.contains(says), "{raw:?}: {err}");
        }
    }

    #[test]
    fn a_window_is_shown_in_its_largest_whole_unit() {
        for (raw, shown) in [
            ("5/15m", "5/15m"),
            ("20/24h", "20/1d"),
            ("2/90s", "2/90s"),
            ("3/120s", "3/2m"),
        ] {
            assert_eq!(RateWindow::parse(raw).unwrap().to_string(), shown);
        }
    }

    #[test]
    fn one_time_passwords_fail_and_the_rest_wait_by_default() {
        let actions = LimitActions::default();
        assert_eq!(actions.for_priority(Priority::High), LimitAction::Fail);
        assert_eq!(actions.for_priority(Priority::Normal), LimitAction::Delay);
        assert_eq!(actions.for_priority(Priority::Bulk), LimitAction::Delay);
    }
}
