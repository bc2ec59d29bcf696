//! Limits at the edge (design 4.4): a caller over its rate gets
//! RESOURCE_EXHAUSTED with `retry-after-ms` and nothing is journaled for it;
//! a request over its size limit (2 MiB to AccountService, 1 MiB to
//! AdminService) is refused; the service keeps serving.

mod common;

use account_service::proto::account::v1 as pb;
use common::server::Server;
use std::time::Duration;
use tonic::Code;

fn deposit(i: usize) -> account_service::proto::events::DepositEvent {
    account_service::proto::events::DepositEvent {
        event_id: format!("dep-{i}"),
        account_id: 1,
        amount: "1".into(),
        currency: "USD".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_is_told_when_to_retry_and_nothing_is_journaled() {
    let dir = tempfile::tempdir().unwrap();
    // One call a second, two at once: ten calls in a row (well under a
    // second here, and under two on any machine) must meet the limit.
    let server = Server::start(
        dir.path(),
        &["--rate-limit-rps", "1", "--rate-limit-burst", "2"],
    )
    .await;
    let mut admin = server.admin().await;
    let open = pb::OpenAccountRequest {
        request_id: "open-1".into(),
        account_id: 1,
        base_currency: "USD".into(),
    };
    // Health (used by Server::start) is not limited; the first call is.
    admin.open_account(open).await.unwrap();
    let (mut applied, mut retry_after) = (0, Vec::new());
    for i in 0..10 {
        match admin.deposit(deposit(i)).await {
            Ok(_) => applied += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                let ms: u64 = e
                    .metadata()
                    .get("retry-after-ms")
                    .expect("a retry-after-ms trailer")
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=2_000).contains(&ms), "retry after {ms} ms");
                retry_after.push(ms);
            }
        }
    }
    assert!(
        applied >= 1 && retry_after.len() >= 6,
        "{applied} applied, {retry_after:?}"
    );
    // After waiting as told, the caller gets through again, and the balance
    // shows exactly the deposits that were admitted.
    tokio::time::sleep(Duration::from_millis(*retry_after.last().unwrap() + 50)).await;
    let mut accounts = server.accounts().await;
    let account = accounts
        .get_account(pb::GetAccountRequest { account_id: 1 })
        .await
        .expect("admitted after the wait")
        .into_inner();
    assert_eq!(account.cash[0].available, applied.to_string());
    let text = common::kafka::metrics_text(server.metrics_port);
    assert!(text.contains(r#"outcome="RATE_LIMITED""#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_its_size_limit_is_refused_and_the_service_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut accounts = server.accounts().await;
    let mut huge = common::server::reserve_one_usd(1);
    huge.order_id = "x".repeat(3 << 20);
    let e = accounts
        .reserve(huge)
        .await
        .expect_err("over the 2 MiB limit of AccountService");
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e}"
    );
    // Still serving; nothing was journaled.
    let e = accounts
        .get_account(pb::GetAccountRequest { account_id: 1 })
        .await
        .expect_err("no account");
    assert_eq!(e.code(), Code::NotFound);
    let sequence = common::kafka::metric(server.metrics_port, "account_engine_last_sequence");
    assert!(
        sequence <= 1.0,
        "only the start-up settings are journaled ({sequence})"
    );
}
