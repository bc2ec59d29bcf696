//! Per-caller rate limits (design 4.4): a token bucket per caller,
//! `--rate-limit-rps` sustained and `--rate-limit-burst` at once. A call over
//! its caller's rate gets `RESOURCE_EXHAUSTED` with a `retry-after-ms`
//! trailer before anything is journaled, so one flooding caller cannot take
//! the ingress queue from the others.
//!
//! The bucket is GCRA on one atomic per caller (the "theoretical arrival
//! time" in ns): an admission is one compare-and-swap, no lock per call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Calls per second, sustained.
    pub rps: u32,
    /// Calls admitted at once after a quiet spell (>= 1).
    pub burst: u32,
}

/// Every caller's bucket. The callers are known at start (the tokens file,
/// or `anonymous`), so the map is never written after it is built.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    epoch: Instant,
    /// Nanoseconds one call costs.
    interval_ns: u64,
    /// How far ahead of now the arrival time may run: the burst.
    tolerance_ns: u64,
    buckets: HashMap<&'static str, AtomicU64>,
}

impl Limits {
    /// `None`: no limit.
    pub fn new(
        limit: Option<RateLimit>,
        callers: impl IntoIterator<Item = &'static str>,
    ) -> Limits {
        let Some(limit) = limit else {
            return Limits::default();
        };
        assert!(limit.rps > 0 && limit.burst > 0, "a limit admits something");
        let interval_ns = 1_000_000_000 / u64::from(limit.rps);
        Limits {
            inner: Some(Arc::new(Inner {
                epoch: Instant::now(),
                interval_ns,
                tolerance_ns: interval_ns * u64::from(limit.burst - 1),
                buckets: callers
                    .into_iter()
                    .map(|c| (c, AtomicU64::new(0)))
                    .collect(),
            })),
        }
    }

    /// Admits one call of `caller`, or says in how many ms one would be.
    pub fn admit(&self, caller: &str) -> Result<(), u64> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let Some(tat) = inner.buckets.get(caller) else {
            // A caller without a bucket was not in the tokens file: it never
            // gets this far (authentication refuses it first).
            return Ok(());
        };
        let now = inner.epoch.elapsed().as_nanos() as u64;
        let mut current = tat.load(Ordering::Acquire);
        loop {
            let start = current.max(now);
            if start > now + inner.tolerance_ns {
                let wait_ns = start - inner.tolerance_ns - now;
                return Err(wait_ns.div_ceil(1_000_000).max(1));
            }
            match tat.compare_exchange_weak(
                current,
                start + inner.interval_ns,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_caller() {
        let limits = Limits::new(Some(RateLimit { rps: 10, burst: 3 }), ["a", "b"]);
        for _ in 0..3 {
            assert_eq!(limits.admit("a"), Ok(()));
        }
        let wait = limits.admit("a").unwrap_err();
        assert!((1..=100).contains(&wait), "{wait} ms");
        // Another caller has its own bucket.
        assert_eq!(limits.admit("b"), Ok(()));
        std::thread::sleep(std::time::Duration::from_millis(wait + 5));
        assert_eq!(limits.admit("a"), Ok(()));
        assert!(Limits::new(None, ["a"]).admit("a").is_ok());
    }
}
