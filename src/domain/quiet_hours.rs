//! Quiet hours (`[quiet_hours]`): `normal` and `bulk` messages are not
//! sent while it is night where the recipient is, and go when the window
//! opens, spread over `release_spread_s` rather than all at once. Pure:
//! given the instant, the recipient's time zones and the key, when the
//! message may go.
//!
//! Where a country spans several time zones the number does not say which
//! one the recipient is in, so the decision is the most conservative one:
//! quiet while it is quiet in any of the country's zones, open once it is
//! open in all of them (see [`super::zones`]).

use std::time::{Duration, SystemTime};

use jiff::civil::Time;
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// Looked ahead at most for an instant that is open in every zone of a
/// country; a country whose zones leave no common open moment in it (a
/// quiet window nearly a day long) is not held at all.
const HORIZON: Duration = Duration::from_secs(48 * 3600);
/// Longest `release_spread_s`.
pub const MAX_RELEASE_SPREAD: Duration = Duration::from_secs(6 * 3600);

/// The quiet window, in local time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuietHours {
    /// Local time the window starts (inclusive).
    start: Time,
    /// Local time it ends (exclusive): before `start` for a window over
    /// midnight.
    end: Time,
    /// Messages held by the window are spread over this long after it
    /// ends, each at an offset its key decides.
    spread: Duration,
}

impl QuietHours {
    /// `start` and `end` as `HH:MM` or `HH:MM:SS` (24-hour), different from
    /// each other; `spread` at most [`MAX_RELEASE_SPREAD`]. An error names
    /// the setting it is about (`start`, `end`, `release_spread_s`).
    pub fn new(start: &str, end: &str, spread: Duration) -> Result<Self, (&'static str, String)> {
        let start = clock(start).map_err(|why| ("start", why))?;
        let end = clock(end).map_err(|why| ("end", why))?;
        if start == end {
            return Err(("end", "must differ from start".into()));
        }
        if spread > MAX_RELEASE_SPREAD {
            return Err(("release_spread_s", "must be at most 21600 (6 hours)".into()));
        }
        Ok(Self { start, end, spread })
    }

    /// Whether the local time `t` is inside the window.
    fn covers(&self, t: Time) -> bool {
        if self.start < self.end {
            self.start <= t && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }

    /// Whether it is quiet in `zone` at `at`.
    fn quiet_in(&self, zone: &TimeZone, at: Timestamp) -> bool {
        self.covers(at.to_zoned(zone.clone()).time())
    }

    /// When the window that is open in `zone` at `at` ends: the next
    /// instant after `at` when the local clock reads `end` (on a day
    /// whose `end` falls in a gap of a clock change, just after the gap).
    fn ends_in(&self, zone: &TimeZone, at: Timestamp) -> Option<Timestamp> {
        let mut date = at.to_zoned(zone.clone()).date();
        // Today's end, else tomorrow's (a window over midnight); the day
        // after covers a clock change that moved today's end behind `at`.
        for _ in 0..3 {
            let end = zone
                .to_ambiguous_zoned(date.to_datetime(self.end))
                .compatible()
                .ok()?
                .timestamp();
            if end > at {
                return Some(end);
            }
            date = date.tomorrow().ok()?;
        }
        None
    }

    /// When a message of `key` may go to a recipient in `zones` (a
    /// country's), if not now: the first instant from `now` on when it is
    /// quiet in none of them, plus the key's share of the spread. `None`:
    /// now (not quiet anywhere, no zone known, or no common open moment
    /// within two days).
    ///
    /// Within the spread after a window's end, a key whose share has not
    /// come yet still waits for it: a held message comes back from its
    /// hold queues at the end (or before), and is asked again.
    pub fn release_at(&self, now: SystemTime, zones: &[TimeZone], key: &str) -> Option<SystemTime> {
        if let Some(at) = self.release_from(now, zones, key) {
            return Some(at);
        }
        let earlier = now.checked_sub(self.spread)?;
        self.release_from(earlier, zones, key)
            .filter(|at| *at > now)
    }

    /// [`QuietHours::release_at`] for a message that comes at `now`.
    fn release_from(&self, now: SystemTime, zones: &[TimeZone], key: &str) -> Option<SystemTime> {
        let now = Timestamp::try_from(now).ok()?;
        let horizon = now
            .checked_add(jiff::SignedDuration::try_from(HORIZON).ok()?)
            .ok()?;
        let mut at = now;
        // Each round moves past the end of a window: a few per zone.
        for _ in 0..(4 * zones.len() + 4) {
            let quiet: Vec<&TimeZone> = zones.iter().filter(|z| self.quiet_in(z, at)).collect();
            if quiet.is_empty() {
                if at == now {
                    return None;
                }
                return Some(SystemTime::from(at) + spread_share(key, self.spread));
            }
            // Until the last of them opens, one is quiet.
            at = quiet
                .iter()
                .map(|z| self.ends_in(z, at))
                .collect::<Option<Vec<_>>>()?
                .into_iter()
                .max()?;
            if at > horizon {
                return None;
            }
        }
        None
    }
}

/// `HH:MM` or `HH:MM:SS`, 24-hour, two digits each.
fn clock(raw: &str) -> Result<Time, String> {
    let bad = || format!("{raw:?} is not a time of day like \"21:00\" (HH:MM or HH:MM:SS)");
    let parts: Vec<&str> = raw.split(':').collect();
    if !(2..=3).contains(&parts.len())
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    let number = |i: usize| parts.get(i).map_or(Ok(0), |p| p.parse::<i8>());
    let (h, m, s) = (
        number(0).map_err(|_| bad())?,
        number(1).map_err(|_| bad())?,
        number(2).map_err(|_| bad())?,
    );
    Time::new(h, m, s, 0).map_err(|_| bad())
}

/// The key's offset into the spread: the same for every delivery of it,
/// on every instance (SHA-256 of the key, not a per-process hash).
fn spread_share(key: &str, spread: Duration) -> Duration {
    use sha2::{Digest, Sha256};
    let spread_ms = u64::try_from(spread.as_millis()).unwrap_or(u64::MAX);
    if spread_ms == 0 {
        return Duration::ZERO;
    }
    let hash = Sha256::digest(key.as_bytes());
    let first = u64::from_be_bytes(hash[..8].try_into().expect("a SHA-256 has 32 bytes"));
    Duration::from_millis(first % spread_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    /// The instant a wall clock in `zone` reads `local` (`2026-01-15T22:30`).
    fn at(local: &str, zone: &str) -> SystemTime {
        let civil: jiff::civil::DateTime = local.parse().unwrap();
        SystemTime::from(civil.to_zoned(self::zone(zone)).unwrap().timestamp())
    }

    fn night() -> QuietHours {
        QuietHours::new("21:00", "08:00", Duration::ZERO).unwrap()
    }

    #[test]
    fn times_of_day_parse_with_optional_seconds_and_nothing_else() {
        assert!(QuietHours::new("21:00", "08:00:30", Duration::ZERO).is_ok());
        assert!(QuietHours::new("00:00", "23:59:59", Duration::from_secs(3600)).is_ok());
        for bad in [
            "24:00",
            "8:00",
            "08:60",
            "08:00:60",
            "08",
            "08:00:00:00",
            "+8:00",
            "ab:cd",
            "",
        ] {
            let (field, why) = QuietHours::new(bad, "08:00", Duration::ZERO).unwrap_err();
            assert_eq!(field, "start");
            assert!(why.contains("HH:MM"), "{bad:?}: {why}");
            assert_eq!(
                QuietHours::new("21:00", bad, Duration::ZERO).unwrap_err().0,
                "end"
            );
        }
        let (field, why) = QuietHours::new("08:00", "08:00", Duration::ZERO).unwrap_err();
        assert_eq!((field, why.as_str()), ("end", "must differ from start"));
        let spread = QuietHours::new("21:00", "08:00", Duration::from_secs(21_601));
        assert_eq!(spread.unwrap_err().0, "release_spread_s");
    }

    #[test]
    fn after_the_window_a_key_still_waits_for_its_share_of_the_spread() {
        let nairobi = [zone("Africa/Nairobi")];
        let spread = QuietHours::new("21:00", "08:00", Duration::from_secs(1800)).unwrap();
        let end = at("2026-01-15T08:00", "Africa/Nairobi");
        let share = spread_share("k", Duration::from_secs(1800));
        assert!(share > Duration::from_secs(1), "{share:?}");
        // Held at night, it comes back at 08:00 sharp: still not its turn.
        let night_release =
            spread.release_at(at("2026-01-14T23:00", "Africa/Nairobi"), &nairobi, "k");
        assert_eq!(night_release, Some(end + share));
        assert_eq!(spread.release_at(end, &nairobi, "k"), Some(end + share));
        assert_eq!(
            spread.release_at(end + share / 2, &nairobi, "k"),
            Some(end + share)
        );
        // Its turn, and after the spread: now.
        assert_eq!(spread.release_at(end + share, &nairobi, "k"), None);
        let later = end + Duration::from_secs(1801);
        assert_eq!(spread.release_at(later, &nairobi, "k"), None);
    }

    #[test]
    fn outside_the_window_a_message_goes_now() {
        let nairobi = [zone("Africa/Nairobi")];
        for local in [
            "2026-01-15T08:00",
            "2026-01-15T12:00",
            "2026-01-15T20:59:59",
        ] {
            let now = at(local, "Africa/Nairobi");
            assert_eq!(night().release_at(now, &nairobi, "k"), None, "{local}");
        }
    }

    #[test]
    fn inside_the_window_a_message_waits_for_its_end_in_local_time() {
        let nairobi = [zone("Africa/Nairobi")];
        let morning = at("2026-01-16T08:00", "Africa/Nairobi");
        for local in [
            "2026-01-15T21:00",
            "2026-01-15T23:59",
            "2026-01-16T00:00",
            "2026-01-16T07:59:59",
        ] {
            let now = at(local, "Africa/Nairobi");
            assert_eq!(
                night().release_at(now, &nairobi, "k"),
                Some(morning),
                "{local}"
            );
        }
        // A window inside one day.
        let lunch = QuietHours::new("12:00", "14:00", Duration::ZERO).unwrap();
        let now = at("2026-01-15T13:00", "Africa/Nairobi");
        assert_eq!(
            lunch.release_at(now, &nairobi, "k"),
            Some(at("2026-01-15T14:00", "Africa/Nairobi"))
        );
        assert_eq!(
            lunch.release_at(at("2026-01-15T14:00", "Africa/Nairobi"), &nairobi, "k"),
            None
        );
    }

    #[test]
    fn a_country_of_several_zones_is_quiet_while_any_is_and_opens_when_all_are_open() {
        // 22:00 in New York is 19:00 in Los Angeles: quiet in one of them.
        let us = [zone("America/New_York"), zone("America/Los_Angeles")];
        let now = at("2026-01-15T22:00", "America/New_York");
        assert_eq!(
            night().release_at(now, &us, "k"),
            Some(at("2026-01-16T08:00", "America/Los_Angeles")),
            "open only once it is 08:00 in the westernmost zone"
        );
        // 19:00 in Los Angeles alone would go.
        assert_eq!(night().release_at(now, &us[1..], "k"), None);
        // 09:00 in New York is 06:00 in Los Angeles: still quiet there.
        let early = at("2026-01-15T09:00", "America/New_York");
        assert_eq!(
            night().release_at(early, &us, "k"),
            Some(at("2026-01-15T08:00", "America/Los_Angeles"))
        );
    }

    #[test]
    fn zones_too_far_apart_to_share_an_open_moment_are_not_held() {
        // Open 09:00-12:00 in each: zones six hours apart never share an
        // open moment. (With 21:00-08:00, open 13 hours, any two do.)
        let long = QuietHours::new("12:00", "09:00", Duration::ZERO).unwrap();
        let apart = [zone("UTC"), zone("Asia/Dhaka")];
        let mut now = at("2026-01-15T00:00", "UTC");
        for _ in 0..48 {
            assert_eq!(long.release_at(now, &apart, "k"), None);
            now += Duration::from_secs(1800);
        }
        assert_eq!(
            long.release_at(at("2026-01-15T13:00", "UTC"), &apart[..1], "k"),
            Some(at("2026-01-16T09:00", "UTC")),
            "one of them alone opens"
        );
        assert_eq!(
            night().release_at(
                at("2026-01-15T23:00", "UTC"),
                &[zone("Pacific/Kiritimati"), zone("UTC")],
                "k"
            ),
            Some(at("2026-01-16T18:00", "UTC")),
            "open at 08:00 UTC, but it is 22:00 at +14 then: open in both at 18:00 UTC"
        );
    }

    #[test]
    fn the_window_follows_clock_changes() {
        // London goes to summer time at 01:00 UTC on 2026-03-29: 08:00
        // local is then 07:00 UTC.
        let london = [zone("Europe/London")];
        let now = at("2026-03-28T23:00", "Europe/London");
        let released = night().release_at(now, &london, "k").unwrap();
        assert_eq!(released, at("2026-03-29T07:00", "UTC"));
        // An end inside the skipped hour is taken just after the gap.
        let gap = QuietHours::new("00:30", "01:30", Duration::ZERO).unwrap();
        let now = at("2026-03-29T00:45", "Europe/London");
        assert_eq!(
            gap.release_at(now, &london, "k"),
            Some(at("2026-03-29T01:30", "UTC"))
        );
    }

    #[test]
    fn held_messages_are_spread_by_key_and_every_delivery_agrees() {
        let spread = Duration::from_secs(600);
        let hours = QuietHours::new("21:00", "08:00", spread).unwrap();
        let nairobi = [zone("Africa/Nairobi")];
        let morning = at("2026-01-16T08:00", "Africa/Nairobi");
        let now = at("2026-01-15T23:00", "Africa/Nairobi");
        let releases: Vec<SystemTime> = (0..200)
            .map(|i| {
                hours
                    .release_at(now, &nairobi, &format!("key-{i}"))
                    .unwrap()
            })
            .collect();
        assert!(releases
            .iter()
            .all(|r| *r >= morning && *r < morning + spread));
        let early = releases
            .iter()
            .filter(|r| **r < morning + spread / 2)
            .count();
        assert!(
            (60..140).contains(&early),
            "about half in the first half: {early}"
        );
        // A redelivery an hour later, or one a second before the end
        // (another instance's clock), agrees.
        for later in [
            now + Duration::from_secs(3600),
            morning - Duration::from_secs(1),
        ] {
            assert_eq!(
                hours.release_at(later, &nairobi, "key-7"),
                Some(releases[7])
            );
        }
        // Back at the window's end (its last hold queue ends there), it
        // still waits for its share; at its share it goes.
        let own = releases[7];
        if own > morning {
            assert_eq!(hours.release_at(morning, &nairobi, "key-7"), Some(own));
        }
        assert_eq!(hours.release_at(own, &nairobi, "key-7"), None);
    }

    #[test]
    fn a_number_without_a_zone_is_never_held() {
        assert_eq!(
            night().release_at(at("2026-01-15T23:00", "UTC"), &[], "k"),
            None
        );
    }
}
