//! `account-service`: the CLI. Everything else lives in the library.

use account_service::{client, config::ServeArgs, server, snapshot, topics};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "account-service",
    version,
    about = "Brokerage account core: reservations, fills, cash and positions"
)]
struct Cli {
    /// `text` for people, `json` (one object per line) for log collectors.
    #[arg(long, global = true, env = "ACCOUNT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Top,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Top {
    /// Run the service (embedded by default: WAL in ./data, no Kafka, no PostgreSQL).
    Serve(ServeArgs),
    /// Create the service's Kafka topics (inbound, outbound, dead letters) that are missing.
    KafkaTopics(topics::TopicsArgs),
    /// One account's movements (every account event) from the PostgreSQL read model.
    History(snapshot::HistoryArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Top::Serve(args) => runtime.block_on(server::serve(args))?,
        Top::KafkaTopics(args) => runtime.block_on(topics::create(args))?,
        Top::History(args) => runtime.block_on(snapshot::print_history(args))?,
        Top::Client(command) => runtime.block_on(client::run(command))?,
    }
    Ok(())
}
