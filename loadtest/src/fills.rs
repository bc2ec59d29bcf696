//! `fills`: FillEvents produced to Kafka at a fixed rate (open loop), and the
//! end-to-end lag from each fill's intended send time until its
//! FILL_APPLIED AccountEvent is read back from the events topic.

use crate::modes::{fill_event, open_loop, Ctx};
use crate::{Class, Recorder};
use account_service::proto::events::{AccountEvent, AccountEventType};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Debug, clap::Args)]
pub struct FillsArgs {
    /// Kafka bootstrap servers of the service.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    #[arg(long, default_value = "trading.fills")]
    pub fills_topic: String,
    #[arg(long, default_value = "trading.account.events")]
    pub events_topic: String,
    /// Create the service's topics first (1 partition each) if they are missing.
    #[arg(long)]
    pub create_topics: bool,
}

/// Creates the inbound, outbound and dead-letter topics; existing ones are kept.
pub async fn create_topics(kafka: &FillsArgs) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()?;
    let dlq = format!("{}.dlq", kafka.fills_topic);
    let names = [
        kafka.fills_topic.as_str(),
        "payment.deposits",
        "payment.withdrawals",
        kafka.events_topic.as_str(),
        dlq.as_str(),
    ];
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        if let Err((topic, e)) = result {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                anyhow::bail!("create topic {topic}: {e}");
            }
        }
    }
    Ok(())
}

/// Produces fills at the rate; returns the lag recorder and the measured time.
pub async fn run(ctx: &Arc<Ctx>, kafka: &FillsArgs) -> anyhow::Result<(Arc<Recorder>, Duration)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("linger.ms", "1")
        .set("message.timeout.ms", "30000")
        .create()?;
    let lag = Arc::new(Recorder::default());
    let pending: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = spawn_reader(kafka, lag.clone(), pending.clone(), stop.clone())?;

    let produced = Arc::new(Recorder::default());
    let (topic, run_id, sent) = (
        kafka.fills_topic.clone(),
        ctx.run_id.clone(),
        pending.clone(),
    );
    let elapsed = open_loop(
        ctx,
        ctx.args.rate,
        ctx.args.duration,
        &produced,
        move |ctx, i, due, _| {
            let (producer, pending, topic) = (producer.clone(), sent.clone(), topic.clone());
            let event_id = format!("{run_id}-f{i}");
            async move {
                let account_id = ctx.account();
                let fill = fill_event(event_id.clone(), format!("{event_id}-o"), account_id);
                pending.lock().map(|mut p| p.insert(event_id, due)).ok();
                let key = account_id.to_string();
                let payload = fill.encode_to_vec();
                let record = FutureRecord::to(&topic).key(&key).payload(&payload);
                match producer.send(record, Duration::from_secs(5)).await {
                    Ok(_) => Class::Ok,
                    Err(_) => {
                        // Counted once, as a produce error, not again as lost.
                        pending.lock().map(|mut p| p.remove(&fill.event_id)).ok();
                        Class::Error
                    }
                }
            }
        },
    )
    .await;
    // Fills still in flight get 10 s to come back; the rest count as errors.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && pending.lock().map(|p| !p.is_empty()).unwrap_or(false) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    // A fill counts once: matched (ok, with its lag) or not seen back within
    // the wait (error), whether the produce failed, timed out or the event
    // never came.
    let sent = produced.count(&produced.sent);
    lag.sent.store(sent, Ordering::Relaxed);
    lag.errors
        .store(sent.saturating_sub(lag.count(&lag.ok)), Ordering::Relaxed);
    Ok((lag, elapsed))
}

/// Reads the events topic from its end; the first FILL_APPLIED event of each
/// pending fill (matched by cause_id) records the lag.
fn spawn_reader(
    kafka: &FillsArgs,
    lag: Arc<Recorder>,
    pending: Arc<Mutex<HashMap<String, Instant>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", "loadtest-fills")
        .set("enable.auto.commit", "false")
        // librdkafka waits up to 500 ms for a fetch to fill by default.
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&kafka.events_topic), Duration::from_secs(5))?;
    let mut assignment = TopicPartitionList::new();
    for topic in metadata.topics() {
        for p in topic.partitions() {
            assignment.add_partition_offset(&kafka.events_topic, p.id(), Offset::End)?;
        }
    }
    consumer.assign(&assignment)?;
    Ok(std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            let Some(Ok(event)) = message.payload().map(AccountEvent::decode) else {
                continue;
            };
            if event.r#type != AccountEventType::FillApplied as i32 {
                continue;
            }
            let due = pending
                .lock()
                .ok()
                .and_then(|mut p| p.remove(&event.cause_id));
            if let Some(due) = due {
                lag.record(Class::Ok, due.elapsed());
            }
        }
    }))
}
