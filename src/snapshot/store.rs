//! Reading and writing snapshot rows (tokio-postgres).

use super::schema::MIGRATIONS;
use crate::domain::{
    AccountId, AccountStatus, Amount, Asset, Id, IdempotencyKey, ReservationKind, StateConfig,
    Topic,
};
use crate::state_machine::{
    Account, CashBalance, Delta, IdempotencyEntry, Position, Reservation, ReservationKey,
    ReservationState, Rows,
};
use futures_util::TryStreamExt;
use rust_decimal::Decimal;
use std::collections::HashMap;
use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("PostgreSQL: {0}{causes}", causes = causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("snapshot row: invalid {0}")]
    Row(&'static str),
    #[error("PostgreSQL did not answer within {0:?} (hung or overloaded); abandoned, retried")]
    Timeout(std::time::Duration),
    #[error("PostgreSQL TLS: {0}")]
    Tls(String),
    #[error("history from the write-ahead log: {0}")]
    Wal(#[from] wal::WalError),
    #[error("history from the write-ahead log: {0}")]
    Journal(String),
    #[error("snapshot_meta belongs to write-ahead log {theirs}, not to this service's log {ours}: another deployment's tables; not overwritten")]
    ForeignLog { ours: String, theirs: String },
    #[error("snapshot of raft term {ours} at sequence {sequence} refused: the table holds one of term {theirs} at sequence {their_sequence} (written by a later leader, or later by this one)")]
    Superseded {
        ours: u64,
        sequence: u64,
        theirs: u64,
        their_sequence: u64,
    },
}

/// `: cause: its cause...` (a TLS handshake's "invalid peer certificate",
/// a refused connection's OS error), or nothing.
fn causes(error: &tokio_postgres::Error) -> String {
    let mut text = String::new();
    let mut next = std::error::Error::source(error);
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// Whether `error` comes from rustls (as a cause, or inside an I/O error of
/// the TLS stream).
fn tls_refused(error: &tokio_postgres::Error) -> bool {
    let mut next = std::error::Error::source(error);
    while let Some(cause) = next {
        let inner = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|e| e as &(dyn std::error::Error + 'static));
        if cause.is::<rustls::Error>() || inner.is_some_and(|e| e.is::<rustls::Error>()) {
            return true;
        }
        next = cause.source();
    }
    false
}

impl SnapshotError {
    /// Whether retrying may help (PostgreSQL unreachable or restarting),
    /// as opposed to rows that cannot be read.
    pub fn is_transient(&self) -> bool {
        match self {
            // No server answer (refused, reset, closed), or a server-side
            // class that passes: connection (08), resources (53), operator
            // intervention such as "starting up" (57).
            // A TLS handshake the client refused (an untrusted or mismatched
            // certificate) is the configuration, not the network: retrying
            // would only hide it.
            SnapshotError::Postgres(e) if tls_refused(e) => false,
            SnapshotError::Postgres(e) => e
                .as_db_error()
                .is_none_or(|db| matches!(&db.code().code()[..2], "08" | "53" | "57")),
            SnapshotError::Timeout(_) => true,
            SnapshotError::Row(_)
            | SnapshotError::ForeignLog { .. }
            | SnapshotError::Superseded { .. }
            | SnapshotError::Tls(_)
            | SnapshotError::Wal(_)
            | SnapshotError::Journal(_) => false,
        }
    }
}

/// `work`, abandoned after `timeout`: a PostgreSQL that stopped answering
/// (its host frozen, a lock held forever) must not hold a snapshot or the
/// start-up. Dropping the future closes its connection.
pub async fn within<T>(
    timeout: std::time::Duration,
    work: impl std::future::Future<Output = Result<T, SnapshotError>>,
) -> Result<T, SnapshotError> {
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| SnapshotError::Timeout(timeout))?
}

/// Connects and applies the migrations not applied yet.
async fn connect(url: &str) -> Result<Client, SnapshotError> {
    let mut client = super::database::Database::parse(url)?.connect().await?;
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY)")
        .await?;
    for (version, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.batch_execute("LOCK TABLE schema_migrations").await?;
        let applied = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !applied {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tracing::info!(version, "snapshot schema migrated");
        }
        tx.commit().await?;
    }
    Ok(client)
}

/// Rows per statement: each table is written with a few `UNNEST` statements
/// (one round trip per chunk), never one per row.
const CHUNK: usize = 2_000;

/// After each statement the snapshotter idles this many times the statement's
/// duration. A database that shares cores with the service (a small host, a
/// sidecar) then never takes a core away for a whole snapshot at once: the
/// service's queue would build up behind it (measured in BENCHMARKS.md).
const PACE: u32 = 2;

/// One statement, abandoned after `timeout` (see [`within`]), then paced.
pub(super) async fn paced<T>(
    timeout: std::time::Duration,
    work: impl std::future::Future<Output = Result<T, SnapshotError>>,
) -> Result<T, SnapshotError> {
    let started = std::time::Instant::now();
    let out = within(timeout, work).await?;
    tokio::time::sleep(started.elapsed() * PACE).await;
    Ok(out)
}

/// What one snapshot write did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Rows added to `account_events`.
    pub events: u64,
}

/// Writes one delta, the account events that lead to it (`history`) and the
/// new `snapshot_meta` in one transaction. `outbox_watermark`: the sequence
/// up to which account events are published (Kafka on), recorded for the
/// read model. `log_id`: the WAL's identity; a `snapshot_meta` of another log
/// is never overwritten. Each statement is abandoned after `timeout` (a
/// PostgreSQL that stopped answering), so a long catch-up after an outage
/// may take longer than `timeout` as a whole, but never hangs.
pub async fn write(
    config: &super::SnapshotConfig,
    client: &mut Option<Client>,
    delta: &Delta,
    outbox_watermark: Option<u64>,
    history: Option<&mut super::history::History>,
) -> Result<Written, SnapshotError> {
    let (url, log_id, term, timeout) = (
        config.url.as_str(),
        config.log_id.as_str(),
        config.term,
        config.timeout,
    );
    let client = match client {
        Some(open) if !open.is_closed() => open,
        _ => client.insert(within(timeout, connect(url)).await?),
    };
    let tx = within(timeout, async { Ok(client.transaction().await?) }).await?;
    // The snapshot this one follows, locked: its sequence is where history
    // goes on from.
    let previous = within(timeout, async {
        Ok(tx
            .query_opt(
                "SELECT sequence, log_id, term FROM snapshot_meta WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await?)
    })
    .await?;
    let (previous, theirs, their_term) = previous.map_or((0, None, None), |row| {
        (
            row.get::<_, i64>(0) as u64,
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<i64>>(2),
        )
    });
    if let Some(theirs) = theirs.filter(|theirs| theirs != log_id) {
        return Err(SnapshotError::ForeignLog {
            ours: log_id.to_owned(),
            theirs,
        });
    }
    // A replica group's snapshots only move forward: a newer term, or the
    // same term at a later sequence (a leader's old snapshotter, stopped when
    // its quorum check failed, may still be writing when a new one starts).
    if let (Some(ours), Some(theirs)) = (term, their_term) {
        let theirs = theirs as u64;
        if (theirs, previous) > (ours, delta.sequence) {
            return Err(SnapshotError::Superseded {
                ours,
                sequence: delta.sequence,
                theirs,
                their_sequence: previous,
            });
        }
    }
    let mut written = Written::default();
    if let Some(history) = history {
        // Before a full delta empties the tables the follower may be rebuilt from.
        written.events = history
            .write(&tx, previous, delta.sequence, timeout)
            .await?;
    }
    if delta.full {
        paced(timeout, async {
            Ok(tx
                .batch_execute(
                    "TRUNCATE accounts, cash_balances, positions, reservations, idempotency_key_batches, kafka_offsets",
                )
                .await?)
        })
        .await?;
    }
    for chunk in delta.accounts.chunks(CHUNK) {
        paced(timeout, write_accounts(&tx, chunk)).await?;
    }
    for chunk in delta.reservations.chunks(CHUNK) {
        paced(timeout, write_reservations(&tx, chunk)).await?;
    }
    for chunk in delta.removed_reservations.chunks(CHUNK) {
        paced(timeout, delete_reservations(&tx, chunk)).await?;
    }
    paced(timeout, async {
        Ok(tx
            .execute(
                "DELETE FROM idempotency_key_batches WHERE last_position < $1",
                &[&(delta.keys_base as i64)],
            )
            .await?)
    })
    .await?;
    for chunk in delta.keys.chunks(CHUNK * 10) {
        paced(timeout, write_keys(&tx, chunk)).await?;
    }
    within(timeout, async {
        for (topic, partition, offset) in &delta.offsets {
            tx.execute(
                "INSERT INTO kafka_offsets (topic, partition, \"offset\") VALUES ($1, $2, $3)
                 ON CONFLICT (topic, partition) DO UPDATE SET \"offset\" = $3",
                &[&(*topic as i16), partition, offset],
            )
            .await?;
        }
        Ok(())
    })
    .await?;
    let meta = within(timeout, async {
        Ok(tx
        .execute(
            "INSERT INTO snapshot_meta (id, sequence, timestamp_ms, keys_base, outbox_watermark,
                                        idempotency_window_ms, tick_work_max, log_id, term)
             VALUES (1, $1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO UPDATE
                SET sequence = $1, timestamp_ms = $2, keys_base = $3, outbox_watermark = $4,
                    idempotency_window_ms = $5, tick_work_max = $6, log_id = $7, term = $8,
                    written_at = now()
              WHERE snapshot_meta.log_id IS NULL OR snapshot_meta.log_id = $7",
            &[
                &(delta.sequence as i64),
                &delta.timestamp_ms,
                &(delta.keys_base as i64),
                &outbox_watermark.map(|w| w as i64),
                &delta.config.idempotency_window_ms,
                &i64::from(delta.config.tick_work_max),
                &log_id,
                &term.map(|t| t as i64),
            ],
        )
        .await?)
    })
    .await?;
    if meta == 0 {
        // Rolled back on drop: not one row of another log's tables is touched.
        let theirs: String = tx
            .query_one("SELECT log_id FROM snapshot_meta WHERE id = 1", &[])
            .await?
            .get(0);
        return Err(SnapshotError::ForeignLog {
            ours: log_id.to_owned(),
            theirs,
        });
    }
    within(timeout, async { Ok(tx.commit().await?) }).await?;
    Ok(written)
}

/// Makes `log_id` the log of the newest snapshot: the WAL that continues it
/// (a restore from the snapshot alone starts a new log).
pub async fn set_log_id(url: &str, log_id: &str) -> Result<(), SnapshotError> {
    let client = connect(url).await?;
    client
        .execute(
            "UPDATE snapshot_meta SET log_id = $1 WHERE id = 1",
            &[&log_id],
        )
        .await?;
    Ok(())
}

async fn delete_reservations(
    tx: &tokio_postgres::Transaction<'_>,
    keys: &[ReservationKey],
) -> Result<(), SnapshotError> {
    let accounts: Vec<i64> = keys.iter().map(|k| k.account_id.0).collect();
    let orders: Vec<&str> = keys.iter().map(|k| k.order_id.as_str()).collect();
    tx.execute(
        "DELETE FROM reservations r USING unnest($1::bigint[], $2::text[]) AS d(account_id, order_id)
          WHERE r.account_id = d.account_id AND r.order_id = d.order_id",
        &[&accounts, &orders],
    )
    .await?;
    Ok(())
}

/// Upserts the accounts and replaces their cash and position rows.
async fn write_accounts(
    tx: &tokio_postgres::Transaction<'_>,
    accounts: &[Account],
) -> Result<(), SnapshotError> {
    let ids: Vec<i64> = accounts.iter().map(|a| a.account_id.0).collect();
    let statuses: Vec<&str> = accounts.iter().map(|a| a.status.name()).collect();
    let bases: Vec<&str> = accounts.iter().map(|a| a.base_currency.as_str()).collect();
    let overdrawn: Vec<bool> = accounts.iter().map(|a| a.overdrawn).collect();
    tx.execute(
        "INSERT INTO accounts (account_id, status, base_currency, overdrawn)
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bool[])
         ON CONFLICT (account_id) DO UPDATE
            SET status = excluded.status, base_currency = excluded.base_currency, overdrawn = excluded.overdrawn",
        &[&ids, &statuses, &bases, &overdrawn],
    )
    .await?;
    tx.execute(
        "DELETE FROM cash_balances WHERE account_id = ANY($1)",
        &[&ids],
    )
    .await?;
    tx.execute("DELETE FROM positions WHERE account_id = ANY($1)", &[&ids])
        .await?;

    let cash: Vec<(i64, &CashBalance)> = accounts
        .iter()
        .flat_map(|a| a.cash.iter().map(move |b| (a.account_id.0, b)))
        .collect();
    let cash_ordinals: Vec<i16> = accounts
        .iter()
        .flat_map(|a| (0..a.cash.len()).map(|i| i as i16))
        .collect();
    if !cash.is_empty() {
        let owners: Vec<i64> = cash.iter().map(|(id, _)| *id).collect();
        let currencies: Vec<&str> = cash.iter().map(|(_, b)| b.currency.as_str()).collect();
        let available: Vec<Decimal> = cash.iter().map(|(_, b)| b.available.into()).collect();
        let reserved: Vec<Decimal> = cash.iter().map(|(_, b)| b.reserved.into()).collect();
        tx.execute(
            "INSERT INTO cash_balances (account_id, currency, available, reserved, ordinal)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::numeric[], $4::numeric[], $5::int2[])",
            &[&owners, &currencies, &available, &reserved, &cash_ordinals],
        )
        .await?;
    }

    let positions: Vec<(i64, &Position)> = accounts
        .iter()
        .flat_map(|a| a.positions.iter().map(move |p| (a.account_id.0, p)))
        .collect();
    let position_ordinals: Vec<i16> = accounts
        .iter()
        .flat_map(|a| (0..a.positions.len()).map(|i| i as i16))
        .collect();
    if !positions.is_empty() {
        let col = |f: fn(&Position) -> Amount| -> Vec<Decimal> {
            positions.iter().map(|(_, p)| f(p).into()).collect()
        };
        let owners: Vec<i64> = positions.iter().map(|(id, _)| *id).collect();
        let symbols: Vec<&str> = positions.iter().map(|(_, p)| p.symbol.as_str()).collect();
        let currencies: Vec<&str> = positions.iter().map(|(_, p)| p.currency.as_str()).collect();
        tx.execute(
            "INSERT INTO positions (account_id, symbol, quantity, reserved_quantity, cost_basis, realized_pnl, currency,
                                    ordinal)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::numeric[], $4::numeric[], $5::numeric[],
                                  $6::numeric[], $7::text[], $8::int2[])",
            &[
                &owners,
                &symbols,
                &col(|p| p.quantity),
                &col(|p| p.reserved_quantity),
                &col(|p| p.cost_basis),
                &col(|p| p.realized_pnl),
                &currencies,
                &position_ordinals,
            ],
        )
        .await?;
    }
    Ok(())
}

async fn write_reservations(
    tx: &tokio_postgres::Transaction<'_>,
    reservations: &[Reservation],
) -> Result<(), SnapshotError> {
    let col = |f: fn(&Reservation) -> Amount| -> Vec<Decimal> {
        reservations.iter().map(|r| f(r).into()).collect()
    };
    let accounts: Vec<i64> = reservations.iter().map(|r| r.account_id.0).collect();
    let orders: Vec<&str> = reservations.iter().map(|r| r.order_id.as_str()).collect();
    let kinds: Vec<&str> = reservations.iter().map(|r| r.kind.name()).collect();
    let assets: Vec<&str> = reservations.iter().map(|r| r.asset.as_str()).collect();
    let states: Vec<&str> = reservations.iter().map(|r| r.state.name()).collect();
    let expires: Vec<i64> = reservations
        .iter()
        .map(|r| r.expires_at_ms.unwrap_or(0))
        .collect();
    let sequences: Vec<i64> = reservations.iter().map(|r| r.sequence as i64).collect();
    let closed: Vec<i64> = reservations.iter().map(|r| r.closed_at_ms).collect();
    let closed_by: Vec<i64> = reservations
        .iter()
        .map(|r| r.closed_sequence as i64)
        .collect();
    tx.execute(
        "INSERT INTO reservations (account_id, order_id, kind, asset, amount, remaining, consumed, released, state,
                                   expires_at_ms, sequence, closed_at_ms, closed_sequence)
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::numeric[], $6::numeric[],
                              $7::numeric[], $8::numeric[], $9::text[], $10::bigint[], $11::bigint[], $12::bigint[],
                              $13::bigint[])
         ON CONFLICT (account_id, order_id) DO UPDATE SET kind = excluded.kind, asset = excluded.asset,
             amount = excluded.amount, remaining = excluded.remaining, consumed = excluded.consumed,
             released = excluded.released, state = excluded.state, expires_at_ms = excluded.expires_at_ms,
             sequence = excluded.sequence, closed_at_ms = excluded.closed_at_ms,
             closed_sequence = excluded.closed_sequence",
        &[
            &accounts,
            &orders,
            &kinds,
            &assets,
            &col(|r| r.amount),
            &col(|r| r.remaining),
            &col(|r| r.consumed),
            &col(|r| r.released),
            &states,
            &expires,
            &sequences,
            &closed,
            &closed_by,
        ],
    )
    .await?;
    Ok(())
}

async fn write_keys(
    tx: &tokio_postgres::Transaction<'_>,
    keys: &[(u64, IdempotencyKey, IdempotencyEntry)],
) -> Result<(), SnapshotError> {
    let (Some(first), Some(last)) = (keys.first(), keys.last()) else {
        return Ok(());
    };
    let mut bytes = Vec::with_capacity(keys.len() * 96);
    super::key_batch::encode(keys, &mut bytes);
    // A batch re-sent after a full replay holds the same keys: replace it.
    tx.execute(
        "INSERT INTO idempotency_key_batches (first_position, last_position, keys) VALUES ($1, $2, $3)
         ON CONFLICT (first_position) DO UPDATE SET last_position = excluded.last_position, keys = excluded.keys",
        &[&(first.0 as i64), &(last.0 as i64), &bytes],
    )
    .await?;
    Ok(())
}

fn status(s: &str) -> Result<AccountStatus, SnapshotError> {
    [
        AccountStatus::Active,
        AccountStatus::Suspended,
        AccountStatus::Closed,
    ]
    .into_iter()
    .find(|x| x.name() == s)
    .ok_or(SnapshotError::Row("status"))
}

fn asset(s: &str) -> Result<Asset, SnapshotError> {
    Asset::from_bytes(s.as_bytes()).ok_or(SnapshotError::Row("asset"))
}

/// A numeric column as the state keeps it; `field` names a value with more
/// than 8 fractional digits (never written by a snapshot).
fn amount(value: Decimal, field: &'static str) -> Result<Amount, SnapshotError> {
    Amount::of(value).ok_or(SnapshotError::Row(field))
}

fn id(s: &str) -> Result<Id, SnapshotError> {
    Id::new_allow_empty(s).map_err(|_| SnapshotError::Row("id"))
}

/// The rows of one query as a stream (no whole table buffered).
async fn rows(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<std::pin::Pin<Box<tokio_postgres::RowStream>>, SnapshotError> {
    Ok(Box::pin(tx.query_raw(sql, params.iter().copied()).await?))
}

/// Loads the newest snapshot; `None` when there is none yet. Rows stream in
/// (no whole table buffered as rows).
pub async fn load(url: &str) -> Result<Option<Rows>, SnapshotError> {
    let started = std::time::Instant::now();
    let mut client = connect(url).await?;
    // One consistent view of all tables, whatever else reads or writes them.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let loaded = load_in(&tx).await?;
    if let Some(rows) = &loaded {
        tracing::debug!(
            sequence = rows.sequence,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot rows read"
        );
    }
    Ok(loaded)
}

/// The snapshot's rows as `tx` sees them; `None` when there is none yet.
pub(super) async fn load_in(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<Option<Rows>, SnapshotError> {
    let started = std::time::Instant::now();
    let Some(meta) = tx
        .query_opt(
            "SELECT sequence, timestamp_ms, keys_base, idempotency_window_ms, tick_work_max, log_id
             FROM snapshot_meta WHERE id = 1",
            &[],
        )
        .await?
    else {
        return Ok(None);
    };
    let config = StateConfig {
        idempotency_window_ms: meta.get(3),
        tick_work_max: u32::try_from(meta.get::<_, i64>(4))
            .map_err(|_| SnapshotError::Row("snapshot_meta tick_work_max"))?,
    };
    if !config.is_valid() {
        return Err(SnapshotError::Row("snapshot_meta state configuration"));
    }
    let mut loaded = Rows {
        sequence: meta.get::<_, i64>(0) as u64,
        config,
        timestamp_ms: meta.get(1),
        keys_base: meta.get::<_, i64>(2) as u64,
        log_id: meta.get(5),
        ..Rows::default()
    };
    let mut accounts: HashMap<i64, Account> = HashMap::new();
    let mut stream = rows(
        tx,
        "SELECT account_id, status, base_currency, overdrawn FROM accounts",
        &[],
    )
    .await?;
    while let Some(r) = stream.try_next().await? {
        let account_id = AccountId(r.get(0));
        let mut a = Account::new(account_id, asset(r.get(2))?);
        a.status = status(r.get(1))?;
        a.overdrawn = r.get(3);
        accounts.insert(account_id.0, a);
    }
    const CASH: &str =
        "SELECT account_id, currency, available, reserved FROM cash_balances ORDER BY account_id, ordinal";
    let mut stream = rows(tx, CASH, &[]).await?;
    while let Some(r) = stream.try_next().await? {
        let a = accounts
            .get_mut(&r.get::<_, i64>(0))
            .ok_or(SnapshotError::Row("cash account"))?;
        a.cash.push(CashBalance {
            currency: asset(r.get(1))?,
            available: amount(r.get(2), "available")?,
            reserved: amount(r.get(3), "reserved")?,
        });
    }
    const POSITIONS: &str =
        "SELECT account_id, symbol, quantity, reserved_quantity, cost_basis, realized_pnl,
                                    currency FROM positions ORDER BY account_id, ordinal";
    let mut stream = rows(tx, POSITIONS, &[]).await?;
    while let Some(r) = stream.try_next().await? {
        let a = accounts
            .get_mut(&r.get::<_, i64>(0))
            .ok_or(SnapshotError::Row("position account"))?;
        a.positions.push(Position {
            symbol: asset(r.get(1))?,
            quantity: amount(r.get(2), "quantity")?,
            reserved_quantity: amount(r.get(3), "reserved_quantity")?,
            cost_basis: amount(r.get(4), "cost_basis")?,
            realized_pnl: amount(r.get(5), "realized_pnl")?,
            currency: asset(r.get(6))?,
        });
    }
    loaded.accounts = accounts.into_values().collect();
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "snapshot accounts read"
    );
    const RESERVATIONS: &str =
        "SELECT account_id, order_id, kind, asset, amount, remaining, consumed, released, state, expires_at_ms,
                sequence, closed_at_ms, closed_sequence FROM reservations";
    let mut stream = rows(tx, RESERVATIONS, &[]).await?;
    while let Some(r) = stream.try_next().await? {
        let kind = match r.get::<_, &str>(2) {
            "CASH" => ReservationKind::Cash,
            "SECURITY" => ReservationKind::Security,
            _ => return Err(SnapshotError::Row("kind")),
        };
        let state = [
            ReservationState::Open,
            ReservationState::Consumed,
            ReservationState::Released,
            ReservationState::Expired,
        ]
        .into_iter()
        .find(|s| s.name() == r.get::<_, &str>(8))
        .ok_or(SnapshotError::Row("state"))?;
        let expires: i64 = r.get(9);
        loaded.reservations.push(Reservation {
            account_id: AccountId(r.get(0)),
            order_id: id(r.get(1))?,
            kind,
            asset: asset(r.get(3))?,
            amount: amount(r.get(4), "amount")?,
            remaining: amount(r.get(5), "remaining")?,
            consumed: amount(r.get(6), "consumed")?,
            released: amount(r.get(7), "released")?,
            state,
            expires_at_ms: (expires != 0).then_some(expires),
            sequence: r.get::<_, i64>(10) as u64,
            closed_at_ms: r.get(11),
            closed_sequence: r.get::<_, i64>(12) as u64,
        });
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "snapshot reservations read"
    );
    let mut keys = Vec::new();
    const KEYS: &str =
        "SELECT keys FROM idempotency_key_batches WHERE last_position >= $1 ORDER BY first_position";
    let mut stream = rows(tx, KEYS, &[&(loaded.keys_base as i64)]).await?;
    while let Some(r) = stream.try_next().await? {
        super::key_batch::decode(r.get(0), &mut keys)
            .ok_or(SnapshotError::Row("idempotency key batch"))?;
    }
    // Batches re-sent after a full replay may overlap: positions are
    // deterministic, so the copies are equal.
    keys.retain(|(position, _, _)| *position >= loaded.keys_base);
    keys.sort_by_key(|(position, _, _)| *position);
    keys.dedup_by_key(|(position, _, _)| *position);
    let contiguous = keys
        .iter()
        .enumerate()
        .all(|(i, (position, _, _))| *position == loaded.keys_base + i as u64);
    if !contiguous {
        return Err(SnapshotError::Row(
            "idempotency key positions (not contiguous)",
        ));
    }
    loaded.keys = keys;
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "snapshot keys read"
    );
    let mut stream = rows(
        tx,
        "SELECT topic, partition, \"offset\" FROM kafka_offsets",
        &[],
    )
    .await?;
    while let Some(r) = stream.try_next().await? {
        let topic = Topic::from_u8(r.get::<_, i16>(0) as u8).ok_or(SnapshotError::Row("topic"))?;
        loaded.offsets.push((topic, r.get(1), r.get(2)));
    }
    Ok(Some(loaded))
}
