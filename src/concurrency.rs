//! An adaptive limit on commands in their send phase (claim, provider call,
//! record, publish), in the manner of TCP Vegas.
//!
//! `processing.max_in_flight` must be large for a slow provider (Little's
//! law: 5,000 sends/s at 200 ms need 1,000 calls under way) but is harmful
//! for a fast one: the commands it admits all reach the provider call at
//! once, each holding an HTTP/1.1 connection (about 40 KiB) while they queue
//! for CPU, and being queued does not make them go faster. So the send phase
//! gets its own limit that follows the provider: it grows by one for every
//! send that took no longer than [`TOLERANCE`] times the fastest send seen
//! lately (so it doubles every round trip while sends are quick), and
//! shrinks by a tenth, at most once per round trip, for a send that took
//! longer, which is queueing. So it shrinks only while fewer than about one
//! send in ten is quick: a provider whose answers merely vary (20 to 200
//! ms, say) keeps it growing, while sends queueing for CPU behind a fast
//! provider take many times their unqueued time. With a 200 ms provider it
//! climbs to `max_in_flight` within about a second; with a 1 ms one it stays
//! near the floor, where a few dozen sends at once already keep the CPU
//! busy.
//!
//! Commands wait for a slot before the rate limit and their claim, so the
//! wait never eats into a lease. Only sends that went through on their
//! first call are samples: failures and backoff say nothing about
//! queueing, and the circuit breaker deals with them.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// How long the fastest send seen stays the reference ("lately" is this
/// window and the one before it), so a provider that became slower for
/// good is measured against its new speed within two windows.
const WINDOW: Duration = Duration::from_secs(10);

/// A send counts as queued once it takes longer than this many times the
/// reference, plus [`SLACK`].
const TOLERANCE: u32 = 4;

/// For timer and scheduling noise on sub-millisecond sends.
const SLACK: Duration = Duration::from_millis(1);

/// The limit on sends under way at once.
pub struct AdaptiveLimit {
    slots: Semaphore,
    floor: usize,
    ceiling: usize,
    adaptive: bool,
    state: Mutex<State>,
    gauge: metrics::Gauge,
}

struct State {
    limit: usize,
    /// Slots to take out of use as they come back, owed by a decrease made
    /// while they were taken. The semaphore holds `limit + owed` permits.
    owed: usize,
    window_start: Instant,
    window_fastest: Option<Duration>,
    previous_fastest: Option<Duration>,
    last_decrease: Option<Instant>,
}

/// One send's slot; give it back by dropping it, or with [`Slot::sent`].
pub struct Slot<'a> {
    limit: &'a AdaptiveLimit,
    permit: Option<SemaphorePermit<'a>>,
}

impl AdaptiveLimit {
    /// Starts at `floor` and stays within `floor..=ceiling`; not adaptive,
    /// it is fixed at `ceiling`.
    pub fn new(floor: usize, ceiling: usize, adaptive: bool) -> Self {
        let ceiling = ceiling.max(1);
        let floor = floor.clamp(1, ceiling);
        let limit = if adaptive { floor } else { ceiling };
        let gauge = metrics::gauge!("sms_send_concurrency_limit");
        gauge.set(limit as f64);
        Self {
            slots: Semaphore::new(limit),
            floor,
            ceiling,
            adaptive,
            state: Mutex::new(State {
                limit,
                owed: 0,
                window_start: Instant::now(),
                window_fastest: None,
                previous_fastest: None,
                last_decrease: None,
            }),
            gauge,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Waits for a slot.
    pub async fn acquire(&self) -> Slot<'_> {
        let permit = self.slots.acquire().await.expect("never closed");
        Slot {
            limit: self,
            permit: Some(permit),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adjusts the limit for one successful send that took `took`, the
    /// slot being still taken.
    fn sample(&self, took: Duration) {
        if !self.adaptive {
            return;
        }
        let now = Instant::now();
        let mut s = self.lock();
        let age = now.duration_since(s.window_start);
        if age >= WINDOW {
            // After a longer pause the last window's fastest is stale too.
            s.previous_fastest = s.window_fastest.take().filter(|_| age < WINDOW * 2);
            s.window_start = now;
        }
        let window_fastest = s.window_fastest.map_or(took, |f| f.min(took));
        s.window_fastest = Some(window_fastest);
        let fastest = s
            .previous_fastest
            .map_or(window_fastest, |f| f.min(window_fastest));
        if took <= fastest * TOLERANCE + SLACK {
            // Quick: grow, but only while the limit is what holds sends back.
            let taken = s.limit + s.owed - self.slots.available_permits();
            if s.limit < self.ceiling && taken * 2 >= s.limit {
                s.limit += 1;
                if s.owed > 0 {
                    s.owed -= 1;
                } else {
                    self.slots.add_permits(1);
                }
            }
        } else if s
            .last_decrease
            .is_none_or(|at| now.duration_since(at) >= took)
        {
            let lower = (s.limit - (s.limit / 10).max(1)).max(self.floor);
            if lower < s.limit {
                let cut = s.limit - lower;
                s.limit = lower;
                s.last_decrease = Some(now);
                s.owed += cut - self.slots.forget_permits(cut);
            }
        }
        self.gauge.set(s.limit as f64);
    }

    fn release(&self, permit: SemaphorePermit<'_>) {
        let mut s = self.lock();
        if s.owed > 0 {
            s.owed -= 1;
            permit.forget();
        } else {
            drop(permit);
        }
    }
}

impl Slot<'_> {
    /// Gives the slot back after a successful send whose send phase took
    /// `took`.
    pub fn sent(self, took: Duration) {
        self.limit.sample(took);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.limit.release(permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holds `n` slots for `took`, then counts each as sent before giving
    /// any back: as under a backlog, where a slot given back is taken again
    /// at once, every sample sees the limit in full use.
    async fn round(limit: &AdaptiveLimit, n: usize, took: Duration) {
        let mut slots = Vec::new();
        for _ in 0..n {
            slots.push(limit.acquire().await);
        }
        tokio::time::sleep(took).await;
        for _ in &slots {
            limit.sample(took);
        }
        drop(slots);
    }

    /// `count` rounds, each with every slot of the limit taken.
    async fn full_rounds(limit: &AdaptiveLimit, count: usize, took: Duration) {
        for _ in 0..count {
            let n = limit.limit();
            round(limit, n, took).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_provider_lets_the_limit_climb_to_the_ceiling_within_rounds() {
        let limit = AdaptiveLimit::new(16, 2048, true);
        let mut rounds = 0;
        while limit.limit() < 2048 {
            let n = limit.limit();
            round(&limit, n, Duration::from_millis(200)).await;
            rounds += 1;
            assert!(
                rounds <= 8,
                "limit only {} after {rounds} rounds",
                limit.limit()
            );
        }
        assert_eq!(limit.slots.available_permits(), 2048);
    }

    #[tokio::test(start_paused = true)]
    async fn sends_that_queue_shrink_the_limit_to_the_floor_once_per_round_trip() {
        let limit = AdaptiveLimit::new(16, 1024, true);
        full_rounds(&limit, 6, Duration::from_millis(2)).await;
        let top = limit.limit();
        assert!(top > 64, "grew to {top}");
        // Ten times slower: each round of sends is one decrease, not one per send.
        round(&limit, top, Duration::from_millis(20)).await;
        assert_eq!(limit.limit(), top - top / 10);
        full_rounds(&limit, 60, Duration::from_millis(20)).await;
        assert_eq!(limit.limit(), 16);
        assert_eq!(limit.slots.available_permits(), 16);
    }

    #[tokio::test(start_paused = true)]
    async fn a_decrease_while_slots_are_taken_is_paid_as_they_come_back() {
        let limit = AdaptiveLimit::new(10, 100, true);
        full_rounds(&limit, 5, Duration::from_millis(5)).await;
        let top = limit.limit();
        let mut slots = Vec::new();
        for _ in 0..top {
            slots.push(limit.acquire().await);
        }
        assert_eq!(limit.slots.available_permits(), 0);
        slots.pop().expect("one").sent(Duration::from_millis(100));
        let lowered = limit.limit();
        assert_eq!(lowered, top - top / 10);
        drop(slots);
        assert_eq!(limit.slots.available_permits(), lowered);
        assert_eq!(limit.lock().owed, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_that_became_slower_for_good_is_measured_by_its_new_speed() {
        let limit = AdaptiveLimit::new(8, 4096, true);
        full_rounds(&limit, 4, Duration::from_millis(1)).await;
        // From 1 ms to 300 ms: it shrinks first, then the old reference ages out.
        let mut lowest = usize::MAX;
        for _ in 0..200 {
            let n = limit.limit();
            round(&limit, n, Duration::from_millis(300)).await;
            lowest = lowest.min(limit.limit());
        }
        assert_eq!(lowest, 8);
        assert_eq!(limit.limit(), 4096);
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_whose_answers_vary_widely_keeps_the_limit_growing() {
        let limit = AdaptiveLimit::new(16, 2048, true);
        // Answers spread evenly over 20..200 ms, the same spread every round.
        let took = |i: usize| Duration::from_millis(20 + (i as u64 * 37) % 181);
        for _ in 0..30 {
            let slots: Vec<_> =
                futures_util::future::join_all((0..limit.limit()).map(|_| limit.acquire())).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            for i in 0..slots.len() {
                limit.sample(took(i));
            }
        }
        assert_eq!(limit.limit(), 2048);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_long_pause_sends_are_measured_by_their_speed_since() {
        let limit = AdaptiveLimit::new(8, 1024, true);
        full_rounds(&limit, 3, Duration::from_millis(1)).await;
        let before = limit.limit();
        tokio::time::sleep(WINDOW * 3).await;
        // 50 ms is slow next to 1 ms, but that was long ago.
        full_rounds(&limit, 2, Duration::from_millis(50)).await;
        assert!(limit.limit() > before, "{} after {before}", limit.limit());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_limit_does_not_grow_and_a_fixed_one_never_moves() {
        let limit = AdaptiveLimit::new(16, 1024, true);
        for _ in 0..100 {
            round(&limit, 1, Duration::from_millis(1)).await;
        }
        assert_eq!(limit.limit(), 16);
        let fixed = AdaptiveLimit::new(16, 1024, false);
        round(&fixed, 1000, Duration::from_secs(5)).await;
        round(&fixed, 1000, Duration::from_millis(1)).await;
        assert_eq!(fixed.limit(), 1024);
        assert_eq!(fixed.slots.available_permits(), 1024);
    }
}
