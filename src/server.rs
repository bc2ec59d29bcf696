//! `account-service serve`: the whole pipeline wired in one visible place.
//!
//! 1. metrics registry;
//! 2. the engine thread (opens and replays the WAL: health NOT_SERVING, RPCs
//!    UNAVAILABLE meanwhile);
//! 3. with `--kafka-brokers`: the outbox publisher (before the engine, which
//!    hands it what replay re-derives) and the consumers (once it serves);
//! 4. gRPC listener with health and reflection;
//! 5. `/metrics`.
//!
//! SIGTERM / ctrl-c: stop the consumers, stop accepting, finish in-flight
//! calls, drain the engine queue, sync, let the outbox drain, exit 0.

use crate::config::ServeArgs;
use crate::egress::Outbox;
use crate::engine::{Engine, Phase};
use crate::ingress::auth::Auth;
use crate::ingress::grpc::Service;
use crate::ingress::kafka::KafkaConsumer;
use crate::ingress::limits::Limits;
use crate::metrics::{self, Metrics};
use crate::proto::account::v1::account_service_server::AccountServiceServer;
use crate::proto::account::v1::admin_service_server::AdminServiceServer;
use std::time::Duration;

/// How long a stop waits for clients to finish and close their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Largest request message accepted by AdminService (design 4.4: 1 MiB unary).
pub const REQUEST_BYTES_MAX: usize = 1 << 20;
/// Largest request message accepted by AccountService: a ReserveBatch of
/// 8,192 Reserves with every field at its largest is about 1.6 MB. Validation
/// bounds each field, so only a batch can come near it.
pub const ACCOUNT_REQUEST_BYTES_MAX: usize = 2 << 20;
/// Concurrent HTTP/2 streams per connection.
const STREAMS_PER_CONNECTION_MAX: u32 = 1_024;
/// HTTP/2 pings on a quiet connection, and how long a ping may go unanswered
/// before the connection is closed (a dead or vanished peer).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 receive windows: what a client may send on one stream, and on all
/// of a connection's streams, before the service reads it. Fixed, not
/// adaptive: the HTTP/2 library closes a connection (`ENHANCE_YOUR_CALM`)
/// whose unread small DATA frames cost more than half the connection window
/// in framing overhead (at most 256 bytes a frame). A ReserveStream sends one
/// small frame per item (60-100 bytes), so a stream that stops reading, which
/// is how it pushes back (design 4.1), may hold a stream window of them
/// unread: 256 KiB of ~95-byte items cost ~430 KiB of that budget, and a
/// 16 MiB connection window (8 MiB of budget) leaves room for 18 such streams
/// on one connection. The adaptive window grew the stream window with the
/// connection's, so one stalled stream could exhaust the budget by itself.
pub const STREAM_WINDOW_BYTES: u32 = 256 << 10;
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("{what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0} is not available in this build yet")]
    NotBuilt(&'static str),
    #[error("--grpc-addr {0} is not loopback and no --auth-tokens file is given: anyone who reaches it could move money. \
             Give --auth-tokens FILE (lines `<name> <order|admin|read> <sha256 of the token>`), listen on 127.0.0.1, \
             or say --insecure-no-auth")]
    Insecure(std::net::SocketAddr),
    #[error(transparent)]
    Tokens(#[from] crate::ingress::auth::TokensError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Outbox(#[from] crate::egress::OutboxError),
    #[error("Kafka consumer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Runs the service until SIGTERM / ctrl-c (or the engine fails).
pub async fn serve(args: ServeArgs) -> Result<(), ServeError> {
    let auth = auth(&args)?;
    let mut engine_config = args.engine_config()?;
    let kafka = args.kafka_config()?;
    let metrics = Metrics::new();
    raise_open_file_limit(args.max_connections);
    let grpc_listener = bind("gRPC", args.grpc_addr).await?;
    let metrics_listener = bind("metrics", args.metrics_addr).await?;
    tracing::info!(
        tls = args.tls_cert.is_some(),
        mutual_tls = args.tls_client_ca.is_some(),
        grpc = %grpc_listener.local_addr().map_err(|source| ServeError::Bind { what: "gRPC", addr: args.grpc_addr, source })?,
        metrics = %args.metrics_addr,
        data_dir = %args.data_dir.display(),
        durability = ?args.durability,
        "listening"
    );

    let mut replica_config = args.replica_config()?;
    let outbox = match &kafka {
        // A replica group's outbox runs on its leader only (replica::outbox).
        Some(_) if replica_config.is_some() => None,
        Some(k) => {
            let (outbox, sink) = Outbox::start(k, &args.data_dir, metrics.clone())?;
            engine_config.outbox = Some(sink);
            Some(outbox)
        }
        None => None,
    };
    let idempotency_window_ms = engine_config.state.idempotency_window_ms;
    let tls = tls_config(&args)?;
    if let Some(config) = &mut replica_config {
        // The raft port is secured as the gRPC port is: the same TLS, and
        // the same tokens file (role `replica`).
        config.security = crate::replica::RaftSecurity {
            server_tls: tls.clone(),
            client_tls: raft_client_tls(&args)?,
            auth: auth.clone(),
            token: args.raft_token.clone(),
        };
    }
    let (engine, replica) = match replica_config {
        None => (Some(Engine::start(engine_config, metrics.clone())?), None),
        Some(config) => {
            let raft_addr = config.raft_addr;
            let replica = crate::replica::Replica::start(
                engine_config,
                config,
                kafka.clone(),
                metrics.clone(),
            )
            .await?;
            tracing::info!(node_id = replica.node_id, raft = %raft_addr, "replica listening");
            (None, Some(replica))
        }
    };
    let handle = match (&engine, &replica) {
        (Some(engine), _) => engine.handle(),
        (None, Some(replica)) => replica.handle(),
        (None, None) => unreachable!("one engine or the other"),
    };
    let consumer = match kafka {
        // Its own lane: a backlog of fills never takes the room of Reserve.
        Some(k) => Some(KafkaConsumer::start(
            k,
            handle.on_lane(crate::engine::Lane::Feeds),
            metrics.clone(),
        )?),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);

    let (mut health, health_service) = tonic_health::server::health_reporter();
    set_health(&mut health, tonic_health::ServingStatus::NotServing).await;
    tokio::spawn(follow_phase(
        handle.phase(),
        health.clone(),
        stop_tx.clone(),
    ));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let limits = Limits::new(args.rate_limit()?, auth.callers());
    let mut service = Service::new(handle, metrics.clone(), idempotency_window_ms, auth, limits);
    if let Some(replica) = &replica {
        service = service.with_replica(replica.raft.clone());
    }
    tokio::spawn(signal_stop(stop_tx.clone()));
    let metrics_task = tokio::spawn(metrics::serve(
        metrics_listener,
        metrics.clone(),
        wait_stop(stop_rx.clone()),
    ));

    let incoming = crate::ingress::connections::guard(
        tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
        crate::ingress::connections::ConnectionLimits {
            max_connections: args.max_connections,
            idle_timeout: Duration::from_secs(args.idle_connection_timeout_secs),
        },
        metrics.clone(),
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .timeout(Duration::from_millis(args.request_timeout_ms))
        .max_concurrent_streams(Some(STREAMS_PER_CONNECTION_MAX))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AccountServiceServer::new(service.clone())
                .max_decoding_message_size(ACCOUNT_REQUEST_BYTES_MAX),
        )
        .add_service(AdminServiceServer::new(service).max_decoding_message_size(REQUEST_BYTES_MAX))
        .serve_with_incoming_shutdown(incoming, wait_stop(stop_rx.clone()));
    // Graceful: in-flight calls finish; connections a client keeps open get
    // SHUTDOWN_GRACE before the engine is drained regardless.
    let grace = async {
        wait_stop(stop_rx.clone()).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result?,
        () = grace => tracing::warn!("connections still open after the grace period; closing"),
    }

    tracing::info!("gRPC stopped; draining the engine");
    if let Some(replica) = replica {
        if let Some(consumer) = consumer {
            let _ = tokio::task::spawn_blocking(move || consumer.stop()).await;
        }
        let result = replica.stop().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), metrics_task).await;
        result?;
        tracing::info!("stopped");
        return Ok(());
    }
    let engine_result = tokio::task::spawn_blocking(move || {
        if let Some(consumer) = consumer {
            consumer.stop();
        }
        let result = engine.map_or(Ok(()), Engine::stop);
        // The writer is gone: the outbox drains what it handed over, then ends.
        if let Some(outbox) = outbox {
            outbox.join();
        }
        result
    })
    .await
    .unwrap_or_else(|e| Err(crate::engine::EngineError::Thread(e.to_string())));
    let _ = tokio::time::timeout(Duration::from_secs(2), metrics_task).await;
    engine_result?;
    tracing::info!("stopped");
    Ok(())
}

/// Files the process needs besides its gRPC connections: WAL segments,
/// listeners, PostgreSQL and Kafka sockets, with room to spare.
const FILES_BESIDES_CONNECTIONS: u64 = 256;

/// Raises the soft open-file limit to the hard one (a default soft limit of
/// 1,024 would refuse connections long before `--max-connections`); warns when
/// even the hard limit is too low for `max_connections`.
fn raise_open_file_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    let needed = max_connections as u64 + FILES_BESIDES_CONNECTIONS;
    if limit.rlim_cur < needed {
        tracing::warn!(
            open_file_limit = limit.rlim_cur,
            max_connections,
            "the open-file limit is below --max-connections + {FILES_BESIDES_CONNECTIONS}: \
             accepts fail before the connection limit (raise LimitNOFILE / ulimit -n)"
        );
    }
}

/// A PEM file of the TLS flags.
fn read_pem(path: &std::path::Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|e| ServeError::Tls(format!("{}: {e}", path.display())))
}

/// `--tls-cert` / `--tls-key` (and `--tls-client-ca` for mutual TLS).
fn tls_config(args: &ServeArgs) -> Result<Option<tonic::transport::ServerTlsConfig>, ServeError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let mut tls =
        ServerTlsConfig::new().identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
    if let Some(ca) = &args.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_pem(ca)?));
    }
    Ok(Some(tls))
}

/// With replicas and TLS: how this replica connects to the others' raft
/// ports — it trusts `--tls-client-ca` and shows its own `--tls-cert`.
fn raft_client_tls(
    args: &ServeArgs,
) -> Result<Option<tonic::transport::ClientTlsConfig>, ServeError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_client_ca)
    else {
        return Ok(None);
    };
    Ok(Some(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_pem(ca)?))
            .identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?)),
    ))
}

/// The callers of `--auth-tokens`; without them, only a loopback listener
/// (or `--insecure-no-auth`): reachable must not mean allowed.
fn auth(args: &ServeArgs) -> Result<Auth, ServeError> {
    let tokens = args
        .auth_tokens
        .as_deref()
        .map(crate::ingress::auth::Tokens::load)
        .transpose()?;
    if tokens.is_none() && !args.grpc_addr.ip().is_loopback() && !args.insecure_no_auth {
        return Err(ServeError::Insecure(args.grpc_addr));
    }
    if tokens.is_none() && !args.grpc_addr.ip().is_loopback() {
        tracing::warn!(grpc = %args.grpc_addr, "--insecure-no-auth: anyone who reaches the gRPC port may move money");
    }
    Ok(Auth::new(tokens))
}

async fn bind(
    what: &'static str,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}

/// Mirrors the engine phase into health; an engine that stops stops the server.
async fn follow_phase(
    mut phase: watch::Receiver<Phase>,
    mut health: tonic_health::server::HealthReporter,
    stop: watch::Sender<bool>,
) {
    loop {
        let current = *phase.borrow_and_update();
        match current {
            Phase::Replaying => {}
            Phase::Serving => {
                set_health(&mut health, tonic_health::ServingStatus::Serving).await;
                tracing::info!("serving");
            }
            Phase::Stopped => {
                set_health(&mut health, tonic_health::ServingStatus::NotServing).await;
                let _ = stop.send(true);
                return;
            }
        }
        if phase.changed().await.is_err() {
            let _ = stop.send(true);
            return;
        }
    }
}

/// The overall status ("") and both services' statuses move together.
async fn set_health(
    health: &mut tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    health.set_service_status("", status).await;
    for service in [
        <AccountServiceServer<Service> as tonic::server::NamedService>::NAME,
        <AdminServiceServer<Service> as tonic::server::NamedService>::NAME,
    ] {
        health.set_service_status(service, status).await;
    }
}

async fn signal_stop(stop: watch::Sender<bool>) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    let _ = stop.send(true);
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("stop requested");
    let _ = stop.send(true);
}

async fn wait_stop(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}
