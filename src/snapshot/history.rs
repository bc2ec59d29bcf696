//! The read model's history: every account event in `account_events`,
//! written in the same transaction as the snapshot rows it leads to.
//!
//! A snapshot moves `snapshot_meta.sequence` from S to D. The events of the
//! records in (S, D] are derived here, on the snapshotter thread, from the
//! journal itself: a follower state at S applies the WAL's records of (S, D]
//! with the same `apply` as the writer, and keeps what it derives (the
//! outbox's own [`collect`], so ids, causes and amounts are the published
//! events'). The writer's hot path does nothing for history, and memory stays
//! one second copy of the state and one chunk of rows, however long
//! PostgreSQL was away. Those WAL records are still on disk: retention
//! deletes only below the durable snapshot.
//!
//! The follower is rebuilt from the snapshot tables whenever it is not at S
//! (the first snapshot after a start, or a write that was rolled back), so a
//! commit always holds exactly the events of (S, D]: never twice across
//! restarts, never a gap.
//!
//! A replica group's leader has no WAL of commands: its events come already
//! derived, from the replicated outbox ledger ([`DerivedEvents`]), which keeps
//! every record until a snapshot's history holds it.

use super::store::{load_in, paced, SnapshotError};
use crate::egress::outbox::{collect, collect_basket};
use crate::egress::{OutboxItem, OutboxRecord};
use crate::engine::codec::{self, Record};
use crate::state_machine::{Outcome, Prepared, State, StateConfig};
use std::time::Duration;
use tokio_postgres::Transaction;

/// Journal records derived per statement.
const CHUNK_RECORDS: u64 = 1_000;

/// Where the events of a span of sequences come from.
pub enum HistorySource {
    /// Derived again from the WAL (a single node).
    Journal(wal::Reader),
    /// Already derived (a replica group's leader: the outbox ledger).
    Derived(Box<dyn DerivedEvents>),
}

/// Events derived elsewhere and held until history has them.
pub trait DerivedEvents: Send {
    /// Appends the records of the sequences `from + 1 ..= through`, in order;
    /// an error when some of them are no longer held.
    fn read(&self, from: u64, through: u64, out: &mut Vec<OutboxRecord>) -> Result<(), String>;
}

pub struct History {
    source: HistorySource,
    /// The state at the newest snapshot's sequence, when known to be.
    follower: Option<State>,
    records: Vec<OutboxRecord>,
    outcomes: Vec<Outcome>,
}

impl History {
    pub fn new(source: HistorySource) -> History {
        History {
            source,
            follower: None,
            records: Vec::new(),
            outcomes: Vec::new(),
        }
    }

    /// Inserts the events of the records `from + 1 ..= through` (`from`: the
    /// sequence of the snapshot `tx` sees). Returns how many.
    pub async fn write(
        &mut self,
        tx: &Transaction<'_>,
        from: u64,
        through: u64,
        timeout: Duration,
    ) -> Result<u64, SnapshotError> {
        if through <= from {
            return Ok(0);
        }
        let reader = match &self.source {
            HistorySource::Journal(reader) => reader,
            HistorySource::Derived(derived) => {
                self.records.clear();
                derived
                    .read(from, through, &mut self.records)
                    .map_err(SnapshotError::Journal)?;
                let mut events = 0;
                for chunk in self.records.chunks(CHUNK_RECORDS as usize) {
                    events += paced(timeout, insert(tx, chunk)).await?;
                }
                return Ok(events);
            }
        };
        let mut follower = match self.follower.take() {
            Some(state) if state.last_sequence() == from => state,
            _ => match load_in(tx).await? {
                Some(rows) if rows.sequence == from => State::restore(rows),
                Some(_) => return Err(SnapshotError::Row("snapshot_meta sequence")),
                None => State::new(StateConfig::default()),
            },
        };
        let mut events = 0;
        let mut next = from + 1;
        while next <= through {
            let end = (next + CHUNK_RECORDS - 1).min(through);
            self.records.clear();
            // An error leaves the follower dropped: the next write rebuilds it.
            reader.read(next, end, |sequence, payload| {
                let (record, timestamp_ms) = codec::decode_record(payload)
                    .map_err(|e| SnapshotError::Journal(format!("record {sequence}: {e}")))?;
                match record {
                    Record::Command(command) => {
                        collect(
                            &mut self.records,
                            &mut follower,
                            &command,
                            &Prepared::of(&command),
                            sequence,
                            timestamp_ms,
                            None,
                        );
                    }
                    Record::Basket(items) => collect_basket(
                        &mut self.records,
                        &mut follower,
                        &items,
                        sequence,
                        timestamp_ms,
                        None,
                        &mut self.outcomes,
                    ),
                }
                Ok::<(), SnapshotError>(())
            })?;
            events += paced(timeout, insert(tx, &self.records)).await?;
            next = end + 1;
        }
        debug_assert_eq!(follower.last_sequence(), through);
        self.follower = Some(follower);
        Ok(events)
    }
}

/// One `COPY ... FROM STDIN BINARY` for a chunk's events (dead letters are
/// not account events): a few times cheaper per row than an INSERT.
async fn insert(tx: &Transaction<'_>, records: &[OutboxRecord]) -> Result<u64, SnapshotError> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::{ToSql, Type};
    if !records
        .iter()
        .any(|r| matches!(r.item, OutboxItem::Event { .. }))
    {
        return Ok(0);
    }
    // The primary key refuses a second copy of an event: a bug would fail the
    // snapshot loudly instead of doubling a movement.
    let sink = tx
        .copy_in(
            "COPY account_events (sequence, event_index, event_id, account_id, type, order_id, asset,
                                  amount, available_after, reserved_after, cause_id, reason, \"timestamp\")
             FROM STDIN BINARY",
        )
        .await?;
    let types = [
        Type::INT8,
        Type::INT4,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::NUMERIC,
        Type::NUMERIC,
        Type::NUMERIC,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures_util::pin_mut!(writer);
    let mut event_id = String::new();
    for record in records {
        let OutboxItem::Event { index, event } = &record.item else {
            continue;
        };
        event_id.clear();
        let _ = std::fmt::Write::write_fmt(
            &mut event_id,
            format_args!("{}-{}", record.sequence, index),
        );
        let row: [&(dyn ToSql + Sync); 13] = [
            &(record.sequence as i64),
            &(*index as i32),
            &event_id.as_str(),
            &event.account_id.0,
            &event.kind.name(),
            &event.order_id.as_ref().map(|o| o.as_str()),
            &event.asset.as_ref().map(|a| a.as_str()),
            &rust_decimal::Decimal::from(event.amount),
            &rust_decimal::Decimal::from(event.available_after),
            &rust_decimal::Decimal::from(event.reserved_after),
            &Some(record.cause_id.as_str()).filter(|s| !s.is_empty()),
            &Some(event.reason.as_str()).filter(|s| !s.is_empty()),
            &record.timestamp_ms,
        ];
        writer.as_mut().write(&row).await?;
    }
    Ok(writer.finish().await?)
}

/// `account-service history`: one account's movements, oldest first, from
/// the read model.
#[derive(clap::Args, Debug)]
pub struct HistoryArgs {
    /// PostgreSQL URL of the read model.
    #[arg(long, env = "ACCOUNT_POSTGRES_URL")]
    pub postgres_url: String,
    /// The account whose movements to list.
    #[arg(long)]
    pub account_id: i64,
    /// Only events at or after this time: unix milliseconds, or any
    /// PostgreSQL timestamp (`2026-12-01`, `2026-12-01 09:30:00+01`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only events of this asset (a currency or a symbol).
    #[arg(long)]
    pub asset: Option<String>,
    /// At most this many events.
    #[arg(long, default_value_t = 1_000)]
    pub limit: i64,
    /// `text` (a table) or `json` (one object per line).
    #[arg(long, value_enum, default_value_t = HistoryFormat::Text)]
    pub format: HistoryFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum HistoryFormat {
    Text,
    Json,
}

/// Prints the events `args` asks for to stdout.
pub async fn print(args: HistoryArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let client = super::database::Database::parse(&args.postgres_url)?
        .connect()
        .await
        .context("connecting to PostgreSQL")?;
    let since_ms: Option<i64> = match &args.since {
        None => None,
        Some(text) => match text.parse::<i64>() {
            Ok(ms) => Some(ms),
            Err(_) => Some(
                client
                    .query_one(
                        "SELECT (extract(epoch FROM $1::text::timestamptz) * 1000)::bigint",
                        &[text],
                    )
                    .await
                    .with_context(|| format!("--since {text:?}: not a time PostgreSQL reads"))?
                    .get(0),
            ),
        },
    };
    let rows = client
        .query(
            "SELECT sequence, event_id, type, coalesce(asset, ''), amount::text, available_after::text,
                    reserved_after::text, coalesce(order_id, ''), coalesce(cause_id, ''), coalesce(reason, ''),
                    \"timestamp\",
                    to_char(to_timestamp(\"timestamp\" / 1000.0) AT TIME ZONE 'UTC',
                            'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
               FROM account_events
              WHERE account_id = $1 AND \"timestamp\" >= $2 AND ($3::text IS NULL OR asset = $3)
              ORDER BY sequence, event_index
              LIMIT $4",
            &[
                &args.account_id,
                &since_ms.unwrap_or(i64::MIN),
                &args.asset,
                &args.limit,
            ],
        )
        .await
        .context("reading account_events")?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    if matches!(args.format, HistoryFormat::Text) {
        writeln!(
            out,
            "{:>10}  {:<24}  {:<20}  {:<6}  {:>16}  {:>16}  {:>16}  {:<16}  {:<16}  reason",
            "sequence",
            "time",
            "type",
            "asset",
            "amount",
            "available_after",
            "reserved_after",
            "order_id",
            "cause_id"
        )?;
    }
    for row in &rows {
        let sequence: i64 = row.get(0);
        let text = |i| row.get::<_, String>(i);
        match args.format {
            HistoryFormat::Text => writeln!(
                out,
                "{:>10}  {:<24}  {:<20}  {:<6}  {:>16}  {:>16}  {:>16}  {:<16}  {:<16}  {}",
                sequence,
                text(11),
                text(2),
                text(3),
                text(4),
                text(5),
                text(6),
                text(7),
                text(8),
                text(9)
            )?,
            HistoryFormat::Json => {
                let line = serde_json::json!({
                    "sequence": sequence,
                    "event_id": text(1),
                    "type": text(2),
                    "asset": text(3),
                    "amount": text(4),
                    "available_after": text(5),
                    "reserved_after": text(6),
                    "order_id": text(7),
                    "cause_id": text(8),
                    "reason": text(9),
                    "timestamp": row.get::<_, i64>(10),
                });
                writeln!(out, "{line}")?;
            }
        }
    }
    Ok(())
}
