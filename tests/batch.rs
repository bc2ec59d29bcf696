//! The batch and stream RPCs of design 4.1, against the real binary: per-item
//! results in request order, malformed items, all_or_nothing, streams that
//! stay open, retries and restarts, and kill -9 in the middle of a stream and
//! of all_or_nothing batches.

mod common;

use account_service::proto::account::v1 as pb;
use common::server::{open_and_fund_account_1, reserve_one_usd, Server};
use std::collections::HashMap;
use std::time::Duration;
use tonic::Code;

fn result(code: i32) -> pb::Result {
    pb::Result::try_from(code).unwrap()
}

fn unreserve(i: usize) -> pb::UnreserveRequest {
    pb::UnreserveRequest {
        request_id: format!("unr-{i}"),
        account_id: 1,
        order_id: format!("ord-{i}"),
        amount: String::new(),
    }
}

async fn reserved_usd(server: &Server) -> (String, String) {
    let a = server
        .accounts()
        .await
        .get_account(pb::GetAccountRequest { account_id: 1 })
        .await
        .unwrap()
        .into_inner();
    (a.cash[0].available.clone(), a.cash[0].reserved.clone())
}

async fn batch(
    server: &Server,
    requests: Vec<pb::ReserveRequest>,
    all_or_nothing: bool,
) -> Result<Vec<pb::ReserveReply>, tonic::Status> {
    server
        .accounts()
        .await
        .reserve_batch(pb::ReserveBatchRequest {
            requests,
            all_or_nothing,
        })
        .await
        .map(|r| r.into_inner().replies)
}

#[tokio::test]
async fn a_batch_answers_every_item_in_order_as_if_sent_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    open_and_fund_account_1(&server, "10").await;

    let mut requests: Vec<_> = (0..12).map(reserve_one_usd).collect();
    requests[3].amount = "1.0.0".into(); // malformed
    requests[5].account_id = 99; // no such account
    requests[7].kind = 0; // malformed
    let replies = batch(&server, requests.clone(), false).await.unwrap();
    assert_eq!(replies.len(), 12);
    let mut sequences = Vec::new();
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.request_id, format!("req-{i}"), "replies in request order");
        match i {
            3 => {
                assert_eq!(result(r.result), pb::Result::InvalidArgument);
                assert!(
                    r.message.starts_with("requests[3].amount:"),
                    "{}",
                    r.message
                );
                assert_eq!(r.sequence, 0, "nothing journaled for a malformed item");
            }
            7 => {
                assert_eq!(result(r.result), pb::Result::InvalidArgument);
                assert!(r.message.starts_with("requests[7].kind:"), "{}", r.message);
            }
            5 => assert_eq!(result(r.result), pb::Result::AccountNotFound),
            // 9 well-formed Reserves of 1 USD on 10 USD: the tenth would not fit,
            // but only 9 reach account 1 (3, 5 and 7 do not).
            _ => {
                assert_eq!(result(r.result), pb::Result::Ok, "item {i}: {}", r.message);
                assert_eq!(r.reservation.as_ref().unwrap().order_id, format!("ord-{i}"));
            }
        }
        if r.sequence > 0 {
            sequences.push(r.sequence);
        }
    }
    // Each well-formed item is its own journaled command, in order.
    assert_eq!(sequences.len(), 10);
    assert!(
        sequences.windows(2).all(|w| w[1] == w[0] + 1),
        "{sequences:?}"
    );
    assert_eq!(reserved_usd(&server).await, ("1".into(), "9".into()));

    // The same batch again: every applied item replays its original reply.
    let again = batch(&server, requests, false).await.unwrap();
    for (a, b) in again.iter().zip(&replies) {
        assert_eq!(a.result, b.result);
        assert_eq!(a.sequence, b.sequence);
        if b.sequence > 0 {
            assert!(a.replayed);
        }
    }
    // One more Reserve alone: 1 USD was left.
    let last = batch(
        &server,
        vec![reserve_one_usd(12), reserve_one_usd(13)],
        false,
    )
    .await
    .unwrap();
    assert_eq!(result(last[0].result), pb::Result::Ok);
    assert_eq!(result(last[1].result), pb::Result::InsufficientFunds);

    // UnreserveBatch: per item too, in order.
    let mut unreserves: Vec<_> = (0..3).map(unreserve).collect();
    unreserves.push(pb::UnreserveRequest {
        order_id: String::new(),
        ..unreserve(3)
    });
    let replies = server
        .accounts()
        .await
        .unreserve_batch(pb::UnreserveBatchRequest {
            requests: unreserves,
        })
        .await
        .unwrap()
        .into_inner()
        .replies;
    assert_eq!(replies.len(), 4);
    for r in &replies[..3] {
        assert_eq!(result(r.result), pb::Result::Ok);
        assert_eq!(r.released, "1");
    }
    assert_eq!(result(replies[3].result), pb::Result::InvalidArgument);
    assert!(replies[3].message.starts_with("requests[3].order_id:"));
    assert_eq!(replies[3].request_id, "unr-3");
    assert_eq!(reserved_usd(&server).await, ("3".into(), "7".into()));
}

#[tokio::test]
async fn a_batch_outside_its_size_bounds_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    open_and_fund_account_1(&server, "100000").await;
    let e = batch(&server, Vec::new(), false).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("requests:"), "{}", e.message());
    let e = batch(&server, (0..8_193).map(reserve_one_usd).collect(), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let e = batch(&server, (0..1_025).map(reserve_one_usd).collect(), true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Nothing of them was journaled; the largest bounds are accepted.
    assert_eq!(reserved_usd(&server).await, ("100000".into(), "0".into()));
    // The largest batch with every id at its 64-byte limit fits the message limit.
    let long = |prefix: &str, i: usize| format!("{prefix}{i:0>60}");
    let big = (0..8_192)
        .map(|i| pb::ReserveRequest {
            request_id: long("req-", i),
            order_id: long("ord-", i),
            amount: "0.00000001".into(),
            ..reserve_one_usd(i)
        })
        .collect();
    let big = batch(&server, big, false).await.unwrap();
    assert!(big.iter().all(|r| result(r.result) == pb::Result::Ok));
    assert_eq!(big[8_191].request_id.len(), 64);
    let basket = batch(
        &server,
        (10_000..11_024).map(reserve_one_usd).collect(),
        true,
    )
    .await
    .unwrap();
    assert!(basket.iter().all(|r| result(r.result) == pb::Result::Ok));
    let seq = basket[0].sequence;
    assert!(basket.iter().all(|r| r.sequence == seq), "one record");
    assert_eq!(
        reserved_usd(&server).await,
        ("98975.99991808".into(), "1024.00008192".into())
    );
}

#[tokio::test]
async fn all_or_nothing_applies_all_or_none_and_replays_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]).await;
    open_and_fund_account_1(&server, "5").await;

    // Six legs of 1 USD on 5 USD: the last fails, so none applies.
    let legs: Vec<_> = (0..6).map(reserve_one_usd).collect();
    let failed = batch(&server, legs.clone(), true).await.unwrap();
    for (i, r) in failed.iter().enumerate() {
        assert_eq!(r.request_id, format!("req-{i}"));
        let want = if i == 5 {
            pb::Result::InsufficientFunds
        } else {
            pb::Result::LinkedRequestFailed
        };
        assert_eq!(result(r.result), want, "leg {i}: {}", r.message);
        assert_eq!(r.sequence, failed[0].sequence, "one journaled record");
        assert!(r.reservation.is_none());
    }
    assert_eq!(reserved_usd(&server).await, ("5".into(), "0".into()));

    // Five legs with new keys fit: all apply at one sequence.
    let fits: Vec<_> = (10..15).map(reserve_one_usd).collect();
    let applied = batch(&server, fits.clone(), true).await.unwrap();
    assert!(applied.iter().all(|r| result(r.result) == pb::Result::Ok));
    assert!(applied.iter().all(|r| r.sequence == applied[0].sequence));
    assert_eq!(reserved_usd(&server).await, ("0".into(), "5".into()));

    // A malformed leg fails the basket before anything is journaled: fix it
    // and resend with the same keys.
    let mut malformed: Vec<_> = (20..23).map(reserve_one_usd).collect();
    malformed[1].asset = "usd".into();
    let refused = batch(&server, malformed.clone(), true).await.unwrap();
    assert_eq!(result(refused[1].result), pb::Result::InvalidArgument);
    assert!(
        refused[1].message.starts_with("requests[1].asset:"),
        "{}",
        refused[1].message
    );
    assert_eq!(result(refused[0].result), pb::Result::LinkedRequestFailed);
    assert!(refused.iter().all(|r| r.sequence == 0));
    let mut twice: Vec<_> = (30..32).map(reserve_one_usd).collect();
    twice[1].request_id = twice[0].request_id.clone();
    let refused = batch(&server, twice, true).await.unwrap();
    assert_eq!(result(refused[1].result), pb::Result::InvalidArgument);
    assert!(refused[1]
        .message
        .contains("repeats requests[0].request_id"));

    // After a restart (replay of the basket records), retries replay.
    assert!(server.terminate().success());
    let server = Server::start(dir.path(), &[]).await;
    let again = batch(&server, legs, true).await.unwrap();
    for (a, b) in again.iter().zip(&failed) {
        assert!(a.replayed);
        assert_eq!((a.result, a.sequence), (b.result, b.sequence));
    }
    let again = batch(&server, fits, true).await.unwrap();
    for (a, b) in again.iter().zip(&applied) {
        assert!(a.replayed);
        assert_eq!((a.result, a.sequence), (b.result, b.sequence));
    }
    assert_eq!(reserved_usd(&server).await, ("0".into(), "5".into()));
    malformed[1].asset = "USD".into();
    let fixed = batch(&server, malformed, true).await.unwrap();
    // Nothing was taken by the refused basket; the account is now empty.
    assert!(fixed
        .iter()
        .any(|r| result(r.result) == pb::Result::InsufficientFunds));
}

/// A ReserveStream fed by a channel: the request sender and the reply stream.
async fn open_stream(
    server: &Server,
) -> (
    tokio::sync::mpsc::Sender<pb::ReserveRequest>,
    tonic::Streaming<pb::ReserveReply>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let replies = server
        .accounts()
        .await
        .reserve_stream(outbound)
        .await
        .unwrap()
        .into_inner();
    (tx, replies)
}

#[tokio::test]
async fn a_stream_answers_in_order_and_stays_open_between_bursts() {
    let dir = tempfile::tempdir().unwrap();
    // The unary calls around the stream run under the default deadline (a
    // busy machine can take longer than 500 ms to answer one); only the
    // stream runs on a service whose unary deadline it outlives.
    let mut setup = Server::start(dir.path(), &[]).await;
    open_and_fund_account_1(&setup, "1000000").await;
    assert!(setup.terminate().success());
    let mut server = Server::start(dir.path(), &["--request-timeout-ms", "500"]).await;
    let (tx, mut replies) = open_stream(&server).await;
    let sender = tokio::spawn(async move {
        for burst in 0..3 {
            for i in burst * 2_000..(burst + 1) * 2_000 {
                let mut r = reserve_one_usd(i);
                if i % 997 == 0 {
                    r.order_id = String::new(); // malformed
                }
                tx.send(r).await.unwrap();
            }
            // Longer than the unary deadline: a stream is not a unary call.
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
    });
    let mut last_sequence = 0;
    for i in 0..6_000 {
        let r = replies.message().await.unwrap().expect("a reply per item");
        assert_eq!(r.request_id, format!("req-{i}"), "request order");
        if i % 997 == 0 {
            assert_eq!(result(r.result), pb::Result::InvalidArgument);
            // One stream message is one request: the bare field.
            assert!(r.message.starts_with("order_id:"), "{}", r.message);
        } else {
            assert_eq!(result(r.result), pb::Result::Ok, "{}", r.message);
            assert!(r.sequence > last_sequence, "journaled in order");
            last_sequence = r.sequence;
        }
    }
    sender.await.unwrap();
    // The client closed its side: the stream ends after the last reply.
    assert!(replies.message().await.unwrap().is_none());
    drop(replies);
    assert!(server.terminate().success());
    let check = Server::start(dir.path(), &[]).await;
    assert_eq!(reserved_usd(&check).await.1, (6_000 - 7).to_string());
}

#[tokio::test]
async fn a_client_that_stops_reading_holds_the_service_back_not_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    open_and_fund_account_1(&server, "1000000").await;
    let (tx, mut replies) = open_stream(&server).await;
    // Send far more than the service buffers, reading nothing: the sends
    // stop completing (flow control) instead of the service buffering all.
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let sender = tokio::spawn(async move {
        for i in 0..1_000_000 {
            if tx.send(reserve_one_usd(i)).await.is_err() {
                break;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stuck_at = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(stuck_at < 200_000, "the sender was held back");
    // Other clients are served meanwhile.
    let other = batch(&server, vec![reserve_one_usd(1_000_000)], false)
        .await
        .unwrap();
    assert_eq!(result(other[0].result), pb::Result::Ok);
    // Reading again drains everything, in order.
    for i in 0..stuck_at {
        let r = replies.message().await.unwrap().unwrap();
        assert_eq!(r.request_id, format!("req-{i}"));
    }
    sender.abort();
}

#[tokio::test]
async fn kill9_in_the_middle_of_a_stream_keeps_every_acknowledged_item() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]).await;
    open_and_fund_account_1(&server, "100000000").await;
    let (tx, mut replies) = open_stream(&server).await;
    let sender = tokio::spawn(async move {
        for i in 0.. {
            if tx.send(reserve_one_usd(i)).await.is_err() {
                break;
            }
        }
    });
    let mut acknowledged = Vec::new();
    while let Ok(Some(r)) = replies.message().await {
        assert_eq!(result(r.result), pb::Result::Ok);
        acknowledged.push((acknowledged.len(), r.sequence));
        if acknowledged.len() == 20_000 {
            server.kill9();
        }
    }
    sender.abort();
    assert!(acknowledged.len() >= 20_000);
    let server = Server::start(dir.path(), &[]).await;
    let mut accounts = server.accounts().await;
    common::server::assert_reservations_survived(&mut accounts, &acknowledged).await;
    // Resent after the restart, every acknowledged item replays its reply.
    let resent = batch(
        &server,
        (0..acknowledged.len().min(8_192))
            .map(reserve_one_usd)
            .collect(),
        false,
    )
    .await
    .unwrap();
    for (r, (_, sequence)) in resent.iter().zip(&acknowledged) {
        assert!(r.replayed);
        assert_eq!(r.sequence, *sequence);
    }
}

#[tokio::test]
async fn kill9_among_all_or_nothing_batches_never_leaves_half_a_basket() {
    const LEGS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]).await;
    open_and_fund_account_1(&server, "100000000").await;
    let leg = |b: usize, k: usize| reserve_one_usd(b * LEGS + k);
    // Four clients send baskets until the kill; each records what was acknowledged.
    let mut workers = Vec::new();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for w in 0..4 {
        let mut accounts = server.accounts().await;
        let acked = acked.clone();
        workers.push(tokio::spawn(async move {
            let mut mine = HashMap::new();
            for n in 0.. {
                let b = n * 4 + w;
                let requests = (0..LEGS).map(|k| leg(b, k)).collect();
                let call = pb::ReserveBatchRequest {
                    requests,
                    all_or_nothing: true,
                };
                match accounts.reserve_batch(call).await {
                    Ok(reply) => {
                        let replies = reply.into_inner().replies;
                        assert!(replies.iter().all(|r| result(r.result) == pb::Result::Ok));
                        mine.insert(b, replies[0].sequence);
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => return (mine, b),
                }
            }
            unreachable!()
        }));
    }
    while acked.load(std::sync::atomic::Ordering::Relaxed) < 2_000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    let mut acknowledged = HashMap::new();
    let mut cut = Vec::new();
    for w in workers {
        let (mine, in_flight) = w.await.unwrap();
        acknowledged.extend(mine);
        cut.push(in_flight);
    }
    let server = Server::start(dir.path(), &[]).await;
    let mut accounts = server.accounts().await;
    let present = |b: usize, k: usize| {
        let order_id = format!("ord-{}", b * LEGS + k);
        let mut accounts = accounts.clone();
        async move {
            match accounts
                .get_reservation(pb::GetReservationRequest {
                    account_id: 1,
                    order_id,
                })
                .await
            {
                Ok(r) => Some(r.into_inner().sequence),
                Err(e) if e.code() == Code::NotFound => None,
                Err(e) => panic!("{e}"),
            }
        }
    };
    // Every acknowledged basket is whole, at its acknowledged sequence.
    for (&b, &sequence) in &acknowledged {
        for k in 0..LEGS {
            assert_eq!(present(b, k).await, Some(sequence), "basket {b} leg {k}");
        }
    }
    // The baskets cut by the kill are whole or absent, never half.
    for b in cut {
        let legs: Vec<_> = futures_util::future::join_all((0..LEGS).map(|k| present(b, k))).await;
        let applied = legs.iter().filter(|l| l.is_some()).count();
        assert!(
            applied == 0 || applied == LEGS,
            "basket {b}: {applied} of {LEGS} legs"
        );
    }
    let (available, reserved) = common::server::first_cash(&mut accounts, 1).await;
    assert_eq!(
        available + reserved,
        "100000000".parse::<rust_decimal::Decimal>().unwrap(),
        "money conserved"
    );
    let reserved: u64 = reserved.to_string().parse().unwrap();
    assert_eq!(
        reserved % LEGS as u64,
        0,
        "reserved is whole baskets: {reserved}"
    );
    assert!(reserved >= (acknowledged.len() * LEGS) as u64);
}

/// Items that arrive one by one while the writer is busy reach it as a few
/// large queue entries, not one entry (one wake-up, one reply) per item: a
/// stream keeps at most two entries in the engine and reads what came
/// meanwhile as one chunk. Each WAL sync is slowed to 100 ms (strace) so that
/// many items arrive during every commit, on any machine.
#[tokio::test]
async fn a_stream_of_single_items_reaches_the_writer_in_chunks() {
    use common::kafka::metric;
    let dir = tempfile::tempdir().unwrap();
    let wrapper =
        common::server::strace_injecting("trace=fdatasync", "inject=fdatasync:delay_exit=100000");
    let mut server = Server::spawn_under(&wrapper, dir.path(), &[], std::process::Stdio::inherit());
    server.wait_serving().await;
    open_and_fund_account_1(&server, "1000000").await;
    let port = server.metrics_port;
    let entries_before = metric(port, "account_engine_batch_size_sum");
    let commands_before = metric(port, "account_engine_commands_total");
    let (tx, mut replies) = open_stream(&server).await;
    const ITEMS: usize = 400;
    let sender = tokio::spawn(async move {
        for i in 0..ITEMS {
            tx.send(reserve_one_usd(i)).await.unwrap();
            // One HTTP/2 frame each: the items do not arrive together.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    for i in 0..ITEMS {
        let r = replies.message().await.unwrap().expect("a reply per item");
        assert_eq!(r.request_id, format!("req-{i}"), "request order");
        assert_eq!(result(r.result), pb::Result::Ok, "{}", r.message);
    }
    sender.await.unwrap();
    let entries = metric(port, "account_engine_batch_size_sum") - entries_before;
    let commands = metric(port, "account_engine_commands_total") - commands_before;
    assert_eq!(commands, ITEMS as f64, "every item journaled once");
    assert!(
        entries * 4.0 <= commands,
        "{commands} items in {entries} queue entries: items arriving while \
         the writer syncs are queued together"
    );
}

/// A stream of small items, one HTTP/2 frame each, whose client stops
/// reading replies: the service stops reading (flow control) and the
/// connection stays open with the unread frames in its window; once the
/// client reads again every item is answered, in order. (The HTTP/2 library
/// closes a connection whose unread small frames cost too much framing
/// overhead; an adaptive window let one stalled stream reach that.)
#[tokio::test]
async fn a_stalled_stream_of_small_frames_keeps_its_connection() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    open_and_fund_account_1(&server, "1000000").await;
    // A small client window: its unread replies fill it soon.
    let channel = tonic::transport::Endpoint::from_shared(server.addr())
        .unwrap()
        .initial_stream_window_size(Some(64 << 10))
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut replies = pb::account_service_client::AccountServiceClient::new(channel)
        .reserve_stream(outbound)
        .await
        .unwrap()
        .into_inner();
    const ITEMS: usize = 12_000;
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let sender = tokio::spawn(async move {
        for i in 0..ITEMS {
            tx.send(reserve_one_usd(i)).await.unwrap();
            counter.fetch_add(1, Ordering::Relaxed);
            // Let the client's connection write it alone: one frame per item.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
    });
    // Read nothing until the sends stop moving: the service pushes back.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = sent.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    assert!(
        last < ITEMS,
        "flow control holds the sender back ({last} sent)"
    );
    for i in 0..ITEMS {
        let r = replies
            .message()
            .await
            .unwrap_or_else(|e| panic!("item {i}: the stream broke: {e}"))
            .expect("a reply per item");
        assert_eq!(r.request_id, format!("req-{i}"), "request order");
        assert_eq!(result(r.result), pb::Result::Ok, "{}", r.message);
    }
    sender.await.unwrap();
    assert!(replies.message().await.unwrap().is_none());
}
