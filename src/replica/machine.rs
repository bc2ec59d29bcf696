//! openraft's state machine: committed entries go to the replica's writer
//! thread, which alone owns the `State` and applies them with the same pure
//! `apply` as a single node, in log order. openraft waits for each batch to
//! be applied before it reports it applied.

use super::writer::ToWriter;
use super::{Member, NodeId, TypeConfig};
use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use std::io::Cursor;

#[derive(Clone)]
pub(super) struct Machine {
    to_writer: crossbeam_channel::Sender<ToWriter>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
}

impl Machine {
    pub(super) fn new(to_writer: crossbeam_channel::Sender<ToWriter>) -> Machine {
        Machine {
            to_writer,
            last_applied: None,
            membership: StoredMembership::default(),
        }
    }
}

fn gone(what: &str) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(format!(
        "{what}: the replica's writer thread has stopped"
    )))
    .into()
}

fn not_yet() -> StorageError<NodeId> {
    StorageIOError::read_snapshot(
        None,
        AnyError::error("raft snapshots are not built yet: a replica catches up from the log"),
    )
    .into()
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
        let (done, applied) = tokio::sync::oneshot::channel();
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
        _meta: &SnapshotMeta<NodeId, Member>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        Err(not_yet())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(None)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Machine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        Err(not_yet())
    }
}
