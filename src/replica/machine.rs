//! openraft's state machine: committed entries go to the replica's writer
//! thread, which alone owns the `State` and applies them with the same pure
//! `apply` as a single node, in log order. openraft waits for each batch to
//! be applied before it reports it applied.
//!
//! Snapshots are the state's own serialization (`State::rows`, postcard),
//! never PostgreSQL: the snapshot shadow (shadow.rs, a second copy of the
//! state fed the same entries) hands over its rows as of the last entry it
//! applied, so the writer never pauses; they are encoded and kept in
//! one file, `<data-dir>/raft-snapshot/current` (written to a temporary file,
//! synced, renamed, the directory synced). openraft then purges the log below
//! it, sends it to a replica that needs entries no longer in the log, and a
//! restart starts from it and re-applies only the entries after it.
//!
//! The file: `MAGIC`, the CRC-32 of the rest (crc32fast, a little-endian
//! u32), then postcard of [`SnapshotFile`]. Its `data` (what goes to another
//! replica) is postcard of the [`Rows`], then, with Kafka on, postcard of the
//! outbox [`Ledger`] (outbox.rs); data that ends after the rows (a snapshot
//! of a group without Kafka, or taken before the ledger existed) has an
//! empty ledger.

// openraft's own error type, which its traits return: not ours to shrink.
#![allow(clippy::result_large_err)]

use super::outbox::{Ledger, Sinks};
use super::shadow::{Captured, Image, ToShadow};
use super::writer::ToWriter;
use super::{Member, NodeId, TypeConfig};
use crate::state_machine::{Rows, State};
use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"ACSNAP01";
const FILE: &str = "current";

/// What the snapshot file holds: openraft's description and the state.
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, Member>,
    /// postcard of [`Rows`]: exactly what goes to another replica.
    data: Vec<u8>,
}

#[derive(Clone)]
pub(super) struct Machine {
    to_writer: crossbeam_channel::Sender<ToWriter>,
    /// The snapshot shadow (shadow.rs): snapshots are taken there.
    to_shadow: crossbeam_channel::Sender<ToShadow>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    dir: Arc<PathBuf>,
}

fn gone(what: &str) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(format!(
        "{what}: the replica's writer thread has stopped"
    )))
    .into()
}

fn snapshot_error(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::new(
        ErrorSubject::Snapshot(None),
        verb,
        AnyError::error(e.to_string()),
    )
    .into()
}

impl Machine {
    /// The state machine of the replica whose snapshots live in `dir`; when
    /// one is there, the writer's state is replaced by it first.
    pub(super) async fn open(
        dir: PathBuf,
        to_writer: crossbeam_channel::Sender<ToWriter>,
        sinks: Sinks,
    ) -> Result<Machine, StorageError<NodeId>> {
        std::fs::create_dir_all(&dir).map_err(|e| snapshot_error(ErrorVerb::Write, e))?;
        let to_shadow =
            super::shadow::start(sinks).map_err(|e| snapshot_error(ErrorVerb::Write, e))?;
        let mut machine = Machine {
            to_writer,
            to_shadow,
            last_applied: None,
            membership: StoredMembership::default(),
            dir: Arc::new(dir),
        };
        let dir = machine.dir.clone();
        let loaded = tokio::task::spawn_blocking(move || read_file(&dir))
            .await
            .map_err(|e| snapshot_error(ErrorVerb::Read, e))??;
        if let Some(file) = loaded {
            tracing::info!(snapshot = %file.meta.snapshot_id, "replica starts from its snapshot");
            machine.install(file.meta, file.data, false).await?;
        }
        Ok(machine)
    }

    /// Decodes `data`, persists it (unless it came from the file) and hands
    /// the state to the writer.
    async fn install(
        &mut self,
        meta: SnapshotMeta<NodeId, Member>,
        data: Vec<u8>,
        persist: bool,
    ) -> Result<(), StorageError<NodeId>> {
        let dir = self.dir.clone();
        let file = SnapshotFile { meta, data };
        let (state, ledger, file) = tokio::task::spawn_blocking(move || {
            let (rows, ledger) = decode_data(&file.data)
                .map_err(|e| snapshot_error(ErrorVerb::Read, format!("decoding: {e}")))?;
            let state = State::restore(rows);
            if persist {
                write_file(&dir, &file)?;
            }
            Ok::<_, StorageError<NodeId>>((state, ledger, file))
        })
        .await
        .map_err(|e| snapshot_error(ErrorVerb::Read, e))??;
        let (done, installed) = tokio::sync::oneshot::channel();
        let captured = Captured {
            state: state.clone(),
            ledger: ledger.clone(),
            applied: file.meta.last_log_id,
            membership: file.meta.last_membership.clone(),
        };
        self.to_shadow
            .send(ToShadow::Install(Box::new(captured)))
            .map_err(|_| gone("installing a snapshot"))?;
        self.to_writer
            .send(ToWriter::Install(Box::new((state, ledger)), done))
            .map_err(|_| gone("installing a snapshot"))?;
        installed.await.map_err(|_| gone("installing a snapshot"))?;
        self.last_applied = file.meta.last_log_id;
        self.membership = file.meta.last_membership;
        Ok(())
    }
}

/// A snapshot's data: the rows, then the outbox ledger when there is one.
fn encode_data(rows: &Rows, ledger: Option<&Ledger>) -> Result<Vec<u8>, postcard::Error> {
    let mut data = postcard::to_allocvec(rows)?;
    if let Some(ledger) = ledger {
        data.extend_from_slice(&postcard::to_allocvec(ledger)?);
    }
    Ok(data)
}

/// The rows, and the ledger; data without one (a group without sinks, or
/// from before ledgers) gives a ledger that begins at the rows' sequence.
fn decode_data(data: &[u8]) -> Result<(Rows, Ledger), postcard::Error> {
    let (rows, rest) = postcard::take_from_bytes::<Rows>(data)?;
    let ledger = match rest {
        [] => Ledger::starting_at(rows.sequence),
        rest => postcard::from_bytes(rest)?,
    };
    Ok((rows, ledger))
}

/// Reads the snapshot file of `dir`, if there is one; a damaged one is an
/// error (the log below it may be gone).
fn read_file(dir: &Path) -> Result<Option<SnapshotFile>, StorageError<NodeId>> {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(snapshot_error(ErrorVerb::Read, format!("{path:?}: {e}"))),
    };
    let damaged = |why: &str| snapshot_error(ErrorVerb::Read, format!("{path:?}: {why}"));
    let Some((crc, body)) = bytes
        .strip_prefix(MAGIC.as_slice())
        .and_then(|rest| rest.split_first_chunk::<4>())
    else {
        return Err(damaged("not a replica snapshot"));
    };
    if u32::from_le_bytes(*crc) != crc32fast::hash(body) {
        return Err(damaged("checksum mismatch"));
    }
    postcard::from_bytes(body)
        .map(Some)
        .map_err(|e| damaged(&e.to_string()))
}

/// Replaces the snapshot file of `dir` with `file`, durably.
fn write_file(dir: &Path, file: &SnapshotFile) -> Result<(), StorageError<NodeId>> {
    let fail = |e: std::io::Error| snapshot_error(ErrorVerb::Write, format!("{dir:?}: {e}"));
    let body = postcard::to_allocvec(file).map_err(|e| snapshot_error(ErrorVerb::Write, e))?;
    let temporary = dir.join(format!("{FILE}.tmp"));
    let mut out = std::fs::File::create(&temporary).map_err(fail)?;
    out.write_all(MAGIC).map_err(fail)?;
    out.write_all(&crc32fast::hash(&body).to_le_bytes())
        .map_err(fail)?;
    out.write_all(&body).map_err(fail)?;
    out.sync_all().map_err(fail)?;
    drop(out);
    std::fs::rename(&temporary, dir.join(FILE)).map_err(fail)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)
}

impl RaftStateMachine<TypeConfig> for Machine {
    type SnapshotBuilder = Machine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), StorageError<NodeId>>
    {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let Some(last) = entries.last() else {
            return Ok(Vec::new());
        };
        let last = last.log_id;
        for entry in &entries {
            if let EntryPayload::Membership(m) = &entry.payload {
                self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
            }
        }
        let count = entries.len();
        let entries = std::sync::Arc::new(entries);
        let (done, applied) = tokio::sync::oneshot::channel();
        self.to_shadow
            .send(ToShadow::Apply(entries.clone()))
            .map_err(|_| gone("applying"))?;
        self.to_writer
            .send(ToWriter::Apply(entries, done))
            .map_err(|_| gone("applying"))?;
        applied.await.map_err(|_| gone("applying"))?;
        self.last_applied = Some(last);
        Ok(vec![(); count])
    }

    async fn get_snapshot_builder(&mut self) -> Machine {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        tracing::info!(snapshot = %meta.snapshot_id, "installing the leader's snapshot");
        self.install(meta.clone(), snapshot.into_inner(), true)
            .await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let dir = self.dir.clone();
        let file = tokio::task::spawn_blocking(move || read_file(&dir))
            .await
            .map_err(|e| snapshot_error(ErrorVerb::Read, e))??;
        Ok(file.map(|f| Snapshot {
            meta: f.meta,
            snapshot: Box::new(Cursor::new(f.data)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Machine {
    /// The shadow's rows (the writer does not stop), encoded and written on
    /// a blocking thread.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (done, captured) = tokio::sync::oneshot::channel();
        self.to_shadow
            .send(ToShadow::Capture(done))
            .map_err(|_| gone("building a snapshot"))?;
        let image = captured
            .await
            .map_err(|_| gone("building a snapshot"))?
            .map_err(|e| snapshot_error(ErrorVerb::Write, e))?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let Image {
                rows,
                ledger,
                applied,
                membership,
            } = image;
            let data =
                encode_data(&rows, ledger.as_ref()).map_err(|e| snapshot_error(ErrorVerb::Write, e))?;
            let sequence = rows.sequence;
            let snapshot_id = match applied {
                Some(l) => format!("{}-{}-{sequence}", l.leader_id.term, l.index),
                None => format!("0-0-{sequence}"),
            };
            let file = SnapshotFile {
                meta: SnapshotMeta {
                    last_log_id: applied,
                    last_membership: membership,
                    snapshot_id,
                },
                data,
            };
            write_file(&dir, &file)?;
            tracing::info!(snapshot = %file.meta.snapshot_id, bytes = file.data.len(), "snapshot built");
            Ok(Snapshot {
                meta: file.meta,
                snapshot: Box::new(Cursor::new(file.data)),
            })
        })
        .await
        .map_err(|e| snapshot_error(ErrorVerb::Write, e))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AccountId, Command, Currency, OpenAccount};
    use crate::state_machine::NoEvents;

    fn rows() -> Rows {
        let mut state = State::default();
        let open = Command::OpenAccount(OpenAccount {
            request_id: crate::domain::Id::new("open-1").unwrap(),
            account_id: AccountId(1),
            base_currency: Currency::currency("USD").unwrap(),
        });
        state.apply(&open, 1, 5, &mut NoEvents);
        state.rows()
    }

    #[test]
    fn snapshot_data_without_a_ledger_gives_one_that_begins_at_its_sequence() {
        // A group without sinks, or a snapshot taken before ledgers existed:
        // no event of the sequences before it can be asked of the ledger.
        let old = postcard::to_allocvec(&rows()).unwrap();
        let (back, ledger) = decode_data(&old).unwrap();
        assert_eq!(postcard::to_allocvec(&back).unwrap(), old);
        assert_eq!(ledger, Ledger::starting_at(1));
        assert_eq!(encode_data(&rows(), None).unwrap(), old);
    }

    #[test]
    fn snapshot_data_carries_the_ledger() {
        let mut ledger = Ledger::default().with_sinks(OUTBOX);
        ledger.acknowledge(1);
        let data = encode_data(&rows(), Some(&ledger)).unwrap();
        let (_, back) = decode_data(&data).unwrap();
        assert_eq!(back.with_sinks(OUTBOX), ledger);
        // A ledger cut short is an error, not an empty ledger.
        assert!(decode_data(&data[..data.len() - 1]).is_err());
    }

    const OUTBOX: Sinks = Sinks {
        outbox: true,
        history: false,
    };
}
