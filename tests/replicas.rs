//! Replicas (design 7) as real processes on loopback: a group of three
//! `account-service serve --node-id … --peers …`, under concurrent mixed load
//! (reserves, unreserves, deposits), while the tests kill, pause and wipe
//! replicas. What must hold: every acknowledged call is there afterwards with
//! its original sequence and result (a retry with the same request id gets
//! that reply back), money is conserved, a minority acknowledges nothing, and
//! every replica ends with the same state digest.

mod common;

use common::group::{Ack, Group, Op, PATIENCE};
use rust_decimal::Decimal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What account 1 holds before the load starts: far more than it reserves.
const FUNDS: &str = "1000000000";

/// Snapshots every few entries (the default is 10,000), so that restarts
/// start from a snapshot, logs are purged, and a replica further behind is
/// sent the snapshot, all within a short run.
const SNAPSHOT_OFTEN: &[&str] = &["--raft-snapshot-entries", "50"];

/// Concurrent clients of the load.
const WORKERS: usize = 6;

/// The mixed load: each worker reserves 1 USD per order, releases its oldest
/// open order every fourth call and deposits 1 USD every tenth, each call
/// retried (same id) until acknowledged.
struct Load {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(Op, Ack)>>>,
}

impl Load {
    fn start(group: &Group) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let tasks = (0..WORKERS)
            .map(|w| {
                let mut client = group.client();
                let stop = stop.clone();
                let acked = acknowledged.clone();
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    let mut open = std::collections::VecDeque::new();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let op = if n % 4 == 0 && !open.is_empty() {
                            Op::Unreserve {
                                request: format!("unreserve-{w}-{n}"),
                                order: open.pop_front().unwrap(),
                            }
                        } else if n % 10 == 0 {
                            Op::Deposit {
                                event: format!("deposit-{w}-{n}"),
                            }
                        } else {
                            let order = format!("ord-{w}-{n}");
                            open.push_back(order.clone());
                            Op::Reserve {
                                request: format!("reserve-{w}-{n}"),
                                order,
                            }
                        };
                        let (ack, _) = client.call(&op).await;
                        assert_eq!(ack.result, 1, "{op:?}: RESULT_OK");
                        done.push((op, ack));
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    done
                })
            })
            .collect();
        Load {
            stop,
            acknowledged,
            tasks,
        }
    }

    fn acknowledged(&self) -> usize {
        self.acknowledged.load(Ordering::Relaxed)
    }

    async fn wait_acknowledged(&self, at_least: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.acknowledged() < at_least {
            assert!(
                Instant::now() < deadline,
                "{at_least} calls not acknowledged within {PATIENCE:?} (have {})",
                self.acknowledged()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Lets each worker finish its call in flight; returns every
    /// acknowledged call with its reply.
    async fn finish(self) -> Vec<(Op, Ack)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap());
        }
        all
    }
}

/// Every acknowledged call is there: sent again with the same id it gets
/// its original reply (same sequence and result, marked replayed), each open
/// reservation carries the sequence of the reserve that made it, and account
/// 1 holds exactly what the acknowledged calls put there.
async fn check_acknowledged(group: &Group, acked: &[(Op, Ack)], extra_deposits: usize) {
    let mut client = group.client();
    let mut sequences = std::collections::HashSet::new();
    let mut reserves = std::collections::HashMap::new();
    let mut deposits = extra_deposits;
    for (op, ack) in acked {
        assert!(
            sequences.insert(ack.sequence),
            "two acknowledged calls share sequence {}",
            ack.sequence
        );
        match op {
            Op::Reserve { order, .. } => {
                reserves.insert(order.clone(), ack.sequence);
            }
            Op::Unreserve { order, .. } => {
                assert!(reserves.remove(order).is_some(), "{order} released twice");
            }
            Op::Deposit { .. } => deposits += 1,
        }
        let (again, _) = client.call(op).await;
        assert_eq!(
            (again.result, again.sequence),
            (ack.result, ack.sequence),
            "{op:?} answered differently when sent again"
        );
        assert!(again.replayed, "{op:?} applied twice");
    }
    for (order, sequence) in &reserves {
        let r = client.reservation(order).await;
        assert_eq!(r.sequence, *sequence, "{order}");
        assert_eq!(r.remaining, "1", "{order}");
    }
    let (available, reserved) = client.account_1().await;
    let funds: Decimal = FUNDS.parse().unwrap();
    assert_eq!(reserved, Decimal::from(reserves.len()), "reserved");
    assert_eq!(
        available + reserved,
        funds + Decimal::from(deposits),
        "money in account 1"
    );
}

/// Sends a deposit until some replica acknowledges it: how long the group
/// took to serve writes again.
async fn time_to_write(group: &Group, event: String) -> Duration {
    let started = Instant::now();
    let (ack, _) = group.client().call(&Op::Deposit { event }).await;
    assert_eq!(ack.result, 1, "probe deposit RESULT_OK");
    started.elapsed()
}

fn median_and_max(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    (times[times.len() / 2], *times.last().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_ten_times_under_load_loses_nothing_acknowledged() {
    const CYCLES: usize = 10;
    let mut group = Group::start(3, SNAPSHOT_OFTEN).await;
    group.client().open_and_fund(FUNDS).await;
    let load = Load::start(&group);
    let mut failovers = Vec::new();
    let mut catch_ups = Vec::new();
    for cycle in 0..CYCLES {
        load.wait_acknowledged(load.acknowledged() + 150).await;
        let leader = group.leader().await;
        let term = group.status(leader).await.map_or(0, |s| s.term);
        group.nodes[leader].kill9();
        let failover = time_to_write(&group, format!("probe-{cycle}")).await;
        let new_leader = group.leader().await;
        let new_term = group.status(new_leader).await.unwrap().term;
        assert!(new_term > term, "a new term after the leader's loss");
        eprintln!(
            "cycle {cycle}: node {} killed (term {term}), node {} leads (term {new_term}); \
             writes served again after {failover:?}",
            group.nodes[leader].id, group.nodes[new_leader].id
        );
        failovers.push(failover);
        // The killed replica comes back and catches up before the next kill.
        let target = group.status(new_leader).await.unwrap().last_log_index;
        let restarted = Instant::now();
        group.spawn(leader);
        group.caught_up(leader, target).await;
        catch_ups.push(restarted.elapsed());
    }
    let acked = load.finish().await;
    let (median, max) = median_and_max(&mut failovers);
    let (catch_up_median, catch_up_max) = median_and_max(&mut catch_ups);
    eprintln!(
        "{CYCLES} failovers: median {median:?}, max {max:?}; restart and catch-up: \
         median {catch_up_median:?}, max {catch_up_max:?}; {} calls acknowledged",
        acked.len()
    );
    check_acknowledged(&group, &acked, CYCLES).await;
    let (sequence, digest) = group.converged().await;
    eprintln!("every replica at sequence {sequence}, digest {digest:x}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_follower_does_not_stop_the_leader_and_a_paused_majority_stops_every_acknowledgement(
) {
    let group = Group::start(3, SNAPSHOT_OFTEN).await;
    group.client().open_and_fund(FUNDS).await;
    let load = Load::start(&group);
    load.wait_acknowledged(100).await;
    let leader = group.leader().await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();

    // One follower stopped: the other is the majority, the leader goes on.
    group.nodes[followers[0]].pause();
    load.wait_acknowledged(load.acknowledged() + 200).await;

    // Both stopped: the leader alone is a minority.
    group.nodes[followers[1]].pause();
    // At the leader itself: the paused followers would not answer at all.
    let mut refused = group.client_at(leader);
    let probe = Op::Deposit {
        event: "probe-minority".into(),
    };
    let deadline = Instant::now() + PATIENCE;
    let failed_after = loop {
        // Fails fast: the quorum check stops the leader's writes, and a
        // proposal that cannot commit is answered UNAVAILABLE.
        let started = Instant::now();
        match refused.try_once(&probe).await {
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                break started.elapsed();
            }
            // Committed before the second pause took effect.
            Ok(_) => assert!(
                Instant::now() < deadline,
                "the minority keeps acknowledging"
            ),
        }
    };
    // In flight when the majority went: answered, or refused, by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = load.acknowledged();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        load.acknowledged(),
        before,
        "acknowledged without a majority"
    );
    eprintln!("with the majority paused a call fails after {failed_after:?}");

    for &f in &followers {
        group.nodes[f].resume();
    }
    load.wait_acknowledged(before + 200).await;
    let acked = load.finish().await;
    // The probe may or may not have been applied; sent again it is once.
    let (probe_ack, _) = group.client().call(&probe).await;
    assert_eq!(probe_ack.result, 1);
    check_acknowledged(&group, &acked, 1).await;
    group.converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_rejoins_and_converges() {
    let mut group = Group::start(3, SNAPSHOT_OFTEN).await;
    group.client().open_and_fund(FUNDS).await;
    let load = Load::start(&group);
    load.wait_acknowledged(200).await;
    // The lowest id is the one that initializes a fresh group: make it a
    // follower first, so its wipe is tested too.
    let mut leader = group.leader().await;
    let mut probes = 0;
    if group.nodes[leader].id == 1 {
        probes += 1;
        group.nodes[leader].kill9();
        let _ = time_to_write(&group, "probe-failover".into()).await;
        group.spawn(leader);
        leader = group.leader().await;
    }
    let mut wiped = vec![group.index_of_id(1)];
    wiped.extend((0..3).rev().find(|&i| i != leader && i != wiped[0]));
    for &i in &wiped {
        // The leader's log no longer starts at its first entry: a wiped
        // replica can only catch up from a snapshot.
        let leader = group.leader().await;
        group
            .wait_status(leader, "purging its log", |s| s.purged_log_index > 0)
            .await;
        load.wait_acknowledged(load.acknowledged() + 200).await;
        eprintln!("wiping node {}", group.nodes[i].id);
        group.wipe_and_restart(i);
        let target = group
            .status(group.leader().await)
            .await
            .unwrap()
            .last_log_index;
        group.caught_up(i, target).await;
        let rejoined = group.status(i).await.unwrap();
        assert!(
            rejoined.purged_log_index > 0 && rejoined.snapshot_log_index > 0,
            "the wiped replica started from the leader's snapshot: {rejoined:?}"
        );
    }
    let acked = load.finish().await;
    check_acknowledged(&group, &acked, probes).await;
    group.converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_and_one_removed_at_run_time_change_who_makes_the_majority() {
    use account_service::proto::account::v1 as pb;
    use account_service::proto::account::v1::admin_service_client::AdminServiceClient;
    let mut group = Group::start_with_spares(3, 1, SNAPSHOT_OFTEN).await;
    group.client().open_and_fund(FUNDS).await;
    let load = Load::start(&group);
    load.wait_acknowledged(300).await;

    // Node 4 starts empty, is added, catches up (from the snapshot: the
    // log was purged) and votes.
    group.spawn(3);
    group.wait_status(3, "answering", |_| true).await;
    let leader = group.leader().await;
    let mut admin = AdminServiceClient::new(group.nodes[leader].channel());
    let added = admin
        .add_replica(pb::AddReplicaRequest {
            node_id: 4,
            raft_addr: format!("127.0.0.1:{}", group.nodes[3].raft_port),
        })
        .await
        .expect("AddReplica at the leader")
        .into_inner();
    let voters: Vec<u64> = added
        .replicas
        .iter()
        .filter(|r| r.voter)
        .map(|r| r.node_id)
        .collect();
    assert_eq!(voters, [1, 2, 3, 4], "{added:?}");

    // A follower asked answers with the leader's address.
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let refused = AdminServiceClient::new(group.nodes[follower].channel())
        .remove_replica(pb::RemoveReplicaRequest { node_id: 4 })
        .await
        .expect_err("a follower does not change the membership");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(
        refused.metadata().get("leader").unwrap().to_str().unwrap(),
        group.nodes[leader].grpc_addr()
    );
    // Bad input names the field.
    let invalid = admin
        .add_replica(pb::AddReplicaRequest {
            node_id: 5,
            raft_addr: "nowhere".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert!(invalid.message().starts_with("raft_addr"), "{invalid:?}");

    // A founder that is not the leader leaves; stopped, it is not missed.
    let removed = (0..3).rev().find(|&i| i != leader).unwrap();
    let removed_id = group.nodes[removed].id;
    let after = admin
        .remove_replica(pb::RemoveReplicaRequest {
            node_id: removed_id,
        })
        .await
        .expect("RemoveReplica at the leader")
        .into_inner();
    let members: Vec<u64> = after.replicas.iter().map(|r| r.node_id).collect();
    assert!(
        !members.contains(&removed_id) && members.len() == 3,
        "{after:?}"
    );
    group.nodes[removed].kill9();
    load.wait_acknowledged(load.acknowledged() + 200).await;

    // The leader lost too: node 4 and the other founder are the majority.
    group.nodes[leader].kill9();
    let failover = time_to_write(&group, "probe-membership".into()).await;
    eprintln!("failover with the added replica in the majority: {failover:?}");
    load.wait_acknowledged(load.acknowledged() + 200).await;
    group.spawn(leader);
    let acked = load.finish().await;
    check_acknowledged(&group, &acked, 1).await;
    group.converged().await;
}
