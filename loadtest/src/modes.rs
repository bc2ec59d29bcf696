//! The load modes against a running service: setup, the open-loop runner, and
//! the request mixes.

use crate::schedule::Schedule;
use crate::{Class, Recorder};
use account_service::client::{Authorized, BearerToken};
use account_service::proto::account::v1 as pb;
use account_service::proto::account::v1::account_service_client::AccountServiceClient;
use account_service::proto::account::v1::admin_service_client::AdminServiceClient;
use account_service::proto::events;
use rand::RngExt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

/// What every load mode shares.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Bearer token for AccountService calls (a service with `--auth-tokens`).
    #[arg(long, env = "ACCOUNT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Bearer token for AdminService calls (setup, fills); default: `--token`.
    #[arg(long, env = "ACCOUNT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// HTTP/2 connections (requests are spread round-robin).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Seconds sent at the rate before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// A call slower than this counts as an error, never as a latency.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Calls in flight at most; beyond it a due request counts as an error.
    #[arg(long, default_value_t = 10_000)]
    pub max_inflight: usize,
    /// Accounts opened and funded by the setup.
    #[arg(long, default_value_t = 1000)]
    pub accounts: u64,
    /// First account id of the pool.
    #[arg(long, default_value_t = 1_000_000)]
    pub account_base: i64,
    /// Deposit per account at setup.
    #[arg(long, default_value = "1000000000")]
    pub fund: String,
    /// Amount of each Reserve (cash, USD).
    #[arg(long, default_value = "1.00")]
    pub amount: String,
    /// Draw this many "hot" accounts with probability --hot-share (0 = uniform).
    #[arg(long, default_value_t = 0)]
    pub hot_accounts: u64,
    #[arg(long, default_value_t = 0.8)]
    pub hot_share: f64,
    /// Share of reserved orders released by an Unreserve after the reply (not measured).
    #[arg(long, default_value_t = 1.0)]
    pub unreserve_share: f64,
    /// Also write the JSON summary here.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
}

pub struct Ctx {
    pub args: LoadArgs,
    pub run_id: String,
    channels: Vec<Channel>,
    next_channel: AtomicUsize,
    order_token: BearerToken,
    admin_token: BearerToken,
    /// Orders reserved and not yet released (for mixed mode).
    open_orders: Mutex<Vec<(i64, String)>>,
    pub unreserves: AtomicU64,
    /// Request numbers, unique over the whole run (ids derive from them).
    next_request: AtomicU64,
}

/// With replicas (design 7), where the group's leader takes calls when `addr`
/// is a follower (`ClusterStatus`); `None` at the leader or a single node.
async fn leader_of(addr: &str, token: &BearerToken) -> anyhow::Result<Option<String>> {
    let channel = Channel::from_shared(addr.to_string())?.connect().await?;
    // A peer without ClusterStatus (the seed's design) is one node.
    let Ok(status) = AdminServiceClient::with_interceptor(channel, token.clone())
        .cluster_status(pb::ClusterStatusRequest {})
        .await
    else {
        return Ok(None);
    };
    let status = status.into_inner();
    if status.leader_grpc_addr.is_empty() || status.leader_id == status.node_id {
        return Ok(None);
    }
    let scheme = if addr.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    Ok(Some(format!("{scheme}://{}", status.leader_grpc_addr)))
}

impl Ctx {
    pub async fn connect(mut args: LoadArgs) -> anyhow::Result<Arc<Ctx>> {
        anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
        anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
        let order_token = BearerToken::new(args.token.as_deref())?;
        if let Some(leader) = leader_of(&args.addr, &order_token).await? {
            eprintln!(
                "loadtest: {} is a follower; sending to the leader at {leader}",
                args.addr
            );
            args.addr = leader;
        }
        let mut channels = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            // One HTTP/2 connection each.
            channels.push(
                Channel::from_shared(args.addr.clone())?
                    .tcp_nodelay(true)
                    .connect()
                    .await?,
            );
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let admin_token = BearerToken::new(args.admin_token.as_deref().or(args.token.as_deref()))?;
        Ok(Arc::new(Ctx {
            run_id: format!("lt{}-{}", nanos % 1_000_000_000_000, std::process::id()),
            order_token,
            admin_token,
            args,
            channels,
            next_channel: AtomicUsize::new(0),
            open_orders: Mutex::new(Vec::new()),
            unreserves: AtomicU64::new(0),
            next_request: AtomicU64::new(0),
        }))
    }

    /// A request number no other request of this run has.
    pub fn next_request(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    pub fn channel(&self) -> Channel {
        let i = self.next_channel.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }

    /// AccountService on the next connection, with `--token`.
    pub fn accounts(&self) -> AccountServiceClient<Authorized> {
        AccountServiceClient::with_interceptor(self.channel(), self.order_token.clone())
    }

    /// AdminService on the next connection, with `--admin-token`.
    pub fn admin(&self) -> AdminServiceClient<Authorized> {
        AdminServiceClient::with_interceptor(self.channel(), self.admin_token.clone())
    }

    pub fn account(&self) -> i64 {
        let mut rng = rand::rng();
        let a = &self.args;
        let n = if a.hot_accounts > 0 && rng.random_bool(a.hot_share.clamp(0.0, 1.0)) {
            rng.random_range(0..a.hot_accounts.min(a.accounts))
        } else {
            rng.random_range(0..a.accounts)
        };
        a.account_base + n as i64
    }

    /// Opens and funds the account pool through AdminService (idempotent).
    pub async fn setup(self: &Arc<Self>) -> anyhow::Result<()> {
        let ids: Vec<i64> = (0..self.args.accounts)
            .map(|n| self.args.account_base + n as i64)
            .collect();
        for chunk in ids.chunks(64) {
            let mut tasks = Vec::new();
            for &account_id in chunk {
                let ctx = self.clone();
                tasks.push(tokio::spawn(async move {
                    let mut admin = ctx.admin();
                    let open = pb::OpenAccountRequest {
                        request_id: format!("{}-open-{account_id}", ctx.run_id),
                        account_id,
                        base_currency: "USD".into(),
                    };
                    admin.open_account(open).await?;
                    let deposit = events::DepositEvent {
                        event_id: format!("{}-fund-{account_id}", ctx.run_id),
                        account_id,
                        currency: "USD".into(),
                        amount: ctx.args.fund.clone(),
                        timestamp: 0,
                        source: "loadtest".into(),
                    };
                    admin.deposit(deposit).await?;
                    Ok::<(), tonic::Status>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
        }
        Ok(())
    }

    pub async fn reserve(self: &Arc<Self>, i: u64) -> Class {
        let account_id = self.account();
        let order_id = format!("{}-o{i}", self.run_id);
        let request = pb::ReserveRequest {
            request_id: format!("{}-r{i}", self.run_id),
            account_id,
            order_id: order_id.clone(),
            kind: pb::ReservationKind::Cash as i32,
            asset: "USD".into(),
            amount: self.args.amount.clone(),
            expires_at_ms: 0,
        };
        let result = self.accounts().reserve(request).await;
        let class = classify(result.as_ref().map(|r| r.get_ref().result));
        if class == Class::Ok {
            self.open_orders
                .lock()
                .map(|mut v| v.push((account_id, order_id)))
                .ok();
        }
        class
    }

    pub async fn unreserve_one(self: &Arc<Self>, i: u64) -> Class {
        let Some((account_id, order_id)) = self.take_order() else {
            return self.get(i).await;
        };
        let request = pb::UnreserveRequest {
            request_id: format!("{}-u{i}", self.run_id),
            account_id,
            order_id,
            amount: String::new(),
        };
        let result = self.accounts().unreserve(request).await;
        self.unreserves.fetch_add(1, Ordering::Relaxed);
        classify(result.as_ref().map(|r| r.get_ref().result))
    }

    pub async fn fill(self: &Arc<Self>, i: u64) -> Class {
        let (account_id, order_id) = self
            .take_order()
            .unwrap_or_else(|| (self.account(), format!("{}-nf{i}", self.run_id)));
        let request = fill_event(format!("{}-f{i}", self.run_id), order_id, account_id);
        let result = self.admin().apply_fill(request).await;
        classify(result.as_ref().map(|r| r.get_ref().result))
    }

    pub async fn get(self: &Arc<Self>, _i: u64) -> Class {
        let request = pb::GetAccountRequest {
            account_id: self.account(),
        };
        match self.accounts().get_account(request).await {
            Ok(_) => Class::Ok,
            Err(s) => classify(Err(&s)),
        }
    }

    fn take_order(&self) -> Option<(i64, String)> {
        let mut orders = self.open_orders.lock().ok()?;
        if orders.is_empty() {
            return None;
        }
        let i = rand::rng().random_range(0..orders.len());
        Some(orders.swap_remove(i))
    }
}

/// The fill every mode sends: a BUY of 1 ACME at 0.50, in the base currency.
pub fn fill_event(event_id: String, order_id: String, account_id: i64) -> events::FillEvent {
    events::FillEvent {
        event_id,
        order_id,
        account_id,
        symbol: "ACME".into(),
        side: "BUY".into(),
        quantity: "1".into(),
        fill_price: "0.50".into(),
        filled_amount: "0.50".into(),
        timestamp: 0,
        currency: String::new(),
    }
}

fn classify(result: Result<i32, &tonic::Status>) -> Class {
    match result {
        Ok(code) if code == pb::Result::Ok as i32 => Class::Ok,
        Ok(_) => Class::Rejected,
        Err(s) if s.code() == tonic::Code::ResourceExhausted => Class::Overloaded,
        Err(_) => Class::Error,
    }
}

/// Sends `op(ctx, i, due, measured)` on the open-loop schedule for warm-up + duration seconds and
/// records the measured part. Returns the measured wall time.
pub async fn open_loop<F, Fut>(
    ctx: &Arc<Ctx>,
    rate: f64,
    duration: f64,
    recorder: &Arc<Recorder>,
    op: F,
) -> Duration
where
    F: Fn(Arc<Ctx>, u64, Instant, bool) -> Fut + Send + 'static,
    Fut: Future<Output = Class> + Send + 'static,
{
    let args = &ctx.args;
    let schedule = Schedule::new(Instant::now() + Duration::from_millis(20), rate);
    let warmup = schedule.count(Duration::from_secs_f64(args.warmup));
    let total = warmup + schedule.count(Duration::from_secs_f64(duration));
    let inflight = Arc::new(AtomicUsize::new(0));
    let timeout = Duration::from_millis(args.timeout_ms);
    let progress = tokio::spawn(progress(recorder.clone()));
    // The schedule runs on its own thread with nanosleep precision: tokio's
    // timer wheel has 1 ms ticks, which would add up to 1 ms of lateness to
    // every latency.
    let runtime = tokio::runtime::Handle::current();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let scheduler = {
        let (ctx, recorder, inflight) = (ctx.clone(), recorder.clone(), inflight.clone());
        std::thread::spawn(move || {
            for i in 0..total {
                let due = schedule.due(i);
                sleep_until_precise(due.into_std());
                let measured = i >= warmup;
                if measured {
                    recorder.sent.fetch_add(1, Ordering::Relaxed);
                }
                if inflight.load(Ordering::Relaxed) >= ctx.args.max_inflight {
                    if measured {
                        recorder.record(Class::Error, Duration::ZERO);
                    }
                    continue;
                }
                inflight.fetch_add(1, Ordering::Relaxed);
                let n = ctx.next_request.fetch_add(1, Ordering::Relaxed);
                let call = op(ctx.clone(), n, due, measured);
                let (recorder, inflight, done) =
                    (recorder.clone(), inflight.clone(), done_tx.clone());
                runtime.spawn(async move {
                    let class = tokio::time::timeout(timeout, call)
                        .await
                        .unwrap_or(Class::Error);
                    if measured {
                        recorder.record(class, due.elapsed());
                    }
                    inflight.fetch_sub(1, Ordering::Relaxed);
                    drop(done);
                });
            }
        })
    };
    // Every call holds a sender: the channel closes when the scheduler has
    // finished and the last call has ended.
    let _ = done_rx.recv().await;
    let _ = tokio::task::spawn_blocking(move || scheduler.join()).await;
    progress.abort();
    schedule.due(total) - schedule.due(warmup)
}

/// Sleeps until `due` with nanosleep (tens of µs of slack, no spinning: the
/// generator shares the machine with the server).
fn sleep_until_precise(due: std::time::Instant) {
    let now = std::time::Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

async fn progress(recorder: Arc<Recorder>) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        eprintln!(
            "t={}s sent={} ok={} rej={} err={} overloaded={} p99_us={}",
            started.elapsed().as_secs(),
            recorder.count(&recorder.sent),
            recorder.count(&recorder.ok),
            recorder.count(&recorder.rejected),
            recorder.count(&recorder.errors),
            recorder.count(&recorder.overloaded),
            recorder.p99_us()
        );
    }
}

/// Reserve at the rate; each reserved order is then released (not measured).
pub async fn reserve(ctx: &Arc<Ctx>, rate: f64, duration: f64) -> (Arc<Recorder>, Duration) {
    let recorder = Arc::new(Recorder::default());
    let elapsed = open_loop(ctx, rate, duration, &recorder, |ctx, i, _, _| async move {
        let class = ctx.reserve(i).await;
        if class == Class::Ok && rand::rng().random_bool(ctx.args.unreserve_share.clamp(0.0, 1.0)) {
            tokio::spawn(async move { ctx.unreserve_one(i).await });
        }
        class
    })
    .await;
    (recorder, elapsed)
}

/// Proportions of the `mixed` mode, in percent.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub reserve: u32,
    pub unreserve: u32,
    pub fill: u32,
    pub get: u32,
}

impl std::str::FromStr for Mix {
    type Err = String;
    fn from_str(s: &str) -> Result<Mix, String> {
        let mut mix = Mix {
            reserve: 0,
            unreserve: 0,
            fill: 0,
            get: 0,
        };
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or(format!("{part:?}: want name=weight"))?;
            let v: u32 = v
                .parse()
                .map_err(|_| format!("{part:?}: weight is not a number"))?;
            match k {
                "reserve" => mix.reserve = v,
                "unreserve" => mix.unreserve = v,
                "fill" => mix.fill = v,
                "get" => mix.get = v,
                _ => return Err(format!("{k:?}: not reserve, unreserve, fill or get")),
            }
        }
        if mix.reserve + mix.unreserve + mix.fill + mix.get == 0 {
            return Err("all weights are zero".into());
        }
        Ok(mix)
    }
}

pub async fn mixed(ctx: &Arc<Ctx>, mix: Mix) -> (Arc<Recorder>, Duration) {
    let recorder = Arc::new(Recorder::default());
    let total = mix.reserve + mix.unreserve + mix.fill + mix.get;
    let elapsed = open_loop(
        ctx,
        ctx.args.rate,
        ctx.args.duration,
        &recorder,
        move |ctx, i, _, _| async move {
            let pick = rand::rng().random_range(0..total);
            if pick < mix.reserve {
                ctx.reserve(i).await
            } else if pick < mix.reserve + mix.unreserve {
                ctx.unreserve_one(i).await
            } else if pick < mix.reserve + mix.unreserve + mix.fill {
                ctx.fill(i).await
            } else {
                ctx.get(i).await
            }
        },
    )
    .await;
    (recorder, elapsed)
}
