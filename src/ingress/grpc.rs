//! The gRPC services. Each handler validates (INVALID_ARGUMENT naming the field,
//! nothing journaled), submits to the engine (RESOURCE_EXHAUSTED at once when the
//! queue is full, UNAVAILABLE while replaying) and converts the durable reply.
//! Business outcomes travel in `result`, never as gRPC errors.

// Handlers answer `tonic::Status` by value: that is tonic's API.
#![allow(clippy::result_large_err)]

use super::auth::{Access, Auth};
use super::limits::Limits;
use super::{batch, convert, validate};
use crate::domain::Command;
use crate::engine::{now_ms, EngineHandle, Query, Reply, RequestKind, SubmitError, Want};
use crate::metrics::Metrics;
use crate::proto::account::v1 as pb;
use crate::proto::account::v1::account_service_server::AccountService;
use crate::proto::account::v1::admin_service_server::AdminService;
use crate::proto::events;
use std::sync::Arc;
use std::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

/// Runs `handle` inside a server span for `rpc`, continuing the caller's
/// `traceparent`, with the engine's steps as its children.
async fn traced<T, F>(
    rpc: &'static str,
    caller: &'static str,
    metadata: &MetadataMap,
    handle: F,
) -> Result<(T, &'static str), Status>
where
    F: std::future::Future<Output = Result<(T, &'static str), Status>>,
{
    use tracing::Instrument;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!(
        "rpc",
        otel.name = rpc,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = rpc,
        caller,
        outcome = tracing::field::Empty,
    );
    if let Some(parent) = metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::telemetry::TraceParent::parse)
    {
        let _ = span.set_parent(parent.context());
    }
    let cx = span.context();
    let Some(parent) = crate::telemetry::TraceParent::of(&cx) else {
        // Not recorded (sampled out): no trace to stamp.
        return handle.instrument(span).await;
    };
    let trace = crate::telemetry::Trace::new(parent);
    // The steps are emitted inside the RPC's span: it ends after them.
    let work = async {
        let result = handle.await;
        let outcome = match &result {
            Ok((_, outcome)) => outcome,
            Err(status) => code_name(status.code()),
        };
        tracing::Span::current().record("outcome", outcome);
        trace.emit(&cx);
        result
    };
    crate::telemetry::scope(trace.clone(), work.instrument(span)).await
}

/// Implements both `account.v1.AccountService` and `account.v1.AdminService`.
#[derive(Clone)]
pub struct Service {
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    /// The engine's idempotency window: the edge refuses an expiry older than
    /// it (see `validate::reserve`). The engine journals its configured window
    /// before it serves, so this is the window in force.
    idempotency_window_ms: i64,
    /// Callers and roles: checked before anything else.
    auth: Auth,
    /// Per-caller rate limits, checked right after.
    limits: Limits,
    /// With replicas: the group's raft, for `ClusterStatus`.
    raft: Option<openraft::Raft<crate::replica::TypeConfig>>,
}

impl Service {
    pub fn new(
        engine: EngineHandle,
        metrics: Arc<Metrics>,
        idempotency_window_ms: i64,
        auth: Auth,
        limits: Limits,
    ) -> Service {
        assert!(idempotency_window_ms > 0);
        Service {
            engine,
            metrics,
            idempotency_window_ms,
            auth,
            limits,
            raft: None,
        }
    }

    /// A replica's service: `ClusterStatus` reports its group.
    pub fn with_replica(mut self, raft: openraft::Raft<crate::replica::TypeConfig>) -> Service {
        self.raft = Some(raft);
        self
    }

    /// Runs one RPC: the caller is authorized for `access` first (a refusal
    /// journals nothing), then `handle` does the work; latency and outcome
    /// are recorded under the caller's name.
    async fn observe<T, F>(
        &self,
        rpc: &'static str,
        access: Access,
        metadata: &MetadataMap,
        handle: F,
    ) -> Result<Response<T>, Status>
    where
        F: std::future::Future<Output = Result<(T, &'static str), Status>>,
    {
        let started = Instant::now();
        let caller = self.admit(rpc, access, metadata, started)?;
        let result = if crate::telemetry::enabled() {
            traced(rpc, caller, metadata, handle).await
        } else {
            handle.await
        };
        let outcome = match &result {
            Ok((_, outcome)) => outcome,
            Err(status) => code_name(status.code()),
        };
        self.metrics.observe_rpc(rpc, caller, outcome, started);
        result.map(|(reply, _)| Response::new(reply))
    }

    /// Authorizes the caller for `access`, then its rate limit; a refusal is
    /// counted under the RPC and journals nothing.
    fn admit(
        &self,
        rpc: &'static str,
        access: Access,
        metadata: &MetadataMap,
        started: Instant,
    ) -> Result<&'static str, Status> {
        let caller = match self.auth.authorize(metadata, rpc, access) {
            Ok(caller) => caller,
            Err(denied) => {
                let status = Status::from(denied);
                let outcome = code_name(status.code());
                self.metrics
                    .observe_rpc(rpc, "unauthorized", outcome, started);
                return Err(status);
            }
        };
        if deadline_already_past(metadata) {
            self.metrics.observe_rpc(
                rpc,
                caller,
                code_name(tonic::Code::DeadlineExceeded),
                started,
            );
            return Err(Status::deadline_exceeded(format!(
                "grpc-timeout under {} µs: the reply could not arrive in time (one journal \
                 sync takes longer), so nothing was done",
                DEADLINE_MIN.as_micros()
            )));
        }
        if let Err(retry_after_ms) = self.limits.admit(caller) {
            let mut status = Status::resource_exhausted(format!(
                "caller {caller} is over its rate limit; retry in {retry_after_ms} ms with the same key"
            ));
            status
                .metadata_mut()
                .insert("retry-after-ms", retry_after_ms.into());
            self.metrics
                .observe_rpc(rpc, caller, "RATE_LIMITED", started);
            return Err(status);
        }
        Ok(caller)
    }

    /// A batch call (not all-or-nothing) of Reserves or Unreserves.
    async fn batch<T: batch::Item>(&self, items: Vec<T>) -> Result<Vec<T::Reply>, Status> {
        batch::check_size(items.len(), batch::BATCH_ITEMS_MAX)?;
        let answered = batch::submit_batch(
            &self.engine,
            items,
            now_ms(),
            self.idempotency_window_ms,
            Want::Reservation,
            batch::Naming::Batch,
        )
        .map_err(|(e, _)| submit_status(e))?;
        answered.await.map_err(submit_status)
    }

    /// Opens a stream of Reserves or Unreserves: authorized once, rate limited
    /// per chunk of items read, served by [`batch::serve_stream`].
    fn stream<T: batch::Item>(
        &self,
        rpc: &'static str,
        request: Request<Streaming<T>>,
    ) -> Result<Response<ReplyStream<T::Reply>>, Status> {
        let started = Instant::now();
        let caller = self.admit(rpc, Access::Order, request.metadata(), started)?;
        self.metrics.observe_rpc(rpc, caller, "OPENED", started);
        let (replies, stream) = batch::reply_channel();
        let limits = self.limits.clone();
        let admit = move |_items: usize| {
            limits.admit(caller).map_err(|retry_after_ms| {
                format!(
                    "caller {caller} is over its rate limit: not applied; \
                     resend in {retry_after_ms} ms with the same request_id"
                )
            })
        };
        tokio::spawn(batch::serve_stream(
            self.engine.clone(),
            request.into_inner(),
            replies,
            self.idempotency_window_ms,
            Want::Reservation,
            admit,
        ));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn command(
        &self,
        command: Command,
        want: Want,
    ) -> Result<crate::engine::CommandReply, Status> {
        match self.engine.call(RequestKind::Command(command, want)).await {
            Ok(Reply::Command(reply)) => Ok(reply),
            Ok(_) => Err(Status::internal(
                "engine answered a command with a query reply",
            )),
            Err(e) => Err(submit_status(e)),
        }
    }

    async fn admin(&self, command: Command) -> Result<(pb::CommandReply, &'static str), Status> {
        let reply = self.command(command, Want::Account).await?;
        let outcome = reply.outcome;
        Ok((
            pb::CommandReply {
                result: convert::result(outcome.result) as i32,
                replayed: outcome.replayed,
                sequence: outcome.sequence,
                message: convert::message(&outcome),
                account: reply.account.as_ref().map(convert::account),
            },
            outcome.result.name(),
        ))
    }
}

/// The trailer that names the leader's gRPC address on a follower's `UNAVAILABLE`.
pub const LEADER_TRAILER: &str = "leader";

pub fn submit_status(e: SubmitError) -> Status {
    match e {
        SubmitError::Overloaded => {
            Status::resource_exhausted("ingress queue is full; retry with the same request_id")
        }
        SubmitError::NotReady => {
            Status::unavailable("replaying the write-ahead log; not serving yet")
        }
        SubmitError::Stopped => Status::unavailable("the engine has stopped"),
        SubmitError::NotLeader(leader) => {
            let message = match &leader {
                Some(addr) => format!("this replica does not lead; the leader is at {addr} (trailer `leader`)"),
                None => "this replica does not lead and no leader is known yet (an election?); retry shortly with the same request_id".into(),
            };
            let mut metadata = tonic::metadata::MetadataMap::new();
            if let Some(value) = leader.and_then(|a| a.parse().ok()) {
                metadata.insert(LEADER_TRAILER, value);
            }
            Status::with_metadata(tonic::Code::Unavailable, message, metadata)
        }
        SubmitError::NotCommitted => Status::unavailable(
            "not known to be committed in time (the leader lost its quorum or its leadership): \
             it may still be applied; resend with the same request_id",
        ),
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        _ => "ERROR",
    }
}

#[tonic::async_trait]
impl AccountService for Service {
    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveReply>, Status> {
        self.observe("Reserve", Access::Order, request.metadata(), async {
            let command =
                validate::reserve(request.get_ref(), now_ms(), self.idempotency_window_ms)?;
            let reply = self
                .command(Command::Reserve(command), Want::Reservation)
                .await?;
            let request_id = &request.get_ref().request_id;
            Ok((
                batch::reserve_reply(request_id, &reply),
                reply.outcome.result.name(),
            ))
        })
        .await
    }

    async fn unreserve(
        &self,
        request: Request<pb::UnreserveRequest>,
    ) -> Result<Response<pb::UnreserveReply>, Status> {
        self.observe("Unreserve", Access::Order, request.metadata(), async {
            let command = validate::unreserve(request.get_ref())?;
            let reply = self
                .command(Command::Unreserve(command), Want::Reservation)
                .await?;
            let request_id = &request.get_ref().request_id;
            Ok((
                batch::unreserve_reply(request_id, &reply),
                reply.outcome.result.name(),
            ))
        })
        .await
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        self.observe("GetAccount", Access::Read, request.metadata(), async {
            let id = validate::account_id("account_id", request.get_ref().account_id)?;
            match self
                .engine
                .call(RequestKind::Query(Query::Account(id)))
                .await
            {
                Ok(Reply::Account(Some(account))) => Ok((convert::account(&account), "OK")),
                Ok(Reply::Account(None)) => {
                    Err(Status::not_found(format!("account {id} not found")))
                }
                Ok(_) => Err(Status::internal("unexpected engine reply")),
                Err(e) => Err(submit_status(e)),
            }
        })
        .await
    }

    async fn get_reservation(
        &self,
        request: Request<pb::GetReservationRequest>,
    ) -> Result<Response<pb::Reservation>, Status> {
        self.observe("GetReservation", Access::Read, request.metadata(), async {
            let r = request.get_ref();
            let id = validate::account_id("account_id", r.account_id)?;
            let order_id = validate::id("order_id", &r.order_id)?;
            match self
                .engine
                .call(RequestKind::Query(Query::Reservation(id, order_id)))
                .await
            {
                Ok(Reply::Reservation(Some(res))) => Ok((convert::reservation(&res), "OK")),
                Ok(Reply::Reservation(None)) => Err(Status::not_found(format!(
                    "no reservation for account {id} order {order_id}"
                ))),
                Ok(_) => Err(Status::internal("unexpected engine reply")),
                Err(e) => Err(submit_status(e)),
            }
        })
        .await
    }

    async fn reserve_batch(
        &self,
        request: Request<pb::ReserveBatchRequest>,
    ) -> Result<Response<pb::ReserveBatchReply>, Status> {
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        self.observe("ReserveBatch", Access::Order, &metadata, async {
            let replies = if request.all_or_nothing {
                batch::check_size(request.requests.len(), batch::BASKET_ITEMS_MAX)?;
                batch::basket(
                    &self.engine,
                    request.requests,
                    now_ms(),
                    self.idempotency_window_ms,
                )
                .await?
            } else {
                self.batch(request.requests).await?
            };
            Ok((pb::ReserveBatchReply { replies }, "OK"))
        })
        .await
    }

    async fn unreserve_batch(
        &self,
        request: Request<pb::UnreserveBatchRequest>,
    ) -> Result<Response<pb::UnreserveBatchReply>, Status> {
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        self.observe("UnreserveBatch", Access::Order, &metadata, async {
            let replies = self.batch(request.requests).await?;
            Ok((pb::UnreserveBatchReply { replies }, "OK"))
        })
        .await
    }

    type ReserveStreamStream = ReplyStream<pb::ReserveReply>;

    async fn reserve_stream(
        &self,
        request: Request<Streaming<pb::ReserveRequest>>,
    ) -> Result<Response<Self::ReserveStreamStream>, Status> {
        self.stream("ReserveStream", request)
    }

    type UnreserveStreamStream = ReplyStream<pb::UnreserveReply>;

    async fn unreserve_stream(
        &self,
        request: Request<Streaming<pb::UnreserveRequest>>,
    ) -> Result<Response<Self::UnreserveStreamStream>, Status> {
        self.stream("UnreserveStream", request)
    }
}

/// The reply half of a stream RPC.
pub type ReplyStream<R> =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<R, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AdminService for Service {
    async fn open_account(
        &self,
        request: Request<pb::OpenAccountRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        self.observe("OpenAccount", Access::Admin, request.metadata(), async {
            let command = validate::open_account(request.get_ref())?;
            self.admin(Command::OpenAccount(command)).await
        })
        .await
    }

    async fn set_account_status(
        &self,
        request: Request<pb::SetAccountStatusRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        self.observe(
            "SetAccountStatus",
            Access::Admin,
            request.metadata(),
            async {
                let command = validate::set_account_status(request.get_ref())?;
                self.admin(Command::SetAccountStatus(command)).await
            },
        )
        .await
    }

    async fn deposit(
        &self,
        request: Request<events::DepositEvent>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        self.observe("Deposit", Access::Admin, request.metadata(), async {
            let command = validate::deposit(request.get_ref(), None)?;
            self.admin(Command::Deposit(command)).await
        })
        .await
    }

    async fn withdraw(
        &self,
        request: Request<events::WithdrawEvent>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        self.observe("Withdraw", Access::Admin, request.metadata(), async {
            let command = validate::withdrawal(request.get_ref(), None)?;
            self.admin(Command::Withdraw(command)).await
        })
        .await
    }

    async fn apply_fill(
        &self,
        request: Request<events::FillEvent>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        self.observe("ApplyFill", Access::Admin, request.metadata(), async {
            let command = validate::fill(request.get_ref(), None)?;
            self.admin(Command::Fill(command)).await
        })
        .await
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        self.observe("ClusterStatus", Access::Read, request.metadata(), async {
            Ok((self.status_now().await?, "OK"))
        })
        .await
    }

    async fn add_replica(
        &self,
        request: Request<pb::AddReplicaRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        self.observe("AddReplica", Access::Admin, request.metadata(), async {
            let q = request.get_ref();
            if q.node_id == 0 {
                return Err(Status::invalid_argument("node_id: must be > 0"));
            }
            if q.raft_addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(Status::invalid_argument(
                    "raft_addr: must be HOST:PORT with an IP address",
                ));
            }
            let raft = self.replicas()?;
            crate::replica::add_replica(raft, q.node_id, &q.raft_addr)
                .await
                .map_err(submit_or_membership_status)?;
            Ok((self.status_now().await?, "OK"))
        })
        .await
    }

    async fn remove_replica(
        &self,
        request: Request<pb::RemoveReplicaRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        self.observe("RemoveReplica", Access::Admin, request.metadata(), async {
            let node_id = request.get_ref().node_id;
            if node_id == 0 {
                return Err(Status::invalid_argument("node_id: must be > 0"));
            }
            let raft = self.replicas()?;
            crate::replica::remove_replica(raft, node_id)
                .await
                .map_err(submit_or_membership_status)?;
            Ok((self.status_now().await?, "OK"))
        })
        .await
    }
}

fn submit_or_membership_status(e: crate::replica::MembershipError) -> Status {
    use crate::replica::MembershipError;
    match e {
        MembershipError::Submit(e) => submit_status(e),
        MembershipError::Invalid(message) => Status::failed_precondition(message),
    }
}

impl Service {
    /// The group's raft, or FAILED_PRECONDITION on a single node.
    fn replicas(&self) -> Result<&openraft::Raft<crate::replica::TypeConfig>, Status> {
        self.raft.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this service runs without replicas (serve without --peers)",
            )
        })
    }

    /// `ClusterStatus` of this replica, now.
    async fn status_now(&self) -> Result<pb::ClusterStatusReply, Status> {
        let (sequence, digest) = match self.engine.call(RequestKind::Query(Query::Digest)).await {
            Ok(Reply::Digest { sequence, digest }) => (sequence, digest),
            Ok(_) => {
                return Err(Status::internal(
                    "engine answered a digest query with another reply",
                ))
            }
            Err(e) => return Err(submit_status(e)),
        };
        Ok(match &self.raft {
            Some(raft) => crate::replica::status(raft, sequence, digest),
            None => pb::ClusterStatusReply {
                node_id: 0,
                role: "SINGLE".into(),
                applied_sequence: sequence,
                digest,
                ..Default::default()
            },
        })
    }
}

/// The shortest deadline a call may carry and still be served: below it the
/// deadline has in effect passed on arrival (a journal sync alone takes
/// longer), and the call is refused before anything is journaled.
pub const DEADLINE_MIN: std::time::Duration = std::time::Duration::from_micros(100);

/// Whether the call's `grpc-timeout` (gRPC over HTTP/2: 1-8 digits and a unit,
/// `H M S m u n`) is under [`DEADLINE_MIN`]. A malformed header is left to
/// tonic, which ignores it.
fn deadline_already_past(metadata: &MetadataMap) -> bool {
    grpc_timeout(metadata).is_some_and(|timeout| timeout < DEADLINE_MIN)
}

fn grpc_timeout(metadata: &MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3_600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    fn with_timeout(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", value.parse().unwrap());
        m
    }

    #[test]
    fn a_deadline_under_the_minimum_is_past_and_others_are_not() {
        for past in ["0n", "1n", "99999n", "99u", "0S", "0m"] {
            assert!(deadline_already_past(&with_timeout(past)), "{past}");
        }
        for fine in ["100u", "100000n", "1m", "5S", "1H", "99999999M"] {
            assert!(!deadline_already_past(&with_timeout(fine)), "{fine}");
        }
        for malformed in ["", "m", "1x", "123456789n", "-1m", "1.5S"] {
            assert_eq!(grpc_timeout(&with_timeout(malformed)), None, "{malformed}");
        }
        assert!(!deadline_already_past(&MetadataMap::new()));
    }
}
