//! The retry policy: how long to wait after a transient provider failure,
//! in process or in a delay tier of the broker.

use std::time::Duration;

use backon::BackoffBuilder;

/// How provider failures are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Provider calls per key in all, across deliveries and delay tiers.
    pub max_attempts: u32,
    /// A key still failing this long after its first attempt has failed.
    pub max_age: Duration,
    /// Provider calls per delivery before handing over to a delay tier.
    pub in_process_attempts: u32,
    /// First in-process backoff step; doubles each attempt.
    pub base_delay: Duration,
    /// Longest in-process backoff step and longest in-process wait.
    pub max_delay: Duration,
    /// The broker's delay tiers; the n-th hand-over waits about `tiers[n]`.
    pub tiers: Vec<Duration>,
    /// How long to wait before requeueing when the broker failed.
    pub requeue_delay: Duration,
}

impl RetryPolicy {
    /// The in-process wait before attempt `made + 1`: full jitter over a
    /// capped exponential step, but never less than what the provider asked.
    pub fn delay(&self, made: u32, retry_after: Option<Duration>) -> Duration {
        let step = backon::ExponentialBuilder::default()
            .with_min_delay(self.base_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_max_times(made as usize)
            .build()
            .last()
            .unwrap_or(self.base_delay);
        let jittered = step.mul_f64(rand::random::<f64>());
        jittered.max(retry_after.unwrap_or_default())
    }

    /// The broker wait after `delays` earlier hand-overs: the tier's delay
    /// with jitter (half to all of it), never less than `Retry-After`.
    pub fn broker_delay(&self, delays: u32, retry_after: Option<Duration>) -> Duration {
        let tier = self
            .tiers
            .get(delays as usize)
            .or(self.tiers.last())
            .copied()
            .unwrap_or(self.max_delay);
        let jittered = tier.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        jittered.max(retry_after.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            max_age: Duration::from_secs(3600),
            in_process_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            tiers: vec![Duration::from_secs(10), Duration::from_secs(60)],
            requeue_delay: Duration::from_secs(1),
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_a_capped_exponential_and_honours_retry_after() {
        let p = policy();
        for made in 1..10 {
            let cap = (p.base_delay * 2u32.pow(made - 1)).min(p.max_delay);
            for _ in 0..50 {
                assert!(p.delay(made, None) <= cap, "attempt {made}");
            }
        }
        let waits: Vec<Duration> = (0..50).map(|_| p.delay(3, None)).collect();
        assert!(waits.iter().any(|w| *w != waits[0]), "jittered");
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(9))),
            Duration::from_secs(9)
        );
        for delays in 0..5 {
            let tier = p.tiers[(delays as usize).min(1)];
            let d = p.broker_delay(delays, None);
            assert!(d >= tier / 2 && d <= tier, "{d:?}");
        }
    }
}
