//! `loadtest`: open-loop load for the account service. See loadtest/README.md.

use clap::{Parser, Subcommand};
use loadtest::high_rate::{measure, Via, ViaArgs};
use loadtest::modes::{self, Ctx, LoadArgs, Mix};
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Open-loop load generator for the account service (latency from the intended send time)"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Reserve at --rate for --duration (accounts opened and funded first).
    Reserve(LoadArgs),
    /// Reserve / Unreserve / ApplyFill / GetAccount in proportions.
    Mixed {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value = "reserve=50,unreserve=30,fill=10,get=10")]
        mix: Mix,
    },
    /// ReserveBatch calls at --rate batches/s of --batch-size items each
    /// (latency per item and per batch from the intended send time).
    Batch {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 100)]
        batch_size: usize,
        #[arg(long)]
        all_or_nothing: bool,
    },
    /// ReserveStream items at --rate items/s over --streams streams, at most
    /// --window items in flight on each (latency per item from its intended send time).
    Stream {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 4)]
        streams: usize,
        #[arg(long, default_value_t = 1024)]
        window: usize,
    },
    /// FillEvents to Kafka at --rate; lag until each fill's AccountEvent is read back.
    Fills {
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        kafka: loadtest::fills::FillsArgs,
    },
    /// Step the Reserve rate up until p99 or errors pass the limits; report the highest sustained.
    /// --via batch|stream steps ReserveBatch calls/s or ReserveStream items/s instead.
    Max {
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        via: loadtest::high_rate::ViaArgs,
        #[arg(long, default_value_t = 1000.0)]
        start_rate: f64,
        /// Each step multiplies the rate by this.
        #[arg(long, default_value_t = 1.5)]
        step: f64,
        #[arg(long, default_value_t = 5.0)]
        step_duration: f64,
        #[arg(long, default_value_t = 20.0)]
        p99_limit_ms: f64,
        #[arg(long, default_value_t = 12)]
        max_steps: u32,
    },
    /// Serve the same proto, answering at once: the unary gRPC ceiling.
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:50061")]
        listen: std::net::SocketAddr,
    },
    /// The state machine alone, in process: `apply` commands/s on one core.
    Engine {
        #[arg(long, default_value_t = 3_000_000)]
        commands: u64,
        /// Room made for this many orders before the run (the service's
        /// `--capacity-orders`): the tables never grow while timed.
        #[arg(long, default_value_t = 0)]
        capacity_orders: usize,
        /// The idempotency window, in the run's journaled time (1 ms per
        /// 1,000 commands): at the default, about a million keys stay in it.
        #[arg(long, default_value_t = 1_000)]
        window_ms: i64,
        /// Make the room on transparent huge pages (the service's `--huge-pages`).
        #[arg(long)]
        huge_pages: bool,
        #[arg(long)]
        json_out: Option<std::path::PathBuf>,
    },
    /// Journal --records commands, restart the engine, time the replay to serving.
    /// With --postgres-url, then snapshot that state and time a restart from
    /// the snapshot (plus the WAL after it) too, on the same journal.
    Replay {
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// An empty database to write the snapshot into.
        #[arg(long)]
        postgres_url: Option<String>,
        /// The service's idempotency window (default: the service's 24 h). A
        /// window short against the journal's span is the case snapshots
        /// are for: the state is much smaller than the history.
        #[arg(long)]
        idempotency_window_ms: Option<i64>,
        #[arg(long)]
        json_out: Option<std::path::PathBuf>,
    },
    /// fdatasync latency of the disk under --dir (4 KiB writes).
    SyncProbe {
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 2000)]
        count: u64,
        #[arg(long)]
        json_out: Option<std::path::PathBuf>,
    },
}

fn emit(summary: &Value, json_out: &Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let line = serde_json::to_string(summary)?;
    println!("{line}");
    if let Some(path) = json_out {
        std::fs::write(path, format!("{line}\n"))?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The in-process modes run the engine: its logs on stderr with RUST_LOG.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().mode {
        Mode::Reserve(load) => {
            let ctx = Ctx::connect(load).await?;
            ctx.setup().await?;
            let (recorder, elapsed) = modes::reserve(&ctx, ctx.args.rate, ctx.args.duration).await;
            let mut summary = recorder.summary("reserve", ctx.args.rate, elapsed);
            summary["connections"] = json!(ctx.args.connections);
            emit(&summary, &ctx.args.json_out)?;
        }
        Mode::Mixed { load, mix } => {
            let ctx = Ctx::connect(load).await?;
            ctx.setup().await?;
            let (recorder, elapsed) = modes::mixed(&ctx, mix).await;
            let mut summary = recorder.summary("mixed", ctx.args.rate, elapsed);
            summary["mix"] = json!(format!("{mix:?}"));
            emit(&summary, &ctx.args.json_out)?;
        }
        Mode::Batch {
            load,
            batch_size,
            all_or_nothing,
        } => {
            let ctx = Ctx::connect(load).await?;
            ctx.setup().await?;
            let via = ViaArgs {
                via: Via::Batch,
                batch_size,
                all_or_nothing,
                streams: 1,
                window: 1,
            };
            let summary = measure(&ctx, &via, ctx.args.rate, ctx.args.duration).await?;
            emit(&summary, &ctx.args.json_out)?;
        }
        Mode::Stream {
            load,
            streams,
            window,
        } => {
            let ctx = Ctx::connect(load).await?;
            ctx.setup().await?;
            let via = ViaArgs {
                via: Via::Stream,
                batch_size: 1,
                all_or_nothing: false,
                streams,
                window,
            };
            let summary = measure(&ctx, &via, ctx.args.rate, ctx.args.duration).await?;
            emit(&summary, &ctx.args.json_out)?;
        }
        Mode::Fills { mut load, kafka } => {
            // Every fill sent is matched when its event comes back: no warm-up
            // phase, so warm-up events cannot be counted as measured ones.
            load.warmup = 0.0;
            if kafka.create_topics {
                loadtest::fills::create_topics(&kafka).await?;
            }
            let ctx = Ctx::connect(load).await?;
            ctx.setup().await?;
            let (lag, elapsed) = loadtest::fills::run(&ctx, &kafka).await?;
            let mut summary = lag.summary("fills", ctx.args.rate, elapsed);
            summary["latency_from"] = json!("intended send time -> FILL_APPLIED event read back");
            emit(&summary, &ctx.args.json_out)?;
        }
        Mode::Max {
            load,
            via,
            start_rate,
            step,
            step_duration,
            p99_limit_ms,
            max_steps,
        } => {
            anyhow::ensure!(step > 1.0, "--step must be above 1");
            let ctx = Ctx::connect(load).await?;
            ctx.setup().await?;
            let mut rate = start_rate;
            let mut steps = Vec::new();
            let mut best: Option<Value> = None;
            // A step that misses the limits is run once more before the search
            // stops: on a shared machine one noisy stretch must not end it.
            let mut retried = false;
            for _ in 0..max_steps {
                let mut s = measure(&ctx, &via, rate, step_duration).await?;
                s["mode"] = json!("max");
                let sent = s["sent"].as_u64().unwrap_or(0).max(1) as f64;
                let error_share = s["errors"].as_u64().unwrap_or(0) as f64 / sent;
                let p99_ms = s["latency_us"]["p99"].as_u64().unwrap_or(0) as f64 / 1000.0;
                let throughput = s["throughput"].as_f64().unwrap_or(0.0);
                eprintln!("step rate={rate:.0} throughput={throughput:.0} p99_ms={p99_ms:.2} errors={error_share:.4}");
                // Items/s offered (calls/s times the batch size for batches).
                let offered = s["target_rate"].as_f64().unwrap_or(rate);
                steps.push(json!({"rate": offered, "calls_rate": rate, "throughput": throughput, "p99_us": s["latency_us"]["p99"], "errors": s["errors"]}));
                if p99_ms > p99_limit_ms || error_share > 0.01 || throughput < 0.95 * offered {
                    if retried {
                        break;
                    }
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                retried = false;
                best = Some(s);
                rate *= step;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let mut summary = best.unwrap_or_else(|| json!({"mode": "max", "target_rate": start_rate, "sent": 0, "ok": 0, "rejected": 0, "errors": 0, "throughput": 0.0, "latency_us": {}}));
            summary["max_sustained_rate"] = summary["target_rate"].clone();
            summary["steps"] = json!(steps);
            emit(&summary, &ctx.args.json_out)?;
        }
        Mode::EchoServer { listen } => {
            eprintln!("echo server on {listen}");
            loadtest::echo::serve(listen).await?;
        }
        Mode::Engine {
            commands,
            capacity_orders,
            window_ms,
            huge_pages,
            json_out,
        } => {
            let summary = tokio::task::spawn_blocking(move || {
                loadtest::inproc::engine(commands, capacity_orders, window_ms, huge_pages)
            })
            .await?;
            emit(&summary, &json_out)?;
        }
        Mode::Replay {
            records,
            postgres_url,
            idempotency_window_ms,
            json_out,
        } => {
            let summary =
                loadtest::inproc::replay(records, postgres_url, idempotency_window_ms).await;
            emit(&summary, &json_out)?;
        }
        Mode::SyncProbe {
            dir,
            count,
            json_out,
        } => {
            let temp = tempfile_dir(dir)?;
            let summary = loadtest::sync_probe::run(&temp, count)?;
            emit(&summary, &json_out)?;
        }
    }
    Ok(())
}

fn tempfile_dir(dir: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("loadtest-sync-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
