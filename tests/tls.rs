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
