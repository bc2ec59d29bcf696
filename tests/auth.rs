//! Callers and roles (design 4.4) against the real binary: no or an unknown
//! token is UNAUTHENTICATED, a role that may not call the RPC is
//! PERMISSION_DENIED, neither journals anything; each role reaches exactly its
//! RPCs; health and reflection stay open; the caller's name is on the RPC
//! metrics and no token appears there; the client subcommands send
//! `--token`; and a non-loopback listener without tokens refuses to start.

mod common;

use account_service::proto::account::v1 as pb;
use account_service::proto::account::v1::account_service_client::AccountServiceClient;
use account_service::proto::account::v1::admin_service_client::AdminServiceClient;
use common::server::Server;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Request};

const ORDER_TOKEN: &str = "order-token-5f1b9c";
const ADMIN_TOKEN: &str = "admin-token-77aa01";
const READ_TOKEN: &str = "read-token-c0ffee";

fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn tokens_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tokens");
    let text = format!(
        "# name role sha256(token)\norder-desk order {}\nops admin {}\nreports read {}\n",
        hash(ORDER_TOKEN),
        hash(ADMIN_TOKEN),
        hash(READ_TOKEN)
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn open(request_id: &str) -> pb::OpenAccountRequest {
    pb::OpenAccountRequest {
        request_id: request_id.into(),
        account_id: 1,
        base_currency: "USD".into(),
    }
}

fn deposit(event_id: &str) -> account_service::proto::events::DepositEvent {
    account_service::proto::events::DepositEvent {
        event_id: event_id.into(),
        account_id: 1,
        amount: "100".into(),
        currency: "USD".into(),
        ..Default::default()
    }
}

fn get(account_id: i64) -> pb::GetAccountRequest {
    pb::GetAccountRequest { account_id }
}

async fn sequence(accounts: &mut AccountServiceClient<Channel>) -> u64 {
    accounts
        .get_account(with_token(get(1), Some(READ_TOKEN)))
        .await
        .unwrap()
        .into_inner()
        .sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_reaches_its_rpcs_and_refusals_journal_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path());
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--auth-tokens", tokens.to_str().unwrap()]).await;
    let channel = server.channel().await;
    let mut admin = AdminServiceClient::new(channel.clone());
    let mut accounts = AccountServiceClient::new(channel.clone());

    // Health needs no token (Server::start waited on it); reflection neither.
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    let list = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut stream = reflection
        .server_reflection_info(futures_util::stream::iter([list]))
        .await
        .expect("reflection without a token")
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());

    admin
        .open_account(with_token(open("open-1"), Some(ADMIN_TOKEN)))
        .await
        .expect("admin opens accounts");
    admin
        .deposit(with_token(deposit("dep-1"), Some(ADMIN_TOKEN)))
        .await
        .expect("admin deposits");
    let before = sequence(&mut accounts).await;

    // Refused: none, unknown, malformed, or the wrong role.
    let reserve = || common::server::reserve_one_usd(1);
    for (token, code) in [
        (None, Code::Unauthenticated),
        (Some("not-a-token"), Code::Unauthenticated),
        (Some(ADMIN_TOKEN), Code::PermissionDenied),
        (Some(READ_TOKEN), Code::PermissionDenied),
    ] {
        let e = accounts
            .reserve(with_token(reserve(), token))
            .await
            .expect_err("refused");
        assert_eq!(e.code(), code, "Reserve with {token:?}: {e}");
    }
    let mut malformed = Request::new(reserve());
    malformed
        .metadata_mut()
        .insert("authorization", ORDER_TOKEN.parse().unwrap());
    let e = accounts.reserve(malformed).await.expect_err("no Bearer");
    assert_eq!(e.code(), Code::Unauthenticated);
    for token in [Some(ORDER_TOKEN), Some(READ_TOKEN), None] {
        let e = admin
            .deposit(with_token(deposit("dep-2"), token))
            .await
            .expect_err("only admin deposits");
        let expected = if token.is_some() {
            Code::PermissionDenied
        } else {
            Code::Unauthenticated
        };
        assert_eq!(e.code(), expected, "Deposit with {token:?}: {e}");
    }
    let e = accounts
        .get_account(with_token(get(1), None))
        .await
        .expect_err("reads need a token too");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(sequence(&mut accounts).await, before, "nothing journaled");

    // Allowed: order reserves and reads; read and admin read.
    let r = accounts
        .reserve(with_token(reserve(), Some(ORDER_TOKEN)))
        .await
        .expect("order reserves")
        .into_inner();
    assert_eq!(r.result, pb::Result::Ok as i32);
    for token in [ORDER_TOKEN, ADMIN_TOKEN, READ_TOKEN] {
        accounts
            .get_reservation(with_token(
                pb::GetReservationRequest {
                    account_id: 1,
                    order_id: "ord-1".into(),
                },
                Some(token),
            ))
            .await
            .unwrap_or_else(|e| panic!("{token} reads: {e}"));
    }

    // The caller's name labels the RPC metrics; no token appears anywhere.
    let text = common::kafka::metrics_text(server.metrics_port);
    assert!(
        text.contains(
            r#"account_rpc_outcomes_total{rpc="Reserve",caller="order-desk",outcome="OK"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"caller="unauthorized",outcome="PERMISSION_DENIED""#));
    for secret in [ORDER_TOKEN, ADMIN_TOKEN, READ_TOKEN] {
        assert!(!text.contains(secret));
    }

    // The client subcommands send --token (or ACCOUNT_TOKEN).
    let cli = |token: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_account-service"));
        c.args([
            "account",
            "get",
            "--account-id",
            "1",
            "--addr",
            &server.addr(),
        ]);
        if let Some(t) = token {
            c.env("ACCOUNT_TOKEN", t);
        }
        c.output().unwrap()
    };
    let out = cli(Some(READ_TOKEN));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("account_id: 1"));
    let out = cli(None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
}

#[tokio::test]
async fn a_non_loopback_listener_without_tokens_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::server::free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_account-service"))
        .args(["serve", "--no-pin", "--data-dir"])
        .arg(dir.path())
        .args(["--grpc-addr", &format!("0.0.0.0:{port}")])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not loopback") && stderr.contains("--insecure-no-auth"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("wal").exists(),
        "refused before anything was opened"
    );
}
