//! `account-service`: the CLI. Everything else lives in the library.

use account_service::{client, config::ServeArgs, server, snapshot, telemetry, topics};
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
    Serve(Box<ServeArgs>),
    /// Create the service's Kafka topics (inbound, outbound, dead letters) that are missing.
    KafkaTopics(topics::TopicsArgs),
    /// One account's movements (every account event) from the PostgreSQL read model.
    History(snapshot::HistoryArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The exporter sends its batches from the service's runtime.
    let telemetry = match &cli.command {
        Top::Serve(args) if args.otlp_endpoint.is_some() => {
            let _runtime = runtime.enter();
            let endpoint = args.otlp_endpoint.as_deref().unwrap_or_default();
            Some(telemetry::Telemetry::init(
                endpoint,
                args.otlp_sample_ratio,
            )?)
        }
        _ => None,
    };
    init_logs(cli.log_format, telemetry.as_ref());
    let result = match cli.command {
        Top::Serve(args) => runtime.block_on(server::serve(*args)).map_err(Into::into),
        Top::KafkaTopics(args) => runtime.block_on(topics::create(args)),
        Top::History(args) => runtime.block_on(snapshot::print_history(args)),
        Top::Client(command) => runtime.block_on(client::run(command)),
    };
    if let Some(telemetry) = telemetry {
        // Flushes what is buffered; blocks on the runtime's exporter task.
        let _ = runtime.block_on(tokio::task::spawn_blocking(move || telemetry.shutdown()));
    }
    result
}

/// Logs to stderr (`RUST_LOG` filters them; by default `info`, and `warn`
/// for openraft, whose info lines describe every election step); with
/// traces on, the service's own spans also go to the OTLP exporter.
fn init_logs(format: LogFormat, telemetry: Option<&telemetry::Telemetry>) {
    use tracing_subscriber::{filter, prelude::*, EnvFilter};
    let levels =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let spans = telemetry.map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t.tracer())
            .with_filter(
                filter::Targets::new().with_target("account_service", tracing::Level::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(levels))
        .with(spans)
        .init();
}
