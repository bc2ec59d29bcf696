//! The open-loop schedule: request `i` is due at `start + i / rate`, whatever
//! the server does. Latency is measured from that intended time, so a stall
//! shows up in every request it delays (no coordinated omission).

use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub start: Instant,
    pub rate: f64,
}

impl Schedule {
    pub fn new(start: Instant, rate: f64) -> Schedule {
        assert!(rate > 0.0, "rate > 0");
        Schedule { start, rate }
    }

    /// Intended send time of request `i`.
    pub fn due(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// Requests in `duration`.
    pub fn count(&self, duration: Duration) -> u64 {
        (duration.as_secs_f64() * self.rate).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_times_are_evenly_spaced() {
        let start = Instant::now();
        let s = Schedule::new(start, 4_000.0);
        assert_eq!(s.due(0), start);
        assert_eq!(s.due(4_000) - start, Duration::from_secs(1));
        assert_eq!(s.due(1) - start, Duration::from_micros(250));
        assert_eq!(s.count(Duration::from_secs(3)), 12_000);
    }
}
