//! The limits on calling one provider instance: its circuit breaker and
//! its send rate.
//!
//! The send rate is shared by both queues, but a command of the high queue
//! goes first: commands of the command queue wait for a turn one at a
//! time, and not at all while a high command waits. So a high command
//! waits behind at most one of them, however many are waiting (the rate
//! limiter itself serves its waiters in no particular order).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Mutex, Notify};

use crate::breaker::CircuitBreaker;
use crate::ports::Lane;

/// Limits on the provider: the breaker and the send rate.
pub struct ProviderGuard {
    pub breaker: Arc<CircuitBreaker>,
    /// Sends per second for this instance; `None` for no limit.
    pub limiter: Option<DefaultDirectRateLimiter>,
    /// Held by the one command of the command queue that waits at the rate
    /// limiter; the others queue for it in order.
    normal_turn: Mutex<()>,
    /// High commands waiting at the rate limiter now.
    high_waiting: AtomicUsize,
    /// Signalled when no high command waits any more.
    high_gone: Notify,
}

/// Counts a high command as waiting while it lives.
struct HighWaiting<'a>(&'a ProviderGuard);

impl<'a> HighWaiting<'a> {
    fn enter(guard: &'a ProviderGuard) -> Self {
        guard.high_waiting.fetch_add(1, Ordering::SeqCst);
        Self(guard)
    }
}

impl Drop for HighWaiting<'_> {
    fn drop(&mut self) {
        if self.0.high_waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.high_gone.notify_waiters();
        }
    }
}

impl ProviderGuard {
    pub fn new(breaker: Arc<CircuitBreaker>, max_per_second: u32) -> Self {
        let limiter = std::num::NonZeroU32::new(max_per_second)
            .map(|rate| RateLimiter::direct(Quota::per_second(rate)));
        Self {
            breaker,
            limiter,
            normal_turn: Mutex::new(()),
            high_waiting: AtomicUsize::new(0),
            high_gone: Notify::new(),
        }
    }

    pub fn unlimited() -> Self {
        Self::new(Arc::new(CircuitBreaker::new(0, Duration::from_secs(1))), 0)
    }

    /// Waits for a token of the send rate, if there is a limit; a command
    /// of the high queue before any of the command queue's.
    pub async fn rate_limit(&self, lane: Lane) {
        let Some(limiter) = &self.limiter else {
            return;
        };
        match lane {
            Lane::High => {
                let _waiting = HighWaiting::enter(self);
                limiter.until_ready().await;
            }
            Lane::Normal => {
                let _turn = self.normal_turn.lock().await;
                loop {
                    // Made before the count is read, so that the signal of
                    // the last high command leaving cannot be missed.
                    let gone = self.high_gone.notified();
                    if self.high_waiting.load(Ordering::SeqCst) == 0 {
                        break;
                    }
                    gone.await;
                }
                limiter.until_ready().await;
            }
        }
    }

    /// Takes a token for a retry if one is there now; `false` when the
    /// rate limit says wait (a retry then goes to a delay tier rather than
    /// wait while holding the lease).
    pub fn retry_token(&self) -> bool {
        self.limiter.as_ref().is_none_or(|l| l.check().is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_high_command_gets_the_next_send_turn_however_many_others_wait() {
        // 20 turns a second, the burst used up: one turn every 50 ms.
        let guard = Arc::new(ProviderGuard::new(
            Arc::new(CircuitBreaker::new(0, Duration::from_secs(1))),
            20,
        ));
        while guard.retry_token() {}
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for i in 0..10 {
            let (guard, order) = (guard.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                guard.rate_limit(Lane::Normal).await;
                order.lock().unwrap().push(format!("normal-{i}"));
            }));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let high = {
            let (guard, order) = (guard.clone(), order.clone());
            tokio::spawn(async move {
                guard.rate_limit(Lane::High).await;
                order.lock().unwrap().push("high".to_owned());
            })
        };
        high.await.unwrap();
        for task in waiting {
            task.await.unwrap();
        }
        let order = order.lock().unwrap();
        let position = order.iter().position(|o| o == "high").unwrap();
        assert!(
            position <= 1,
            "the high command came {position}th: {order:?}"
        );
        assert_eq!(order.len(), 11);
    }

    #[tokio::test]
    async fn without_a_rate_limit_nobody_waits() {
        let guard = ProviderGuard::unlimited();
        for lane in Lane::ALL {
            tokio::time::timeout(Duration::from_millis(50), guard.rate_limit(lane))
                .await
                .expect("no wait");
        }
    }
}
