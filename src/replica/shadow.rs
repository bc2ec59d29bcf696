//! The snapshot shadow: a second copy of the replica's state, on its own
//! thread, fed the same committed entries in the same order as the writer
//! and applied with the same `apply`. A raft snapshot is taken from it, so
//! the writer never stops to copy its tables (a copy of millions of rows
//! would stall every reply behind it for as long).
//!
//! It costs a second copy of the state in memory and a second apply of each
//! command (no replies, no I/O: a small part of what the writer does). With
//! Kafka on it keeps its own outbox ledger the same way (outbox.rs), so a
//! snapshot holds the ledger of its entry.

use super::outbox::{Ledger, Sinks};
use super::writer::{apply_journal_record, Applied};
use super::{Member, NodeId, TypeConfig};
use crate::state_machine::{Rows, State};
use openraft::{Entry, EntryPayload, LogId, StoredMembership};
use std::sync::Arc;
use tokio::sync::oneshot;

/// A state as of an entry of the log, and the membership in force there.
pub(super) struct Captured {
    pub state: State,
    pub ledger: Ledger,
    pub applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, Member>,
}

/// The state's rows as of an entry, and the membership there.
pub(super) struct Image {
    pub rows: Rows,
    /// With sinks (Kafka, PostgreSQL history) only.
    pub ledger: Option<Ledger>,
    pub applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, Member>,
}

pub(super) enum ToShadow {
    Apply(Arc<Vec<Entry<TypeConfig>>>),
    /// The rows as of the last entry applied (or why there are none).
    Capture(oneshot::Sender<Result<Image, String>>),
    Install(Box<Captured>),
}

/// Starts the shadow thread (keeping a ledger for `sinks`, if any); it ends
/// when the sender is dropped.
pub(super) fn start(sinks: Sinks) -> std::io::Result<crossbeam_channel::Sender<ToShadow>> {
    // Unbounded, and bounded in practice: it applies as fast as the writer,
    // which openraft waits for before it sends more.
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("raft-shadow".into())
        .spawn(move || run(rx, sinks))?;
    Ok(tx)
}

fn run(rx: crossbeam_channel::Receiver<ToShadow>, sinks: Sinks) {
    let mut state = State::default();
    let keep_ledger = sinks.any();
    let mut ledger = Ledger::default().with_sinks(sinks);
    let mut events = Vec::new();
    let mut applied = None;
    let mut membership = StoredMembership::default();
    let mut failed: Option<String> = None;
    let mut outcomes = Vec::new();
    for message in rx {
        match message {
            ToShadow::Apply(entries) => {
                for entry in entries.iter() {
                    if failed.is_some() {
                        break;
                    }
                    applied = Some(entry.log_id);
                    match &entry.payload {
                        EntryPayload::Normal(batch)
                            if !keep_ledger || ledger.admit_batch(batch) =>
                        {
                            for record in &batch.records {
                                let collect = keep_ledger.then_some(&mut events);
                                match apply_journal_record(
                                    &mut state,
                                    record,
                                    &mut outcomes,
                                    collect,
                                ) {
                                    Ok(Applied::Control(control)) => ledger.apply_control(control),
                                    Ok(_) => {
                                        ledger.push(&events);
                                        events.clear();
                                    }
                                    Err(e) => {
                                        tracing::error!(error = %e, "snapshot shadow stopped applying");
                                        failed = Some(e.to_string());
                                        break;
                                    }
                                }
                            }
                        }
                        // Refused by the proposal order, as the writer does.
                        EntryPayload::Normal(_) => {}
                        EntryPayload::Membership(m) => {
                            membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        }
                        EntryPayload::Blank => {}
                    }
                }
            }
            ToShadow::Capture(done) => {
                let image = match &failed {
                    Some(e) => Err(e.clone()),
                    None => Ok(Image {
                        rows: state.rows(),
                        ledger: keep_ledger.then(|| ledger.clone()),
                        applied,
                        membership: membership.clone(),
                    }),
                };
                let _ = done.send(image);
            }
            ToShadow::Install(captured) => {
                state = captured.state;
                ledger = captured.ledger.with_sinks(sinks);
                applied = captured.applied;
                membership = captured.membership;
                failed = None;
            }
        }
    }
}
