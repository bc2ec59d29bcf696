//! Traces: a span per RPC (and per consumed Kafka message), with the engine's
//! steps under it — queue, journal + apply, WAL sync, reply — exported by
//! OpenTelemetry OTLP (gRPC) when `--otlp-endpoint` is set.
//!
//! Off by default, and then free: nothing below is reached but one relaxed
//! atomic load per RPC, and the engine sees `None` where a trace would be.
//!
//! The engine never makes spans. A traced request carries a [`Trace`]; the
//! writer stamps on it when its command was applied and when its batch was
//! synced (a few clock reads, only for traced requests), and the handler,
//! once the durable reply is back, turns the stamps into child spans with
//! those times. A W3C `traceparent` from gRPC metadata or a Kafka header
//! continues the caller's trace; the account events a traced command
//! causes carry the trace in their own `traceparent` header.

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The instrumentation scope of every span of the service.
pub const SCOPE: &str = "account-service";

/// Whether traces are exported (`--otlp-endpoint`).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The W3C trace context of one span: what a `traceparent` header holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` (version 00; all-zero ids are
    /// invalid). Anything else is `None`: a bad header starts a new trace.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|&t| t != 0)?;
        let span_id = u64::from_str_radix(span, 16).ok().filter(|&s| s != 0)?;
        let flags = u8::from_str_radix(flags, 16)
            .ok()
            .filter(|_| flags.len() == 2)?;
        Some(TraceParent {
            trace_id: trace_id.to_be_bytes(),
            span_id: span_id.to_be_bytes(),
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` header for this span.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            u128::from_be_bytes(self.trace_id),
            u64::from_be_bytes(self.span_id),
            u8::from(self.sampled)
        )
    }

    /// The span of `cx`, if it has a valid one.
    pub fn of(cx: &Context) -> Option<TraceParent> {
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| TraceParent {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            sampled: sc.is_sampled(),
        })
    }

    /// A context whose (remote) parent span is this one.
    pub fn context(&self) -> Context {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            flags,
            true,
            TraceState::default(),
        ))
    }
}

/// Unix nanoseconds now (0 is "not stamped").
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// A traced request's passage through the engine, stamped by the writer.
#[derive(Debug)]
pub struct Trace {
    /// The span the engine's steps belong under (the RPC's, or the consumed
    /// message's); also the parent in the events' `traceparent`.
    pub parent: TraceParent,
    submitted: AtomicU64,
    apply_start: AtomicU64,
    apply_end: AtomicU64,
    sync_start: AtomicU64,
    sync_end: AtomicU64,
    batch: AtomicU64,
}

impl Trace {
    pub fn new(parent: TraceParent) -> Arc<Trace> {
        Arc::new(Trace {
            parent,
            submitted: AtomicU64::new(0),
            apply_start: AtomicU64::new(0),
            apply_end: AtomicU64::new(0),
            sync_start: AtomicU64::new(0),
            sync_end: AtomicU64::new(0),
            batch: AtomicU64::new(0),
        })
    }

    /// The request entered the engine's queue.
    pub fn submitted(&self) {
        self.submitted.store(now_ns(), Ordering::Relaxed);
    }

    /// The writer starts journaling and applying the request's command(s).
    pub fn apply_started(&self) {
        self.apply_start.store(now_ns(), Ordering::Relaxed);
    }

    pub fn apply_ended(&self) {
        self.apply_end.store(now_ns(), Ordering::Relaxed);
    }

    /// The group commit that made it durable, shared by `batch` requests.
    /// Stamped before the reply is sent: the reply's channel orders these
    /// stores before the handler's loads.
    pub fn synced(&self, start_ns: u64, end_ns: u64, batch: usize) {
        self.sync_start.store(start_ns, Ordering::Relaxed);
        self.sync_end.store(end_ns, Ordering::Relaxed);
        self.batch.store(batch as u64, Ordering::Relaxed);
    }

    /// The engine's steps as child spans of `parent`, the last ending now
    /// (the handler has the reply). A step not stamped (a request refused
    /// before the writer, or replied before its sync in async durability)
    /// is left out.
    pub fn emit(&self, parent: &Context) {
        let replied = now_ns();
        let tracer = opentelemetry::global::tracer_provider().tracer(SCOPE);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (submitted, apply_start, apply_end) = (
            load(&self.submitted),
            load(&self.apply_start),
            load(&self.apply_end),
        );
        let (sync_start, sync_end) = (load(&self.sync_start), load(&self.sync_end));
        let span = |name: &'static str, start: u64, end: u64, attributes: Vec<KeyValue>| {
            if start == 0 || end < start {
                return;
            }
            let mut span = tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .with_start_time(time(start))
                .with_attributes(attributes)
                .start_with_context(&tracer, parent);
            opentelemetry::trace::Span::end_with_timestamp(&mut span, time(end));
        };
        span("engine.queue", submitted, apply_start, Vec::new());
        span("engine.apply", apply_start, apply_end, Vec::new());
        let batch = load(&self.batch) as i64;
        span(
            "wal.sync",
            sync_start,
            sync_end,
            vec![KeyValue::new("engine.batch_requests", batch)],
        );
        let reply_from = if sync_end != 0 { sync_end } else { apply_end };
        span("engine.reply", reply_from, replied, Vec::new());
    }
}

tokio::task_local! {
    /// The trace of the RPC being handled on this task.
    static CURRENT: Arc<Trace>;
}

/// The trace of the RPC this task handles, if traces are on and it has one.
#[inline]
pub fn current() -> Option<Arc<Trace>> {
    if !enabled() {
        return None;
    }
    CURRENT.try_with(|t| t.clone()).ok()
}

/// Runs `work` (an RPC's handler) with `trace` as the task's [`current`].
pub async fn scope<F: std::future::Future>(trace: Arc<Trace>, work: F) -> F::Output {
    CURRENT.scope(trace, work).await
}

/// A span for one consumed Kafka message, continuing its `traceparent`
/// header, ended at once (the message's journaling is asynchronous to the
/// consumer); returns the [`Trace`] its command carries.
pub fn consumed(topic: &str, partition: i32, offset: i64, header: Option<&str>) -> Arc<Trace> {
    let tracer = opentelemetry::global::tracer_provider().tracer(SCOPE);
    let parent = header
        .and_then(TraceParent::parse)
        .map_or_else(Context::new, |p| p.context());
    let mut span = tracer
        .span_builder(format!("{topic} process"))
        .with_kind(SpanKind::Consumer)
        .with_attributes(vec![
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.destination.name", topic.to_owned()),
            KeyValue::new("messaging.kafka.partition", i64::from(partition)),
            KeyValue::new("messaging.kafka.offset", offset),
        ])
        .start_with_context(&tracer, &parent);
    let sc = opentelemetry::trace::Span::span_context(&span).clone();
    opentelemetry::trace::Span::end(&mut span);
    let trace = Trace::new(TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        sampled: sc.is_sampled(),
    });
    trace.submitted();
    trace
}

/// The exporter and the tracer of the service, installed globally; keep it
/// until the end and [`Telemetry::shutdown`] it to flush what is buffered.
pub struct Telemetry {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--otlp-endpoint {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("--otlp-sample-ratio {0}: a fraction from 0 to 1")]
    Ratio(f64),
}

impl Telemetry {
    /// Exports spans by OTLP/gRPC to `endpoint` (`http://host:4317`). Root
    /// traces are sampled at `sample_ratio`; a caller's sampling decision
    /// (its `traceparent` flag) is followed. Call inside the Tokio runtime
    /// the service runs on: the exporter's batches are sent from it.
    pub fn init(endpoint: &str, sample_ratio: f64) -> Result<Telemetry, TelemetryError> {
        use opentelemetry_otlp::WithExportConfig;
        use opentelemetry_sdk::trace::{
            span_processor_with_async_runtime::BatchSpanProcessor, BatchConfigBuilder, Sampler,
        };
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(TelemetryError::Ratio(sample_ratio));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| TelemetryError::Exporter {
                endpoint: endpoint.to_owned(),
                reason: e.to_string(),
            })?;
        let batches = BatchConfigBuilder::default()
            .with_max_queue_size(65_536)
            .with_scheduled_delay(Duration::from_millis(500))
            .build();
        let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_batch_config(batches)
            .build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(SCOPE)
                    .build(),
            )
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        ENABLED.store(true, Ordering::Relaxed);
        Ok(Telemetry { provider })
    }

    /// The tracer the `tracing` layer records RPC spans with.
    pub fn tracer(&self) -> opentelemetry_sdk::trace::SdkTracer {
        self.provider.tracer(SCOPE)
    }

    /// Exports what is buffered, then stops the exporter.
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "trace exporter shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_refuses_what_w3c_refuses() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(header).unwrap();
        assert!(parsed.sampled);
        assert_eq!(parsed.header(), header);
        assert_eq!(TraceParent::of(&parsed.context()), Some(parsed));
        let unsampled =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert!(!unsampled.unwrap().sampled);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
