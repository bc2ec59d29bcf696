//! Counters and HDR histograms shared by the request tasks, and the one-line
//! JSON summary. Only `ok` and `rejected` calls enter the latency histogram;
//! errors, timeouts and overload are counted apart, never folded in.

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// gRPC OK and `RESULT_OK`.
    Ok,
    /// gRPC OK with a business result other than OK.
    Rejected,
    /// `RESOURCE_EXHAUSTED`: the service shed the load.
    Overloaded,
    /// Any other gRPC error, a timeout, or the in-flight cap.
    Error,
}

pub struct Recorder {
    histogram: Mutex<Histogram<u64>>,
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub rejected: AtomicU64,
    pub overloaded: AtomicU64,
    pub errors: AtomicU64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            // 1 µs .. 60 s, 3 significant figures.
            histogram: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            ),
            sent: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }
}

impl Recorder {
    /// Records one finished call; `latency` runs from the intended send time.
    pub fn record(&self, class: Class, latency: Duration) {
        let counter = match class {
            Class::Ok => &self.ok,
            Class::Rejected => &self.rejected,
            Class::Overloaded => &self.overloaded,
            Class::Error => &self.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if matches!(class, Class::Ok | Class::Rejected) {
            let us = latency.as_micros().clamp(1, 60_000_000) as u64;
            if let Ok(mut h) = self.histogram.lock() {
                h.saturating_record(us);
            }
        }
    }

    pub fn histogram(&self) -> Histogram<u64> {
        self.histogram
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    pub fn p99_us(&self) -> u64 {
        self.histogram
            .lock()
            .map(|h| h.value_at_quantile(0.99))
            .unwrap_or(0)
    }

    pub fn count(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// The design-4.3 summary, plus extra keys after the standard ones.
    pub fn summary(&self, mode: &str, target_rate: f64, duration: Duration) -> Value {
        let h = self.histogram();
        let ok = self.count(&self.ok);
        let rejected = self.count(&self.rejected);
        let secs = duration.as_secs_f64().max(1e-9);
        json!({
            "mode": mode,
            "target_rate": target_rate,
            "sent": self.count(&self.sent),
            "ok": ok,
            "rejected": rejected,
            "errors": self.count(&self.errors) + self.count(&self.overloaded),
            "throughput": ((ok + rejected) as f64 / secs * 10.0).round() / 10.0,
            "latency_us": latency_json(&h),
            "overloaded": self.count(&self.overloaded),
            "duration_s": (secs * 1000.0).round() / 1000.0,
        })
    }
}

pub fn latency_json(h: &Histogram<u64>) -> Value {
    json!({
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_stay_out_of_the_latency_figures() {
        let r = Recorder::default();
        r.sent.store(4, Ordering::Relaxed);
        r.record(Class::Ok, Duration::from_micros(100));
        r.record(Class::Rejected, Duration::from_micros(300));
        r.record(Class::Error, Duration::from_secs(9));
        r.record(Class::Overloaded, Duration::from_secs(9));
        let s = r.summary("reserve", 10.0, Duration::from_secs(2));
        assert_eq!(s["ok"], 1);
        assert_eq!(s["rejected"], 1);
        assert_eq!(s["errors"], 2);
        assert_eq!(s["overloaded"], 1);
        assert_eq!(s["throughput"], 1.0);
        let max = s["latency_us"]["max"].as_u64().unwrap();
        assert!((299..=301).contains(&max), "{max}");
        assert!(s["latency_us"]["p50"].as_u64().unwrap() <= max);
    }
}
