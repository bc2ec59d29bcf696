//! Traces against an in-process OTLP/gRPC receiver (opentelemetry-proto's
//! collector service, served here): one Reserve with the caller's
//! `traceparent` gives the span tree ingress → queue → journal + apply → WAL
//! sync → reply in the caller's trace; a Kafka message's `traceparent`
//! continues into the consumer's span and onto the AccountEvents it causes.

mod common;

use account_service::proto::account::v1 as pb;
use common::kafka::{header, produce, Broker, DEPOSITS, EVENTS};
use common::server::Server;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves on a free loopback port until the test ends; returns its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }

    /// The spans of trace `trace_id` (hex), once `names` are all among them.
    async fn wait_for(&self, trace_id: &str, names: &[&str]) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let spans: Vec<Span> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| hex(&s.trace_id) == trace_id)
                .cloned()
                .collect();
            if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "spans {names:?} of trace {trace_id} not exported; got {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span: {found:?}");
    found[0]
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            other => Some(format!("{other:?}")),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_gives_the_span_tree_in_the_callers_trace() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--otlp-endpoint", &endpoint]).await;
    common::server::open_and_fund_account_1(&server, "1000").await;

    let mut accounts = server.accounts().await;
    let mut request = tonic::Request::new(common::server::reserve_one_usd(1));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    let reply = accounts.reserve(request).await.unwrap().into_inner();
    assert_eq!(reply.result, pb::Result::Ok as i32);

    let steps = ["engine.queue", "engine.apply", "wal.sync", "engine.reply"];
    let mut names = vec!["Reserve"];
    names.extend(steps);
    let spans = receiver.wait_for(TRACE, &names).await;
    let rpc = named(&spans, "Reserve");
    assert_eq!(
        hex(&rpc.parent_span_id),
        CALLER_SPAN,
        "continues the caller's span"
    );
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    assert_eq!(attribute(rpc, "caller").as_deref(), Some("anonymous"));
    assert_eq!(attribute(rpc, "outcome").as_deref(), Some("OK"));
    let mut at = rpc.start_time_unix_nano;
    for name in steps {
        let step = named(&spans, name);
        assert_eq!(
            step.parent_span_id, rpc.span_id,
            "{name} is a child of the RPC"
        );
        assert!(
            step.start_time_unix_nano >= at && step.end_time_unix_nano >= step.start_time_unix_nano,
            "{name} follows the step before it"
        );
        assert!(
            step.end_time_unix_nano <= rpc.end_time_unix_nano,
            "{name} within the RPC"
        );
        at = step.end_time_unix_nano;
    }
    assert_eq!(
        attribute(named(&spans, "wal.sync"), "engine.batch_requests").as_deref(),
        Some("1")
    );
    assert_eq!(
        spans.len(),
        names.len(),
        "nothing else in the caller's trace: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

    // A bad traceparent starts a trace of its own, never an error.
    let mut request = tonic::Request::new(common::server::reserve_one_usd(2));
    request
        .metadata_mut()
        .insert("traceparent", "00-zz-yy-01".parse().unwrap());
    let reply = accounts.reserve(request).await.unwrap().into_inner();
    assert_eq!(reply.result, pb::Result::Ok as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_messages_traceparent_reaches_the_account_events_it_causes() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let broker = Broker::start();
    broker.create_service_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--kafka-brokers",
            &broker.bootstrap(),
        ],
    )
    .await;
    let mut admin = server.admin().await;
    admin
        .open_account(pb::OpenAccountRequest {
            request_id: "open-7".into(),
            account_id: 7,
            base_currency: "USD".into(),
        })
        .await
        .unwrap();
    let deposit = account_service::proto::events::DepositEvent {
        event_id: "dep-traced".into(),
        account_id: 7,
        amount: "25".into(),
        currency: "USD".into(),
        source: String::new(),
        timestamp: account_service::engine::now_ms(),
    };
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    let payload = prost::Message::encode_to_vec(&deposit);
    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    broker
        .producer()
        .send(
            FutureRecord::to(DEPOSITS)
                .key("7")
                .payload(&payload)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "traceparent",
                    value: Some(&traceparent),
                })),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // And one without: its event carries a trace of its own.
    let untraced = account_service::proto::events::DepositEvent {
        event_id: "dep-untraced".into(),
        ..deposit.clone()
    };
    produce(
        &broker.producer(),
        DEPOSITS,
        "7",
        &prost::Message::encode_to_vec(&untraced),
    )
    .await;

    let consumed = format!("{DEPOSITS} process");
    let spans = receiver.wait_for(TRACE, &[&consumed]).await;
    let span = named(&spans, &consumed);
    assert_eq!(hex(&span.parent_span_id), CALLER_SPAN);
    assert_eq!(span.kind, SpanKind::Consumer as i32);

    let events = broker.read_all(EVENTS, 3, Duration::from_secs(60));
    let deposited: Vec<_> = events
        .iter()
        .filter(|m| {
            let e: account_service::proto::events::AccountEvent =
                prost::Message::decode(rdkafka::message::Message::payload(*m).unwrap()).unwrap();
            e.r#type == account_service::proto::events::AccountEventType::Deposited as i32
        })
        .collect();
    assert_eq!(deposited.len(), 2, "two deposits, two events");
    let first = header(deposited[0], "traceparent").expect("the traced deposit's event has one");
    assert_eq!(
        first,
        format!("00-{TRACE}-{}-01", hex(&span.span_id)),
        "the event's parent is the consumer's span, in the producer's trace"
    );
    let second = header(deposited[1], "traceparent").expect("a trace of its own");
    assert!(!second.contains(TRACE), "{second}");
}
