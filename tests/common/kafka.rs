//! A real Kafka-compatible broker (tansu, sqlite storage) for the Kafka tests:
//! started on a free loopback port in a temp dir, killed on drop (also when the
//! test panics). No mocks: the service talks to it through librdkafka.
//!
//! tansu must be installed (`.ci/run` does it: `cargo install tansu --locked
//! --features libsql,dynostore`); without it the tests fail and say so.

use account_service::proto::events;
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const FILLS: &str = "trading.fills";
pub const DEPOSITS: &str = "payment.deposits";
pub const WITHDRAWALS: &str = "payment.withdrawals";
pub const EVENTS: &str = "trading.account.events";

pub struct Broker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
}

fn tansu_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("tansu"))
            .find(|p| p.is_file())
    });
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|h| h.join("bin").join("tansu"))
        .filter(|p| p.is_file());
    on_path.or(cargo_home).unwrap_or_else(|| {
        panic!(
            "the Kafka tests need the tansu broker and it is not installed: \
             run `cargo install tansu --locked --features libsql,dynostore` (as .ci/run does)"
        )
    })
}

impl Broker {
    /// Starts tansu and waits until it answers metadata requests.
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = super::server::free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("broker.log")).unwrap();
        let child = Command::new(tansu_binary())
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tansu");
        let mut broker = Broker {
            child: Some(child),
            dir,
            port,
        };
        broker.wait_ready();
        broker
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let consumer: BaseConsumer = self.client_config().create().unwrap();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tansu exited early ({status}): {}", self.log());
            }
            if consumer
                .fetch_metadata(None, Duration::from_millis(500))
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tansu not ready in 30 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap());
        c
    }

    /// Creates topics (and waits until their metadata shows every partition).
    pub async fn create_topics(&self, topics: &[(&str, i32)]) {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create().unwrap();
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        let results = admin
            .create_topics(
                &new,
                &AdminOptions::new()
                    .operation_timeout(Some(Timeout::After(Duration::from_secs(10)))),
            )
            .await
            .expect("create topics");
        for r in results {
            r.unwrap_or_else(|(topic, e)| panic!("create topic {topic}: {e}"));
        }
        let consumer: BaseConsumer = self.client_config().create().unwrap();
        for (name, partitions) in topics {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let seen = consumer
                    .fetch_metadata(Some(name), Duration::from_secs(2))
                    .map(|m| m.topics().first().map_or(0, |t| t.partitions().len()))
                    .unwrap_or(0);
                if seen == *partitions as usize {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "topic {name} has {seen} partitions"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The service's inbound and outbound topics and their dead-letter queues.
    pub async fn create_service_topics(&self, partitions: i32) {
        self.create_topics(&[
            (FILLS, partitions),
            (DEPOSITS, partitions),
            (WITHDRAWALS, partitions),
            (EVENTS, partitions),
            ("trading.fills.dlq", 1),
            ("payment.deposits.dlq", 1),
            ("payment.withdrawals.dlq", 1),
        ])
        .await;
    }

    pub fn producer(&self) -> FutureProducer {
        self.client_config()
            .set("linger.ms", "1")
            .set("message.timeout.ms", "30000")
            .create()
            .unwrap()
    }

    /// SIGSTOP: the broker stops answering (an outage without a restart).
    pub fn pause(&self) {
        signal("-STOP", &self.pid());
    }

    pub fn resume(&self) {
        signal("-CONT", &self.pid());
    }

    /// Every message of `topic` (all partitions, from the beginning): reads
    /// until at least `at_least` arrived and nothing new came for a second,
    /// or until `timeout`.
    pub fn read_all(&self, topic: &str, at_least: usize, timeout: Duration) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", "test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut last_new = Instant::now();
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    out.push(m.detach());
                    last_new = Instant::now();
                }
                Some(Err(e)) => eprintln!("read_all {topic}: {e}"),
                None => {
                    if out.len() >= at_least && last_new.elapsed() > Duration::from_secs(1) {
                        break;
                    }
                }
            }
        }
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped process must be continued to die promptly.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(sig: &str, pid: &str) {
    let status = Command::new("kill").args([sig, pid]).status().unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// Produces one message keyed by account id; returns (partition, offset).
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> (i32, i64) {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .map(|d| (d.partition, d.offset))
        .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"))
}

/// A header's value as text.
pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Reads one metric's value (sum over its label sets) from `/metrics`.
pub fn metric(port: u16, name: &str) -> f64 {
    metrics_text(port)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn metrics_text(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A BUY or SELL fill of `qty` ACME at `price` (filled amount exact).
pub fn fill(
    event_id: &str,
    account_id: i64,
    side: &str,
    qty: &str,
    price: &str,
) -> events::FillEvent {
    let amount = account_service::domain::amount::round(super::d(qty) * super::d(price));
    events::FillEvent {
        event_id: event_id.into(),
        order_id: format!("ord-{event_id}"),
        account_id,
        symbol: "ACME".into(),
        side: side.into(),
        quantity: qty.into(),
        fill_price: price.into(),
        filled_amount: account_service::domain::amount::format(amount),
        timestamp: account_service::engine::now_ms(),
        currency: String::new(),
    }
}

/// The account events of `messages`, with their keys.
pub fn account_events(messages: &[OwnedMessage]) -> Vec<(String, events::AccountEvent)> {
    messages
        .iter()
        .map(|m| {
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            let e = events::AccountEvent::decode(m.payload().unwrap()).unwrap();
            (key, e)
        })
        .collect()
}

/// A republished event is the same event: same id, same content.
pub fn assert_duplicates_identical(
    events: &[(String, events::AccountEvent)],
) -> HashMap<String, events::AccountEvent> {
    let mut by_id: HashMap<String, events::AccountEvent> = HashMap::new();
    for (key, e) in events {
        assert_eq!(key, &e.account_id.to_string(), "keyed by account_id");
        if let Some(seen) = by_id.get(&e.event_id) {
            assert_eq!(seen, e, "a duplicate event_id must be the same event");
        } else {
            by_id.insert(e.event_id.clone(), e.clone());
        }
    }
    by_id
}

/// The FILL_APPLIED events of `by_id` by fill (their cause): each fill has
/// two legs, cash and position.
pub fn fill_legs(
    by_id: &HashMap<String, events::AccountEvent>,
) -> HashMap<&str, std::collections::HashSet<&str>> {
    let mut legs: HashMap<&str, std::collections::HashSet<&str>> = HashMap::new();
    for e in by_id.values() {
        if e.r#type == events::AccountEventType::FillApplied as i32 {
            legs.entry(e.cause_id.as_str())
                .or_default()
                .insert(e.event_id.as_str());
        }
    }
    legs
}

/// `total` BUY fills of ACME spread over accounts `1..=accounts`, and what
/// each account must hold once every one applied exactly once: (quantity,
/// cost basis). Cost basis is the exact sum of filled amounts; cash goes
/// negative by it (the account flagged overdrawn).
#[allow(clippy::type_complexity)]
pub fn buy_fills(
    total: usize,
    accounts: i64,
) -> (
    Vec<events::FillEvent>,
    HashMap<i64, (rust_decimal::Decimal, rust_decimal::Decimal)>,
) {
    let mut expected: HashMap<i64, (rust_decimal::Decimal, rust_decimal::Decimal)> = HashMap::new();
    let mut fills = Vec::with_capacity(total);
    for i in 0..total {
        let account = 1 + (i as i64 % accounts);
        let qty = format!("{}.{}", 1 + i % 7, i % 10);
        let price = format!("{}.{:02}", 10 + i % 13, i % 100);
        let f = fill(&format!("f-{i}"), account, "BUY", &qty, &price);
        let e = expected.entry(account).or_default();
        e.0 += super::d(&f.quantity);
        e.1 += super::d(&f.filled_amount);
        fills.push(f);
    }
    (fills, expected)
}
