//! `account-service`: the CLI. Everything else lives in the library.

use account_service::{client, config::ServeArgs, server};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "account-service",
    version,
    about = "Brokerage account core: reservations, fills, cash and positions"
)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run the service (embedded by default: WAL in ./data, no Kafka, no PostgreSQL).
    Serve(ServeArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Top::Serve(args) => runtime.block_on(server::serve(args))?,
        Top::Client(command) => runtime.block_on(client::run(command))?,
    }
    Ok(())
}
