//! Capped exponential backoff with jitter, for retries that must go on until
//! they succeed (decision delivery, in-doubt recovery).

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    /// First delay.
    base_ms: u64,
    /// Largest delay, so a long outage is still retried at a steady pace.
    cap_ms: u64,
    /// Retries so far.
    attempt: u32,
}

impl Backoff {
    pub fn new(base_ms: u64, cap_ms: u64) -> Self {
        assert!(base_ms > 0 && cap_ms >= base_ms);
        Backoff {
            base_ms,
            cap_ms,
            attempt: 0,
        }
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The ceiling of the next delay, without jitter.
    pub fn ceiling_ms(&self) -> u64 {
        self.base_ms
            .saturating_mul(1u64 << self.attempt.min(32))
            .min(self.cap_ms)
    }

    /// The next delay: uniform in [ceiling/2, ceiling] ("equal jitter"), so
    /// retries of many transactions spread out but never collapse to zero.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    /// [`Backoff::next_delay`] with the caller's random source, so that a
    /// pure state machine can be replayed exactly in tests (a seeded RNG).
    pub fn next_delay_with(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling_ms();
        self.attempt = self.attempt.saturating_add(1);
        let low = ceiling / 2;
        Duration::from_millis(rng.random_range(low..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_and_stays_in_jitter_band() {
        let mut b = Backoff::new(10, 1000);
        let mut ceilings = vec![];
        for _ in 0..12 {
            let c = b.ceiling_ms();
            let d = b.next_delay().as_millis() as u64;
            assert!(d >= c / 2 && d <= c, "{d} outside [{}, {c}]", c / 2);
            ceilings.push(c);
        }
        assert_eq!(&ceilings[..8], &[10, 20, 40, 80, 160, 320, 640, 1000]);
        assert!(ceilings[8..].iter().all(|&c| c == 1000));
    }
}
