//! The service's own client subcommands (`account open|get|status`,
//! `reservation get`, `deposit`, `withdraw`, `reserve`, `unreserve`, `fill`),
//! so a newcomer needs no other tool. Each prints the reply as `key: value`
//! lines; a gRPC error exits non-zero with its code and message.

use crate::proto::account::v1 as pb;
use crate::proto::account::v1::account_service_client::AccountServiceClient;
use crate::proto::account::v1::admin_service_client::AdminServiceClient;
use crate::proto::events;
use anyhow::Context;
use std::fmt::Write;

#[derive(Clone, Debug, clap::Args)]
pub struct Conn {
    /// Address of the service.
    #[arg(long, env = "ACCOUNT_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Bearer token of the caller (`--auth-tokens` on the service); prefer
    /// the environment variable, which other users cannot see in `ps`.
    #[arg(long, env = "ACCOUNT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TLS: the CA (PEM) that signed the service's certificate (`https://` addresses).
    #[arg(long, env = "ACCOUNT_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Mutual TLS: this client's certificate (PEM), with `--tls-key`.
    #[arg(long, env = "ACCOUNT_TLS_CLIENT_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "ACCOUNT_TLS_CLIENT_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl Conn {
    fn tls(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        if self.tls_ca.is_none() && self.tls_cert.is_none() {
            return Ok(None);
        }
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &self.tls_ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(Some(tls))
    }
}

/// Adds `authorization: Bearer <token>` to every call (when there is a token).
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> anyhow::Result<BearerToken> {
        token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map(BearerToken)
            .map_err(|_| anyhow::anyhow!("--token: not a valid header value"))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client channel that sends the bearer token.
pub type Authorized =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>;

#[derive(Clone, Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Open, inspect or change the status of an account.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Inspect a reservation.
    #[command(subcommand)]
    Reservation(ReservationCommand),
    /// Credit cash (AdminService.Deposit).
    Deposit(CashArgs),
    /// Debit cash (AdminService.Withdraw).
    Withdraw(CashArgs),
    /// Lock cash for a buy or shares for a sell.
    Reserve(ReserveArgs),
    /// Release what is left of an order's reservation (or part of it).
    Unreserve(UnreserveArgs),
    /// Apply a fill (AdminService.ApplyFill); filled amount = price x quantity.
    Fill(FillArgs),
    /// This replica's view of its group: leader, term, each replica's
    /// progress (AdminService.ClusterStatus; any replica answers).
    Cluster {
        #[command(flatten)]
        conn: Conn,
    },
    /// Add a replica to the group (AdminService.AddReplica, at the leader):
    /// start it first with its --node-id, --raft-addr and the group's
    /// --peers; it catches up as a learner, then votes.
    AddReplica {
        #[arg(long)]
        node_id: u64,
        /// Its --raft-addr (HOST:PORT).
        #[arg(long)]
        raft_addr: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a replica from the group (AdminService.RemoveReplica, at the
    /// leader); stop it afterwards.
    RemoveReplica {
        #[arg(long)]
        node_id: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum AccountCommand {
    Open {
        #[arg(long)]
        account_id: i64,
        #[arg(long, default_value = "USD")]
        currency: String,
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    Get {
        #[arg(long)]
        account_id: i64,
        #[command(flatten)]
        conn: Conn,
    },
    Status {
        #[arg(long)]
        account_id: i64,
        /// active, suspended or closed
        #[arg(long)]
        status: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum ReservationCommand {
    Get {
        #[arg(long)]
        account_id: i64,
        #[arg(long)]
        order_id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Clone, Debug, clap::Args)]
pub struct CashArgs {
    #[arg(long)]
    pub account_id: i64,
    #[arg(long, default_value = "USD")]
    pub currency: String,
    #[arg(long)]
    pub amount: String,
    /// Idempotency key (default: a fresh one).
    #[arg(long)]
    pub event_id: Option<String>,
    /// Where the money comes from (deposit) or goes (withdraw): the Payment
    /// service's reference, informational (DepositEvent.source,
    /// WithdrawEvent.destination).
    #[arg(long, alias = "source", alias = "destination", default_value = "")]
    pub reference: String,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Clone, Debug, clap::Args)]
pub struct ReserveArgs {
    #[arg(long)]
    pub account_id: i64,
    #[arg(long)]
    pub order_id: String,
    /// cash or security
    #[arg(long, default_value = "cash")]
    pub kind: String,
    /// Currency (cash) or symbol (security).
    #[arg(long, default_value = "USD")]
    pub asset: String,
    #[arg(long)]
    pub amount: String,
    /// Unix ms after which the engine releases it (0 = never).
    #[arg(long, default_value_t = 0)]
    pub expires_at_ms: i64,
    #[arg(long)]
    pub request_id: Option<String>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Clone, Debug, clap::Args)]
pub struct UnreserveArgs {
    #[arg(long)]
    pub account_id: i64,
    #[arg(long)]
    pub order_id: String,
    /// Part to release (default: all that remains).
    #[arg(long, default_value = "")]
    pub amount: String,
    #[arg(long)]
    pub request_id: Option<String>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Clone, Debug, clap::Args)]
pub struct FillArgs {
    #[arg(long)]
    pub account_id: i64,
    #[arg(long)]
    pub order_id: String,
    #[arg(long)]
    pub symbol: String,
    /// buy or sell
    #[arg(long)]
    pub side: String,
    #[arg(long)]
    pub quantity: String,
    #[arg(long)]
    pub price: String,
    /// Default: price x quantity, half-even to 8 places.
    #[arg(long)]
    pub filled_amount: Option<String>,
    /// Settlement currency (default: the account's base currency).
    #[arg(long, default_value = "")]
    pub currency: String,
    #[arg(long)]
    pub event_id: Option<String>,
    #[command(flatten)]
    pub conn: Conn,
}

fn fresh_id(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{nanos}-{}", std::process::id())
}

async fn channel(conn: &Conn) -> anyhow::Result<(tonic::transport::Channel, BearerToken)> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(conn.addr.clone())
        .with_context(|| format!("--addr {}", conn.addr))?;
    if let Some(tls) = conn.tls()? {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}", conn.addr))?;
    Ok((channel, BearerToken::new(conn.token.as_deref())?))
}

async fn admin(conn: &Conn) -> anyhow::Result<AdminServiceClient<Authorized>> {
    let (channel, token) = channel(conn).await?;
    Ok(AdminServiceClient::with_interceptor(channel, token))
}

async fn accounts(conn: &Conn) -> anyhow::Result<AccountServiceClient<Authorized>> {
    let (channel, token) = channel(conn).await?;
    Ok(AccountServiceClient::with_interceptor(channel, token))
}

/// How often a call follows a `leader` trailer (or waits out an election)
/// before its `UNAVAILABLE` is the answer.
const FOLLOW_MAX: usize = 10;
const FOLLOW_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

/// Where a replica's `UNAVAILABLE` says the leader is (`leader` trailer), as
/// an address with `conn`'s scheme.
pub fn leader_of(status: &tonic::Status, conn: &str) -> Option<String> {
    let leader = status.metadata().get("leader")?.to_str().ok()?;
    let scheme = conn.split_once("://").map_or("http", |(s, _)| s);
    Some(format!("{scheme}://{leader}"))
}

/// One call, sent again to the leader a replica names (or after a pause, in
/// an election), with the same request (its idempotency key): a follower
/// applies nothing.
macro_rules! follow {
    ($conn:expr, $client:ident, $method:ident, $request:expr) => {{
        let given = $conn.clone();
        let mut conn = given.clone();
        let request = $request;
        let mut hops = 0;
        loop {
            let mut client = match $client(&conn).await {
                Ok(client) => client,
                // The leader it was sent to is gone: ask the given address
                // again once the group has had time to elect another.
                Err(_) if hops < FOLLOW_MAX && conn.addr != given.addr => {
                    hops += 1;
                    conn = given.clone();
                    tokio::time::sleep(FOLLOW_WAIT).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let result = client.$method(request.clone()).await;
            match result {
                Err(status) if hops < FOLLOW_MAX && status.code() == tonic::Code::Unavailable => {
                    hops += 1;
                    match leader_of(&status, &conn.addr) {
                        Some(addr) if addr != conn.addr => conn.addr = addr,
                        _ => tokio::time::sleep(FOLLOW_WAIT).await,
                    }
                }
                other => break other.map_err(status_error)?,
            }
        }
    }};
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

/// Runs one client subcommand and prints its reply to stdout.
pub async fn run(command: ClientCommand) -> anyhow::Result<()> {
    let text = match command {
        ClientCommand::Account(AccountCommand::Open {
            account_id,
            currency,
            request_id,
            conn,
        }) => {
            let request = pb::OpenAccountRequest {
                request_id: request_id.unwrap_or_else(|| fresh_id("open")),
                account_id,
                base_currency: currency,
            };
            let reply = follow!(conn, admin, open_account, request);
            command_reply(&reply.into_inner())
        }
        ClientCommand::Account(AccountCommand::Get { account_id, conn }) => {
            let reply = follow!(
                conn,
                accounts,
                get_account,
                pb::GetAccountRequest { account_id }
            );
            account(&reply.into_inner())
        }
        ClientCommand::Account(AccountCommand::Status {
            account_id,
            status,
            reason,
            request_id,
            conn,
        }) => {
            let status = match status.to_ascii_lowercase().as_str() {
                "active" => pb::AccountStatus::Active,
                "suspended" => pb::AccountStatus::Suspended,
                "closed" => pb::AccountStatus::Closed,
                other => anyhow::bail!("--status: {other:?} is not active, suspended or closed"),
            };
            let request = pb::SetAccountStatusRequest {
                request_id: request_id.unwrap_or_else(|| fresh_id("status")),
                account_id,
                status: status as i32,
                reason,
            };
            let reply = follow!(conn, admin, set_account_status, request);
            command_reply(&reply.into_inner())
        }
        ClientCommand::Reservation(ReservationCommand::Get {
            account_id,
            order_id,
            conn,
        }) => {
            let reply = follow!(
                conn,
                accounts,
                get_reservation,
                pb::GetReservationRequest {
                    account_id,
                    order_id,
                }
            );
            reservation(&reply.into_inner(), "")
        }
        ClientCommand::Deposit(a) => {
            let request = events::DepositEvent {
                event_id: a.event_id.unwrap_or_else(|| fresh_id("deposit")),
                account_id: a.account_id,
                currency: a.currency,
                amount: a.amount,
                timestamp: crate::engine::now_ms(),
                source: a.reference,
            };
            let reply = follow!(a.conn, admin, deposit, request);
            command_reply(&reply.into_inner())
        }
        ClientCommand::Withdraw(a) => {
            let request = events::WithdrawEvent {
                event_id: a.event_id.unwrap_or_else(|| fresh_id("withdraw")),
                account_id: a.account_id,
                currency: a.currency,
                amount: a.amount,
                timestamp: crate::engine::now_ms(),
                destination: a.reference,
            };
            let reply = follow!(a.conn, admin, withdraw, request);
            command_reply(&reply.into_inner())
        }
        ClientCommand::Reserve(a) => {
            let kind = match a.kind.to_ascii_lowercase().as_str() {
                "cash" => pb::ReservationKind::Cash,
                "security" => pb::ReservationKind::Security,
                other => anyhow::bail!("--kind: {other:?} is not cash or security"),
            };
            let request = pb::ReserveRequest {
                request_id: a.request_id.unwrap_or_else(|| fresh_id("reserve")),
                account_id: a.account_id,
                order_id: a.order_id,
                kind: kind as i32,
                asset: a.asset,
                amount: a.amount,
                expires_at_ms: a.expires_at_ms,
            };
            let r = follow!(a.conn, accounts, reserve, request).into_inner();
            let mut out = head(r.result, r.replayed, r.sequence, &r.message);
            let _ = writeln!(out, "available: {}\nreserved: {}", r.available, r.reserved);
            if let Some(res) = &r.reservation {
                out.push_str(&reservation(res, "reservation."));
            }
            out
        }
        ClientCommand::Unreserve(a) => {
            let request = pb::UnreserveRequest {
                request_id: a.request_id.unwrap_or_else(|| fresh_id("unreserve")),
                account_id: a.account_id,
                order_id: a.order_id,
                amount: a.amount,
            };
            let r = follow!(a.conn, accounts, unreserve, request).into_inner();
            let mut out = head(r.result, r.replayed, r.sequence, &r.message);
            let _ = writeln!(
                out,
                "released: {}\navailable: {}\nreserved: {}",
                r.released, r.available, r.reserved
            );
            if let Some(res) = &r.reservation {
                out.push_str(&reservation(res, "reservation."));
            }
            out
        }
        ClientCommand::Fill(a) => {
            let filled_amount = match a.filled_amount {
                Some(v) => v,
                None => {
                    let price = crate::domain::amount::parse_positive(&a.price)
                        .map_err(|e| anyhow::anyhow!("--price: {e}"))?;
                    let quantity = crate::domain::amount::parse_positive(&a.quantity)
                        .map_err(|e| anyhow::anyhow!("--quantity: {e}"))?;
                    let notional = price
                        .checked_mul(quantity)
                        .ok_or_else(|| anyhow::anyhow!("price x quantity overflows"))?;
                    crate::domain::amount::format(crate::domain::amount::round(notional))
                }
            };
            let request = events::FillEvent {
                event_id: a.event_id.unwrap_or_else(|| fresh_id("fill")),
                order_id: a.order_id,
                account_id: a.account_id,
                symbol: a.symbol,
                side: a.side.to_ascii_uppercase(),
                quantity: a.quantity,
                fill_price: a.price,
                filled_amount,
                timestamp: crate::engine::now_ms(),
                currency: a.currency,
            };
            let reply = follow!(a.conn, admin, apply_fill, request);
            command_reply(&reply.into_inner())
        }
        ClientCommand::Cluster { conn } => {
            let s = admin(&conn)
                .await?
                .cluster_status(pb::ClusterStatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            cluster_text(&s)
        }
        ClientCommand::AddReplica {
            node_id,
            raft_addr,
            conn,
        } => {
            let request = pb::AddReplicaRequest { node_id, raft_addr };
            cluster_text(&follow!(conn, admin, add_replica, request).into_inner())
        }
        ClientCommand::RemoveReplica { node_id, conn } => {
            let request = pb::RemoveReplicaRequest { node_id };
            cluster_text(&follow!(conn, admin, remove_replica, request).into_inner())
        }
    };
    print!("{text}");
    Ok(())
}

/// `ClusterStatus` as `key: value` lines, one per replica after.
fn cluster_text(s: &pb::ClusterStatusReply) -> String {
    {
        let mut out = format!(
                "node_id: {}\nrole: {}\nterm: {}\nleader_id: {}\nleader_grpc_addr: {}\n\
                 applied_sequence: {}\ndigest: {:016x}\nlast_log_index: {}\napplied_log_index: {}\n",
                s.node_id, s.role, s.term, s.leader_id, s.leader_grpc_addr, s.applied_sequence,
                s.digest, s.last_log_index, s.applied_log_index
            );
        let _ = writeln!(
            out,
            "purged_log_index: {}\nsnapshot_log_index: {}",
            s.purged_log_index, s.snapshot_log_index
        );
        for r in &s.replicas {
            let _ = writeln!(
                out,
                "replica.{}: raft {} grpc {} voter {} matched {} lag {}",
                r.node_id, r.raft_addr, r.grpc_addr, r.voter, r.matched_log_index, r.lag
            );
        }
        out
    }
}

fn result_name(result: i32) -> String {
    pb::Result::try_from(result)
        .map_or_else(|_| result.to_string(), |r| r.as_str_name().to_string())
}

fn head(result: i32, replayed: bool, sequence: u64, message: &str) -> String {
    let mut out = format!(
        "result: {}\nreplayed: {replayed}\nsequence: {sequence}\n",
        result_name(result)
    );
    if !message.is_empty() {
        let _ = writeln!(out, "message: {message}");
    }
    out
}

fn command_reply(r: &pb::CommandReply) -> String {
    let mut out = head(r.result, r.replayed, r.sequence, &r.message);
    if let Some(a) = &r.account {
        out.push_str(&account(a));
    }
    out
}

fn account(a: &pb::Account) -> String {
    let status = pb::AccountStatus::try_from(a.status).map_or("?", |s| s.as_str_name());
    let mut out = format!(
        "account_id: {}\nstatus: {status}\nbase_currency: {}\noverdrawn: {}\nstate_sequence: {}\n",
        a.account_id, a.base_currency, a.overdrawn, a.sequence
    );
    for c in &a.cash {
        let _ = writeln!(
            out,
            "cash.{}: available={} reserved={}",
            c.currency, c.available, c.reserved
        );
    }
    for p in &a.positions {
        let _ = writeln!(
            out,
            "position.{}: quantity={} reserved_quantity={} cost_basis={} average_price={} realized_pnl={} currency={}",
            p.symbol, p.quantity, p.reserved_quantity, p.cost_basis, p.average_price, p.realized_pnl, p.currency
        );
    }
    out
}

fn reservation(r: &pb::Reservation, prefix: &str) -> String {
    let kind = pb::ReservationKind::try_from(r.kind).map_or("?", |k| k.as_str_name());
    let state = pb::ReservationState::try_from(r.state).map_or("?", |s| s.as_str_name());
    format!(
        "{prefix}order_id: {}\n{prefix}kind: {kind}\n{prefix}asset: {}\n{prefix}amount: {}\n{prefix}remaining: {}\n{prefix}consumed: {}\n{prefix}released: {}\n{prefix}state: {state}\n{prefix}expires_at_ms: {}\n{prefix}sequence: {}\n",
        r.order_id, r.asset, r.amount, r.remaining, r.consumed, r.released, r.expires_at_ms, r.sequence
    )
}
