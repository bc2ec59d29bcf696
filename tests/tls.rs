//! TLS and mutual TLS for gRPC (rustls through tonic), and PostgreSQL over
//! TLS when the URL asks for it, with certificates made here (rcgen): a CA,
//! the server's certificate for 127.0.0.1, a client's.

mod common;

use account_service::proto::account::v1 as pb;
use account_service::proto::account::v1::admin_service_client::AdminServiceClient;
use common::server::Server;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["order-desk".into()]);
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

fn tls(pki: &Pki, with_identity: bool) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()));
    if with_identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&pki.client_cert).unwrap(),
            std::fs::read(&pki.client_key).unwrap(),
        ));
    }
    tls
}

async fn connect(port: u16, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://127.0.0.1:{port}")).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// An OpenAccount over `channel`: Ok, or the error as text.
async fn open_account(channel: Channel, request_id: &str) -> Result<(), String> {
    AdminServiceClient::new(channel)
        .open_account(pb::OpenAccountRequest {
            request_id: request_id.into(),
            account_id: 1,
            base_currency: "USD".into(),
        })
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// Waits until the TLS listener answers a call with `tls`.
async fn wait_tls(server: &mut Server, pki: &Pki) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = server.wait_exit(Duration::ZERO) {
            panic!("account-service exited: {status}");
        }
        if let Ok(channel) = connect(server.grpc_port, Some(tls(pki, true))).await {
            if open_account(channel, "probe").await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no TLS service within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The service over TLS (`mutual`: with `--tls-client-ca`), once it answers.
async fn start_tls(dir: &Path, pki: &Pki, mutual: bool) -> Server {
    let mut args = vec![
        "--tls-cert",
        pki.server_cert.to_str().unwrap(),
        "--tls-key",
        pki.server_key.to_str().unwrap(),
    ];
    if mutual {
        args.extend(["--tls-client-ca", pki.ca.to_str().unwrap()]);
    }
    let mut server = Server::spawn(&dir.join("data"), &args);
    wait_tls(&mut server, pki).await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_only_tls_clients_that_trust_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_tls(dir.path(), &pki, false).await;
    // Without a client certificate too (no --tls-client-ca).
    let channel = connect(server.grpc_port, Some(tls(&pki, false)))
        .await
        .unwrap();
    open_account(channel, "open-1").await.unwrap();
    // Plaintext gets no answer.
    let plain = match connect(server.grpc_port, None).await {
        Ok(channel) => open_account(channel, "open-2").await,
        Err(e) => Err(e),
    };
    assert!(plain.is_err(), "plaintext is refused: {plain:?}");
    // A client that does not trust the CA refuses the server.
    let untrusted = connect(server.grpc_port, Some(ClientTlsConfig::new())).await;
    let untrusted = match untrusted {
        Ok(channel) => open_account(channel, "open-3").await,
        Err(e) => Err(e),
    };
    assert!(untrusted.is_err(), "{untrusted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_signed_by_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_tls(dir.path(), &pki, true).await;
    let without = match connect(server.grpc_port, Some(tls(&pki, false))).await {
        Ok(channel) => open_account(channel, "open-1").await,
        Err(e) => Err(e),
    };
    assert!(
        without.is_err(),
        "no client certificate: refused ({without:?})"
    );
    let channel = connect(server.grpc_port, Some(tls(&pki, true)))
        .await
        .unwrap();
    open_account(channel, "open-2").await.unwrap();

    // The client subcommands speak mutual TLS too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_account-service"))
        .args(["account", "get", "--account-id", "1"])
        .args(["--addr", &format!("https://127.0.0.1:{}", server.grpc_port)])
        .args(["--tls-ca", pki.ca.to_str().unwrap()])
        .args(["--tls-cert", pki.client_cert.to_str().unwrap()])
        .args(["--tls-key", pki.client_key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("account_id: 1"));
}

/// Snapshots reach a PostgreSQL that accepts TLS only when the URL says
/// `sslmode=require sslrootcert=<CA>`; a CA that does not vouch for the
/// server's certificate is refused (snapshots fail and are retried, Reserve
/// never notices).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_go_to_postgres_over_tls_and_verify_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pki(dir.path());
    let other_dir = tempfile::tempdir().unwrap();
    let other = pki(other_dir.path());
    let pg = common::postgres::Postgres::start();
    pg.require_tls(
        &std::fs::read_to_string(&ours.server_cert).unwrap(),
        &std::fs::read_to_string(&ours.server_key).unwrap(),
    );
    assert!(
        tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .is_err(),
        "the server refuses plaintext"
    );
    let url = |ca: &Path| format!("{} sslmode=require sslrootcert={}", pg.url(), ca.display());

    let data = tempfile::tempdir().unwrap();
    let trusted = url(&ours.ca);
    let server = Server::start(
        data.path(),
        &["--postgres-url", &trusted, "--snapshot-interval-ms", "50"],
    )
    .await;
    common::server::open_and_fund_account_1(&server, "100").await;
    let mut accounts = server.accounts().await;
    let reply = accounts
        .reserve(common::server::reserve_one_usd(1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.result, pb::Result::Ok as i32);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let loaded = account_service::snapshot::load(&trusted).await;
        match loaded {
            Ok(Some(rows)) if rows.sequence >= reply.sequence => break,
            other => assert!(
                Instant::now() < deadline,
                "no snapshot over TLS at {}: {other:?}",
                reply.sequence
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(accounts);
    drop(server);

    let untrusted = url(&other.ca);
    let refused = account_service::snapshot::load(&untrusted)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().to_lowercase().contains("certificate"),
        "{refused}"
    );
    // The same data directory: its WAL holds the whole history, so the
    // service serves without loading the snapshot it cannot reach.
    let server = Server::start(
        data.path(),
        &["--postgres-url", &untrusted, "--snapshot-interval-ms", "50"],
    )
    .await;
    let mut accounts = server.accounts().await;
    let reply = accounts
        .reserve(common::server::reserve_one_usd(2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.result,
        pb::Result::Ok as i32,
        "Reserve never waits on PostgreSQL"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::kafka::metric(server.metrics_port, "account_snapshot_failures_total") < 1.0 {
        assert!(Instant::now() < deadline, "the untrusted server is refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(server);

    // A fresh data directory needs the snapshot: an untrusted certificate is
    // not retried for ever behind NOT_SERVING; the service stops and says why.
    let fresh = tempfile::tempdir().unwrap();
    let log = fresh.path().join("stderr.log");
    let mut server = Server::spawn_under(
        &[],
        &fresh.path().join("data"),
        &["--postgres-url", &untrusted],
        std::process::Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let status = server
        .wait_exit(Duration::from_secs(60))
        .expect("stops instead of retrying a refused certificate");
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("sslrootcert"), "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
}

/// Replicas (design 7) with TLS and tokens on: the raft port is secured as
/// the gRPC port is (the same certificates, mutual TLS between replicas, the
/// tokens file with a `replica` role), and the group works through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_replicate_over_tls_and_their_raft_ports_admit_only_the_replica_role() {
    use account_service::proto::account::raft::v1::{raft_client::RaftClient, RaftMessage};
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let hash = |t: &str| -> String {
        Sha256::digest(t.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "ops admin {}\nraft replica {}\n",
            hash("admin-secret"),
            hash("replica-secret")
        ),
    )
    .unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let (cert, key, ca, tokens_path) = (
        path(&pki.server_cert),
        path(&pki.server_key),
        path(&pki.ca),
        path(&tokens),
    );
    let extra = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
        "--auth-tokens",
        &tokens_path,
        "--raft-token",
        "replica-secret",
    ];
    let group = common::group::Group::spawn_all(3, 0, &extra);
    let (client_cert, client_key) = (path(&pki.client_cert), path(&pki.client_key));
    let cli = |args: &[&str], node: usize| -> (bool, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_account-service"))
            .args(args)
            .args([
                "--addr",
                &format!("https://{}", group.nodes[node].grpc_addr()),
            ])
            .args([
                "--tls-ca",
                &ca,
                "--tls-cert",
                &client_cert,
                "--tls-key",
                &client_key,
            ])
            .args(["--token", "admin-secret"])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let leader = loop {
        let leading = (0..3).find(|&i| cli(&["cluster"], i).1.contains("role: LEADER\n"));
        if let Some(i) = leading {
            break i;
        }
        assert!(Instant::now() < deadline, "no leader over TLS within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Through a follower: the client follows the leader trailer, over TLS.
    let follower = (leader + 1) % 3;
    let (ok, out) = cli(&["account", "open", "--account-id", "7"], follower);
    assert!(ok && out.contains("result: RESULT_OK"), "{out}");
    let (ok, out) = cli(
        &[
            "deposit",
            "--account-id",
            "7",
            "--amount",
            "5",
            "--event-id",
            "tls-1",
        ],
        follower,
    );
    assert!(ok && out.contains("result: RESULT_OK"), "{out}");
    // Every replica has it: the same sequence and digest everywhere.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let views: Vec<String> = (0..3)
            .map(|i| {
                cli(&["cluster"], i)
                    .1
                    .lines()
                    .filter(|l| l.starts_with("applied_sequence:") || l.starts_with("digest:"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        if views[0].contains("applied_sequence: 2") && views.iter().all(|v| v == &views[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "replicas differ: {views:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The raft port itself: TLS only, and only the replica role.
    let raft_port = group.nodes[leader].raft_port;
    if let Ok(plain) = connect(raft_port, None).await {
        let answered = RaftClient::new(plain).hello(RaftMessage::default()).await;
        assert!(answered.is_err(), "the raft port answers without TLS");
    }
    let channel = connect(raft_port, Some(tls(&pki, true))).await.unwrap();
    let hello = |token: Option<&str>| {
        let mut client = RaftClient::new(channel.clone());
        let mut request = tonic::Request::new(RaftMessage::default());
        if let Some(t) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        async move { client.hello(request).await.map(|_| ()) }
    };
    assert_eq!(
        hello(None).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        hello(Some("admin-secret")).await.unwrap_err().code(),
        tonic::Code::PermissionDenied,
        "an admin is not a replica"
    );
    hello(Some("replica-secret")).await.expect("a replica is");
}
