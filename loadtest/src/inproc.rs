//! In-process modes: the engine alone (`engine`: `apply` with no I/O, one
//! core) and a cold restart (`replay`: journal N commands, restart, time the
//! WAL replay until the engine serves).

use account_service::domain::*;
use account_service::engine::{Engine, EngineConfig, Phase, RequestKind, Want};
use account_service::metrics::Metrics;
use account_service::snapshot::SnapshotConfig;
use account_service::state_machine::{NoEvents, Pages, Prepared, State, StateConfig};
use account_service::workload;
use std::time::Instant;

const ACCOUNTS: i64 = 10_000;

async fn serving(engine: &Engine) {
    let mut phase = engine.handle().phase();
    while *phase.borrow_and_update() != Phase::Serving {
        phase.changed().await.unwrap();
    }
}

/// Command `n` of the load: order `n / 3`'s reserve, fill or unreserve.
fn command(n: u64) -> Command {
    workload::order_life(n / 3, ACCOUNTS)[(n % 3) as usize]
}

/// Applies `commands` reserve / fill / unreserve commands (a third each) to a
/// state of 10,000 funded accounts, generated ahead in chunks so only the
/// engine's work is timed: `commands_per_s` is the writer's (prefetch and
/// apply each command, [`Prepared`] by the threads that submit them, as the
/// service's ingress does), `with_preparation_commands_per_s` all of it on
/// one core (hashes and fingerprints too, as this mode measured before the
/// preparation moved off the writer), `ticks_ns_per_command` the ticks'
/// share of the writer's (the pruning; none in the first `window_ms` of
/// journaled time, while the window fills). A tick every 1,000 commands (1 ms of journaled time) prunes the
/// idempotency window (`window_ms`: at 1,000, about a million keys). With
/// `capacity_orders`, room for that many orders is made first, as the
/// service's `--capacity-orders` does.
pub fn engine(
    commands: u64,
    capacity_orders: usize,
    window_ms: i64,
    huge_pages: bool,
) -> serde_json::Value {
    let mut state = State::new(StateConfig {
        idempotency_window_ms: window_ms,
        tick_work_max: 100_000,
    });
    state.reserve_orders(capacity_orders, Pages::huge_if(huge_pages));
    let mut now = 1_700_000_000_000i64;
    let apply = |state: &mut State, c: &Command, now: i64| {
        let seq = state.last_sequence() + 1;
        state.apply(c, seq, now, &mut NoEvents);
    };
    for c in workload::funded_accounts(ACCOUNTS) {
        apply(&mut state, &c, now);
    }
    let mut timed = std::time::Duration::ZERO;
    let mut preparing = std::time::Duration::ZERO;
    let mut ticking = std::time::Duration::ZERO;
    let mut n = 0;
    // One buffer for every chunk: its pages are faulted in once, untimed.
    let mut chunk: Vec<Command> = Vec::with_capacity(CHUNK);
    let mut prepared: Vec<Prepared> = Vec::with_capacity(CHUNK);
    while n < commands {
        chunk.clear();
        chunk.extend((n..(n + CHUNK as u64).min(commands)).map(command));
        let started = Instant::now();
        prepared.clear();
        prepared.extend(chunk.iter().map(Prepared::of));
        preparing += started.elapsed();
        let started = Instant::now();
        for (i, c) in chunk.iter().enumerate() {
            state.prefetch_ahead(&prepared, i);
            let seq = state.last_sequence() + 1;
            state.apply_prepared(c, &prepared[i], seq, now, &mut NoEvents);
            if (n + i as u64) % 1_000 == 999 {
                now += 1;
                let pruning = Instant::now();
                apply(&mut state, &Command::Tick, now);
                ticking += pruning.elapsed();
            }
        }
        timed += started.elapsed();
        n += chunk.len() as u64;
    }
    serde_json::json!({
        "mode": "engine",
        "commands": commands,
        "capacity_orders": capacity_orders,
        "window_ms": window_ms,
        "huge_pages": huge_pages,
        "seconds": (timed.as_secs_f64() * 1000.0).round() / 1000.0,
        "commands_per_s": (commands as f64 / timed.as_secs_f64()).round(),
        "ns_per_command": (timed.as_nanos() as f64 / commands as f64).round(),
        "preparing_ns_per_command": (preparing.as_nanos() as f64 / commands as f64).round(),
        "ticks_ns_per_command": (ticking.as_nanos() as f64 / commands as f64).round(),
        "with_preparation_commands_per_s":
            (commands as f64 / (timed + preparing).as_secs_f64()).round(),
    })
}

/// Commands generated ahead per timed stretch of the engine mode.
const CHUNK: usize = 100_000;

/// Journals `records` commands through the engine, stops it, starts it again and
/// times the replay until it serves.
pub async fn replay(
    records: u64,
    postgres_url: Option<String>,
    idempotency_window_ms: Option<i64>,
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::new(dir.path());
    config.pin_core = false;
    if let Some(window) = idempotency_window_ms {
        config.state.idempotency_window_ms = window;
    }
    let engine = Engine::start(config.clone(), Metrics::new()).unwrap();
    serving(&engine).await;
    let h = engine.handle();
    for c in workload::funded_accounts(ACCOUNTS) {
        h.call(RequestKind::Command(c, Want::Nothing))
            .await
            .unwrap();
    }
    let started = Instant::now();
    let mut n = 0;
    while n < records {
        let wave: Vec<_> = (n..(n + 2_000).min(records))
            .map(|i| {
                h.submit(RequestKind::Command(command(i), Want::Nothing))
                    .unwrap()
            })
            .collect();
        n += wave.len() as u64;
        for p in wave {
            p.await.unwrap();
        }
    }
    let write_s = started.elapsed().as_secs_f64();
    engine.stop().unwrap();

    let (restart_s, replayed) = restart(config.clone()).await;
    let mut summary = serde_json::json!({
        "mode": "replay",
        "records": replayed,
        "write_s": (write_s * 100.0).round() / 100.0,
        "restart_to_serving_s": (restart_s * 1000.0).round() / 1000.0,
        "replay_records_per_s": (replayed as f64 / restart_s).round(),
        "idempotency_window_ms": config.state.idempotency_window_ms,
    });
    if let Some(url) = postgres_url {
        // Same journal: snapshot the state, then restart from the snapshot.
        config.snapshot = Some(SnapshotConfig::new(url));
        let metrics = Metrics::new();
        let engine = Engine::start(config.clone(), metrics.clone()).unwrap();
        serving(&engine).await;
        let started = Instant::now();
        while (metrics.snapshot_sequence.get() as u64) < replayed {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let first_snapshot_s = started.elapsed().as_secs_f64();
        engine.stop().unwrap();
        let (from_snapshot_s, tail) = restart(config).await;
        summary["first_snapshot_write_s"] =
            serde_json::json!((first_snapshot_s * 1000.0).round() / 1000.0);
        summary["restart_from_snapshot_s"] =
            serde_json::json!((from_snapshot_s * 1000.0).round() / 1000.0);
        summary["restart_from_snapshot_tail_records"] = serde_json::json!(tail);
        summary["restart_speedup"] =
            serde_json::json!((restart_s / from_snapshot_s * 100.0).round() / 100.0);
    }
    summary
}

/// Starts the engine on `config`'s data, returns the seconds until it serves
/// and the records it replayed.
async fn restart(config: EngineConfig) -> (f64, u64) {
    let metrics = Metrics::new();
    let started = Instant::now();
    let engine = Engine::start(config, metrics.clone()).unwrap();
    serving(&engine).await;
    let restart_s = started.elapsed().as_secs_f64();
    let replayed = metrics.replay_records.get() as u64;
    engine.stop().unwrap();
    (restart_s, replayed)
}
