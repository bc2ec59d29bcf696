//! `account-service kafka-topics`: creates the service's Kafka topics (the
//! inbound ones, the outbound one, and the dead-letter queues), keeping any
//! that exist. For a local stack or a new cluster; a managed cluster usually
//! provisions topics its own way.

use crate::config::{kafka_client_config, KafkaOptions, KafkaTopics};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use std::time::Duration;

#[derive(Clone, Debug, clap::Args)]
pub struct TopicsArgs {
    /// Kafka bootstrap servers (host:port,...).
    #[arg(long, env = "ACCOUNT_KAFKA_BROKERS")]
    pub kafka_brokers: String,
    /// Partitions of each inbound topic and of the events topic (dead-letter
    /// queues get one).
    #[arg(long, default_value_t = 1)]
    pub partitions: i32,
    /// Replication factor of every topic.
    #[arg(long, default_value_t = 1)]
    pub replication: i32,
    #[command(flatten)]
    pub topics: KafkaTopics,
    /// A librdkafka setting, `KEY=VALUE`, repeatable (as for `serve`).
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    pub kafka_option: Vec<String>,
}

/// Creates what is missing; prints one line per topic.
pub async fn create(args: TopicsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.partitions > 0, "--partitions must be at least 1");
    let options = KafkaOptions::parse(&args.kafka_option)?;
    let admin: AdminClient<DefaultClientContext> =
        kafka_client_config(&args.kafka_brokers, &options).create()?;
    let names = args.topics.all();
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|name| {
            let partitions = if name.ends_with(".dlq") {
                1
            } else {
                args.partitions
            };
            NewTopic::new(name, partitions, TopicReplication::Fixed(args.replication))
        })
        .collect();
    let options =
        AdminOptions::new().operation_timeout(Some(Timeout::After(Duration::from_secs(10))));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(topic) => println!("created: {topic}"),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => println!("exists: {topic}"),
            Err((topic, e)) => anyhow::bail!("create topic {topic}: {e}"),
        }
    }
    Ok(())
}
