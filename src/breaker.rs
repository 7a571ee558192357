//! A circuit breaker on the provider. After `threshold` transient failures
//! in a row it opens: the processing loop stops taking new commands and
//! commands already in hand are handed to a delay tier without a call, so
//! no attempts are burnt on a dead provider. After the cool-down one probe
//! is let through (half-open); its success closes the breaker, its failure
//! opens it again. A probe that brings no answer within a cool-down (it made
//! no provider call: a duplicate, an invalid command) is followed by another.
//! Rejections (4xx) are answers, so they count as success.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
        }
    }
}

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe is out; everything else waits for its answer until `until`.
    HalfOpen {
        until: Instant,
    },
}

impl State {
    fn kind(&self) -> BreakerState {
        match self {
            Self::Closed { .. } => BreakerState::Closed,
            Self::Open { .. } => BreakerState::Open,
            Self::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[derive(Debug)]
pub struct CircuitBreaker {
    /// The provider instance, in logs and the `sms_circuit_state` label.
    name: String,
    threshold: u32,
    cool_down: Duration,
    state: Mutex<State>,
    changed: Notify,
}

impl CircuitBreaker {
    /// `threshold` 0 disables the breaker.
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self::named("generic", threshold, cool_down)
    }

    /// The breaker of the provider instance `name`.
    pub fn named(name: &str, threshold: u32, cool_down: Duration) -> Self {
        metrics::gauge!("sms_circuit_state", "provider" => name.to_owned()).set(0.0);
        Self {
            name: name.to_owned(),
            threshold,
            cool_down,
            state: Mutex::new(State::Closed { failures: 0 }),
            changed: Notify::new(),
        }
    }

    pub fn state(&self) -> BreakerState {
        self.lock().kind()
    }

    /// How long the breaker stays open yet, if it is open or probing.
    /// Whether it stops a call now: open, with its cool-down not over.
    pub fn blocks(&self) -> bool {
        matches!(*self.lock(), State::Open { until } if until > Instant::now())
    }

    pub fn open_for(&self) -> Option<Duration> {
        match *self.lock() {
            State::Open { until } => Some(until.saturating_duration_since(Instant::now())),
            State::HalfOpen { .. } => Some(self.cool_down),
            State::Closed { .. } => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, state: &mut State, next: State) {
        let before = std::mem::replace(state, next).kind();
        let after = state.kind();
        if before != after {
            metrics::gauge!("sms_circuit_state", "provider" => self.name.clone())
                .set(after.gauge());
            let provider = self.name.as_str();
            match after {
                BreakerState::Open => {
                    warn!(provider, cool_down = ?self.cool_down, "provider circuit open")
                }
                BreakerState::HalfOpen => info!(provider, "provider circuit half-open: probing"),
                BreakerState::Closed => info!(provider, "provider circuit closed"),
            }
        }
        self.changed.notify_waiters();
    }

    /// A provider call ended with an answer (accepted or rejected).
    pub fn record_success(&self) {
        let mut state = self.lock();
        if !matches!(*state, State::Closed { failures: 0 }) {
            self.set(&mut state, State::Closed { failures: 0 });
        }
    }

    /// A provider call failed transiently.
    pub fn record_failure(&self) {
        if self.threshold == 0 {
            return;
        }
        let mut state = self.lock();
        let next = match *state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            // Still cooling down: stays open as it was. Past its cool-down
            // (a call went through without the half-open step, as happens
            // to an instance the processing loop did not probe): open again.
            State::Open { until } if until > Instant::now() => State::Open { until },
            _ => State::Open {
                until: Instant::now() + self.cool_down,
            },
        };
        self.set(&mut state, next);
    }

    /// Waits until a new command may be taken: at once while closed; while
    /// open, until the cool-down ends, and then only the one probe.
    /// Opens the breaker at once, whatever the count (an account problem:
    /// every call would fail the same way). Logged at error when it opens.
    pub fn trip(&self, detail: &str) {
        let mut state = self.lock();
        if matches!(*state, State::Open { until } if until > Instant::now()) {
            return;
        }
        tracing::error!(provider = self.name.as_str(), %detail, "provider account problem: its circuit opens");
        let until = Instant::now() + self.cool_down;
        self.set(&mut state, State::Open { until });
    }

    pub async fn admit(&self) {
        loop {
            let notified = self.changed.notified();
            let wait = {
                let mut state = self.lock();
                match *state {
                    State::Closed { .. } => return,
                    State::Open { until } | State::HalfOpen { until }
                        if until <= Instant::now() =>
                    {
                        let until = Instant::now() + self.cool_down;
                        self.set(&mut state, State::HalfOpen { until });
                        return;
                    }
                    State::Open { until } | State::HalfOpen { until } => until,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wait) => {}
                _ = notified => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failure_after_the_cool_down_opens_it_again_even_without_a_probe() {
        let breaker = CircuitBreaker::new(2, Duration::from_secs(10));
        breaker.record_failure();
        breaker.record_failure();
        assert!(breaker.blocks());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!breaker.blocks(), "past its cool-down a call goes through");
        // That call fails: open again for a whole cool-down, not for ever
        // letting calls through.
        breaker.record_failure();
        assert!(breaker.blocks(), "the failed probe did not reopen it");
        tokio::time::advance(Duration::from_secs(11)).await;
        breaker.trip("no credit");
        assert!(breaker.blocks(), "an account problem after the cool-down");
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_probes_after_the_cool_down() {
        let breaker = CircuitBreaker::new(3, Duration::from_secs(10));
        breaker.record_failure();
        breaker.record_failure();
        breaker.record_success();
        breaker.record_failure();
        breaker.record_failure();
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "a success resets the count"
        );
        breaker.record_failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        let started = Instant::now();
        breaker.admit().await;
        assert!(started.elapsed() >= Duration::from_secs(10));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        // The probe fails: open again.
        breaker.record_failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        breaker.admit().await;
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.admit().await;
    }

    #[tokio::test(start_paused = true)]
    async fn while_half_open_others_wait_for_the_probe() {
        let breaker = std::sync::Arc::new(CircuitBreaker::new(1, Duration::from_secs(10)));
        breaker.record_failure();
        breaker.admit().await; // the probe
        let waiter = tokio::spawn({
            let breaker = breaker.clone();
            async move { breaker.admit().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished());
        breaker.record_success();
        waiter.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_answers_is_followed_by_another() {
        let breaker = CircuitBreaker::new(1, Duration::from_secs(2));
        breaker.record_failure();
        breaker.admit().await; // the probe, which makes no provider call
        let started = Instant::now();
        breaker.admit().await; // so another goes after a cool-down
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn a_zero_threshold_never_opens() {
        let breaker = CircuitBreaker::new(0, Duration::from_secs(1));
        for _ in 0..100 {
            breaker.record_failure();
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
