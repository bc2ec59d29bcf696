//! The high-rate modes (design 4.1): `ReserveBatch` at a rate of batches, and
//! `ReserveStream` with a window of items in flight per stream. Open loop
//! like the unary modes: every latency runs from the intended send time, an
//! item the window has no room for counts as an error, never as a wait.
//! Reserved orders are released (share `--unreserve-share`) by unmeasured
//! `UnreserveBatch` calls, as the unary modes release theirs.

use crate::modes::{open_loop, Ctx};
use crate::schedule::Schedule;
use crate::{Class, Recorder};
use account_service::proto::account::v1 as pb;
use rand::RngExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Orders released per unmeasured UnreserveBatch.
const RELEASE_CHUNK: usize = 256;

impl Ctx {
    fn reserve_request(&self, i: u64) -> pb::ReserveRequest {
        pb::ReserveRequest {
            request_id: format!("{}-r{i}", self.run_id),
            account_id: self.account(),
            order_id: format!("{}-o{i}", self.run_id),
            kind: pb::ReservationKind::Cash as i32,
            asset: "USD".into(),
            amount: self.args.amount.clone(),
            expires_at_ms: 0,
        }
    }

    /// Releases `orders` in unmeasured UnreserveBatch calls.
    fn release(self: &Arc<Self>, orders: Vec<(i64, String)>) {
        if orders.is_empty() {
            return;
        }
        let ctx = self.clone();
        tokio::spawn(async move {
            for chunk in orders.chunks(RELEASE_CHUNK) {
                let requests = chunk
                    .iter()
                    .map(|(account_id, order_id)| pb::UnreserveRequest {
                        request_id: format!("{order_id}-u"),
                        account_id: *account_id,
                        order_id: order_id.clone(),
                        amount: String::new(),
                    })
                    .collect();
                let _ = ctx
                    .accounts()
                    .unreserve_batch(pb::UnreserveBatchRequest { requests })
                    .await;
            }
        });
    }

    fn wants_release(&self) -> bool {
        rand::rng().random_bool(self.args.unreserve_share.clamp(0.0, 1.0))
    }
}

fn item_class(result: i32) -> Class {
    match result {
        r if r == pb::Result::Ok as i32 => Class::Ok,
        r if r == pb::Result::ResourceExhausted as i32 => Class::Overloaded,
        _ => Class::Rejected,
    }
}

fn call_class(status: &tonic::Status) -> Class {
    if status.code() == tonic::Code::ResourceExhausted {
        Class::Overloaded
    } else {
        Class::Error
    }
}

/// ReserveBatch calls of `size` items at `rate` batches/s. Returns the
/// recorder of the calls, that of the items (each item's latency is its
/// batch's) and the measured wall time.
pub async fn batch(
    ctx: &Arc<Ctx>,
    rate: f64,
    duration: f64,
    size: usize,
    all_or_nothing: bool,
) -> (Arc<Recorder>, Arc<Recorder>, Duration) {
    let batches = Arc::new(Recorder::default());
    let items = Arc::new(Recorder::default());
    let item_recorder = items.clone();
    let elapsed = open_loop(
        ctx,
        rate,
        duration,
        &batches,
        move |ctx, n, due, measured| {
            let items = item_recorder.clone();
            async move {
                let requests: Vec<_> = (0..size as u64)
                    .map(|k| ctx.reserve_request(n * size as u64 + k))
                    .collect();
                let orders: Vec<(i64, String)> = requests
                    .iter()
                    .map(|r| (r.account_id, r.order_id.clone()))
                    .collect();
                let call = pb::ReserveBatchRequest {
                    requests,
                    all_or_nothing,
                };
                let result = ctx.accounts().reserve_batch(call).await;
                let latency = due.elapsed();
                match result {
                    Ok(reply) => {
                        let replies = reply.into_inner().replies;
                        let mut release = Vec::new();
                        for (reply, order) in replies.iter().zip(orders) {
                            let class = item_class(reply.result);
                            if measured {
                                items.sent.fetch_add(1, Ordering::Relaxed);
                                items.record(class, latency);
                            }
                            if class == Class::Ok && ctx.wants_release() {
                                release.push(order);
                            }
                        }
                        ctx.release(release);
                        if replies.len() == size {
                            Class::Ok
                        } else {
                            Class::Error
                        }
                    }
                    Err(status) => {
                        let class = call_class(&status);
                        if measured {
                            for _ in 0..size {
                                items.sent.fetch_add(1, Ordering::Relaxed);
                                items.record(class, latency);
                            }
                        }
                        class
                    }
                }
            }
        },
    )
    .await;
    (batches, items, elapsed)
}

/// What the reader of one ReserveStream needs: when each item sent was due,
/// whether it is measured, and its keys, in request order.
#[derive(Default)]
struct Lane {
    pending: Mutex<VecDeque<Pending>>,
    in_flight: AtomicUsize,
}

struct Pending {
    due: Instant,
    measured: bool,
    request_id: String,
    account_id: i64,
    order_id: String,
}

/// ReserveStream items at `rate` items/s spread over `streams` streams, each
/// with at most `window` items sent and not yet answered.
pub async fn stream(
    ctx: &Arc<Ctx>,
    rate: f64,
    duration: f64,
    streams: usize,
    window: usize,
) -> anyhow::Result<(Arc<Recorder>, Duration)> {
    anyhow::ensure!(
        streams > 0 && window > 0,
        "--streams and --window must be at least 1"
    );
    let recorder = Arc::new(Recorder::default());
    let mut lanes = Vec::with_capacity(streams);
    let mut senders = Vec::with_capacity(streams);
    let mut readers = Vec::with_capacity(streams);
    for _ in 0..streams {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::ReserveRequest>(window);
        let outbound =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
            );
        let mut replies = ctx.accounts().reserve_stream(outbound).await?.into_inner();
        let lane = Arc::new(Lane::default());
        let (reader_lane, recorder, ctx) = (lane.clone(), recorder.clone(), ctx.clone());
        readers.push(tokio::spawn(async move {
            let mut release = Vec::new();
            loop {
                let reply = match replies.message().await {
                    Ok(Some(reply)) => reply,
                    Ok(None) => break,
                    Err(status) => {
                        eprintln!("a ReserveStream ended: {status}");
                        break;
                    }
                };
                let Some(sent) = reader_lane
                    .pending
                    .lock()
                    .ok()
                    .and_then(|mut p| p.pop_front())
                else {
                    break;
                };
                reader_lane.in_flight.fetch_sub(1, Ordering::Relaxed);
                let class = if reply.request_id == sent.request_id {
                    item_class(reply.result)
                } else {
                    eprintln!(
                        "a ReserveStream reply out of request order: {} for {}",
                        reply.request_id, sent.request_id
                    );
                    Class::Error
                };
                if sent.measured {
                    recorder.record(class, sent.due.elapsed());
                }
                if class == Class::Ok && ctx.wants_release() {
                    release.push((sent.account_id, sent.order_id));
                    if release.len() >= RELEASE_CHUNK {
                        ctx.release(std::mem::take(&mut release));
                    }
                }
            }
            ctx.release(release);
            // Items the stream never answered.
            if let Ok(mut pending) = reader_lane.pending.lock() {
                for sent in pending.drain(..).filter(|s| s.measured) {
                    recorder.record(Class::Error, sent.due.elapsed());
                }
            }
        }));
        lanes.push(lane);
        senders.push(tx);
    }
    // The schedule runs on its own thread (nanosleep precision, as `open_loop`);
    // it owns the senders, so the streams close when it ends.
    let schedule = Schedule::new(Instant::now() + Duration::from_millis(20), rate);
    let warmup = schedule.count(Duration::from_secs_f64(ctx.args.warmup));
    let total = warmup + schedule.count(Duration::from_secs_f64(duration));
    let scheduler = {
        let (ctx, recorder) = (ctx.clone(), recorder.clone());
        std::thread::spawn(move || {
            for i in 0..total {
                let due = schedule.due(i);
                let now = std::time::Instant::now();
                if due.into_std() > now {
                    std::thread::sleep(due.into_std() - now);
                }
                let measured = i >= warmup;
                if measured {
                    recorder.sent.fetch_add(1, Ordering::Relaxed);
                }
                let k = i as usize % lanes.len();
                let lane = &lanes[k];
                if lane.in_flight.load(Ordering::Relaxed) >= window {
                    if measured {
                        recorder.record(Class::Error, Duration::ZERO);
                    }
                    continue;
                }
                let request = ctx.reserve_request(ctx.next_request());
                let mut pending = lane.pending.lock().expect("pending lock");
                pending.push_back(Pending {
                    due,
                    measured,
                    request_id: request.request_id.clone(),
                    account_id: request.account_id,
                    order_id: request.order_id.clone(),
                });
                lane.in_flight.fetch_add(1, Ordering::Relaxed);
                if senders[k].try_send(request).is_err() {
                    pending.pop_back();
                    lane.in_flight.fetch_sub(1, Ordering::Relaxed);
                    if measured {
                        recorder.record(Class::Error, Duration::ZERO);
                    }
                }
            }
        })
    };
    let _ = tokio::task::spawn_blocking(move || scheduler.join()).await;
    let drain = Duration::from_millis(ctx.args.timeout_ms.max(1000));
    for reader in readers {
        let _ = tokio::time::timeout(drain, reader).await;
    }
    Ok((recorder, schedule.due(total) - schedule.due(warmup)))
}

/// Which RPC carries the Reserves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// One Reserve per call.
    Unary,
    /// ReserveBatch calls of --batch-size items.
    Batch,
    /// ReserveStream, --streams streams with --window items in flight each.
    Stream,
}

#[derive(Clone, Debug, clap::Args)]
pub struct ViaArgs {
    #[arg(long, value_enum, default_value_t = Via::Unary)]
    pub via: Via,
    /// Items per ReserveBatch call.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Send each ReserveBatch as an all_or_nothing basket.
    #[arg(long)]
    pub all_or_nothing: bool,
    /// Open ReserveStreams.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Items sent and not yet answered, per stream, at most.
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
}

/// One measurement through `via.via` at `rate` (calls/s for unary and batch,
/// items/s for streams): the standard JSON summary of the items, plus the
/// calls' figures for batches.
pub async fn measure(
    ctx: &Arc<Ctx>,
    via: &ViaArgs,
    rate: f64,
    duration: f64,
) -> anyhow::Result<serde_json::Value> {
    use serde_json::json;
    Ok(match via.via {
        Via::Unary => {
            let (recorder, elapsed) = crate::modes::reserve(ctx, rate, duration).await;
            let mut s = recorder.summary("reserve", rate, elapsed);
            s["via"] = json!("unary");
            s
        }
        Via::Batch => {
            anyhow::ensure!(via.batch_size > 0, "--batch-size must be at least 1");
            let (calls, items, elapsed) =
                batch(ctx, rate, duration, via.batch_size, via.all_or_nothing).await;
            let mut s = items.summary("batch", rate * via.batch_size as f64, elapsed);
            s["via"] = json!("batch");
            s["batch_size"] = json!(via.batch_size);
            s["all_or_nothing"] = json!(via.all_or_nothing);
            s["batches"] = calls.summary("batch-calls", rate, elapsed);
            s
        }
        Via::Stream => {
            let (items, elapsed) = stream(ctx, rate, duration, via.streams, via.window).await?;
            let mut s = items.summary("stream", rate, elapsed);
            s["via"] = json!("stream");
            s["streams"] = json!(via.streams);
            s["window"] = json!(via.window);
            s
        }
    })
}
