//! The limits on calling one provider instance: its circuit breaker and
//! its send rate.

use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::breaker::CircuitBreaker;

/// Limits on the provider: the breaker and the send rate.
pub struct ProviderGuard {
    pub breaker: Arc<CircuitBreaker>,
    /// Sends per second for this instance; `None` for no limit.
    pub limiter: Option<DefaultDirectRateLimiter>,
}

impl ProviderGuard {
    pub fn new(breaker: Arc<CircuitBreaker>, max_per_second: u32) -> Self {
        let limiter = std::num::NonZeroU32::new(max_per_second)
            .map(|rate| RateLimiter::direct(Quota::per_second(rate)));
        Self { breaker, limiter }
    }

    pub fn unlimited() -> Self {
        Self::new(Arc::new(CircuitBreaker::new(0, Duration::from_secs(1))), 0)
    }

    /// Waits for a token of the send rate, if there is a limit.
    pub async fn rate_limit(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
    }

    /// Takes a token for a retry if one is there now; `false` when the
    /// rate limit says wait (a retry then goes to a delay tier rather than
    /// wait while holding the lease).
    pub fn retry_token(&self) -> bool {
        self.limiter.as_ref().is_none_or(|l| l.check().is_ok())
    }
}
