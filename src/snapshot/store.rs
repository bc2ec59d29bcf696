//! Reading and writing snapshot rows (tokio-postgres).

use super::schema::MIGRATIONS;
use crate::domain::{AccountId, AccountStatus, Asset, Id, ReservationKind, Topic};
use crate::state_machine::{
    Account, CashBalance, Delta, IdempotencyEntry, Outcome, Position, Reservation,
    ReservationState, ResultCode, Rows,
};
use rust_decimal::Decimal;
use std::collections::HashMap;
use tokio_postgres::{Client, NoTls};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("snapshot row: invalid {0}")]
    Row(&'static str),
}

/// Connects and applies the migrations not applied yet.
async fn connect(url: &str) -> Result<Client, SnapshotError> {
    let (mut client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection closed");
        }
    });
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

/// Writes one delta and the new `snapshot_meta` in one transaction.
pub async fn write(
    url: &str,
    client: &mut Option<Client>,
    delta: &Delta,
) -> Result<(), SnapshotError> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = Some(connect(url).await?);
    }
    let Some(client) = client.as_mut() else {
        return Ok(());
    };
    let tx = client.transaction().await?;
    let upsert_account = tx
        .prepare(
            "INSERT INTO accounts (account_id, status, base_currency, overdrawn) VALUES ($1, $2, $3, $4)
             ON CONFLICT (account_id) DO UPDATE SET status = $2, base_currency = $3, overdrawn = $4",
        )
        .await?;
    let insert_cash = tx
        .prepare("INSERT INTO cash_balances (account_id, currency, available, reserved) VALUES ($1, $2, $3, $4)")
        .await?;
    let insert_position = tx
        .prepare(
            "INSERT INTO positions (account_id, symbol, quantity, reserved_quantity, cost_basis, realized_pnl, currency)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await?;
    for a in &delta.accounts {
        let id = a.account_id.0;
        tx.execute(
            &upsert_account,
            &[
                &id,
                &a.status.name(),
                &a.base_currency.as_str(),
                &a.overdrawn,
            ],
        )
        .await?;
        tx.execute("DELETE FROM cash_balances WHERE account_id = $1", &[&id])
            .await?;
        tx.execute("DELETE FROM positions WHERE account_id = $1", &[&id])
            .await?;
        for b in &a.cash {
            tx.execute(
                &insert_cash,
                &[&id, &b.currency.as_str(), &b.available, &b.reserved],
            )
            .await?;
        }
        for p in &a.positions {
            tx.execute(
                &insert_position,
                &[
                    &id,
                    &p.symbol.as_str(),
                    &p.quantity,
                    &p.reserved_quantity,
                    &p.cost_basis,
                    &p.realized_pnl,
                    &p.currency.as_str(),
                ],
            )
            .await?;
        }
    }
    let upsert_reservation = tx
        .prepare(
            "INSERT INTO reservations (account_id, order_id, kind, asset, amount, remaining, consumed, released, state,
                                       expires_at_ms, sequence, closed_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (account_id, order_id) DO UPDATE SET kind = $3, asset = $4, amount = $5, remaining = $6,
                 consumed = $7, released = $8, state = $9, expires_at_ms = $10, sequence = $11, closed_at_ms = $12",
        )
        .await?;
    for r in &delta.reservations {
        tx.execute(
            &upsert_reservation,
            &[
                &r.account_id.0,
                &r.order_id.as_str(),
                &r.kind.name(),
                &r.asset.as_str(),
                &r.amount,
                &r.remaining,
                &r.consumed,
                &r.released,
                &r.state.name(),
                &r.expires_at_ms.unwrap_or(0),
                &(r.sequence as i64),
                &r.closed_at_ms,
            ],
        )
        .await?;
    }
    for k in &delta.removed_reservations {
        tx.execute(
            "DELETE FROM reservations WHERE account_id = $1 AND order_id = $2",
            &[&k.account_id.0, &k.order_id.as_str()],
        )
        .await?;
    }
    let insert_key = tx
        .prepare(
            "INSERT INTO idempotency_keys (position, key, fingerprint, result, sequence, asset, available, reserved,
                                           released, recorded_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (position) DO NOTHING",
        )
        .await?;
    tx.execute(
        "DELETE FROM idempotency_keys WHERE position < $1",
        &[&(delta.keys_base as i64)],
    )
    .await?;
    for (position, key, e) in &delta.keys {
        let o = &e.outcome;
        tx.execute(
            &insert_key,
            &[
                &(*position as i64),
                &key.as_str(),
                &(e.fingerprint as i64),
                &(o.result as i16),
                &(o.sequence as i64),
                &o.asset.map(|a| a.as_str().to_owned()),
                &o.available,
                &o.reserved,
                &o.released,
                &e.recorded_at_ms,
            ],
        )
        .await?;
    }
    for (topic, partition, offset) in &delta.offsets {
        tx.execute(
            "INSERT INTO kafka_offsets (topic, partition, \"offset\") VALUES ($1, $2, $3)
             ON CONFLICT (topic, partition) DO UPDATE SET \"offset\" = $3",
            &[&(*topic as i16), partition, offset],
        )
        .await?;
    }
    tx.execute(
        "INSERT INTO snapshot_meta (id, sequence, timestamp_ms, keys_base) VALUES (1, $1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET sequence = $1, timestamp_ms = $2, keys_base = $3, written_at = now()",
        &[&(delta.sequence as i64), &delta.timestamp_ms, &(delta.keys_base as i64)],
    )
    .await?;
    tx.commit().await?;
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

fn id(s: &str) -> Result<Id, SnapshotError> {
    Id::new_allow_empty(s).map_err(|_| SnapshotError::Row("id"))
}

/// Loads the newest snapshot; `None` when there is none yet.
pub async fn load(url: &str) -> Result<Option<Rows>, SnapshotError> {
    let client = connect(url).await?;
    let Some(meta) = client
        .query_opt(
            "SELECT sequence, timestamp_ms, keys_base FROM snapshot_meta WHERE id = 1",
            &[],
        )
        .await?
    else {
        return Ok(None);
    };
    let mut rows = Rows {
        sequence: meta.get::<_, i64>(0) as u64,
        timestamp_ms: meta.get(1),
        keys_base: meta.get::<_, i64>(2) as u64,
        ..Rows::default()
    };
    let mut accounts: HashMap<i64, Account> = HashMap::new();
    for r in client
        .query(
            "SELECT account_id, status, base_currency, overdrawn FROM accounts",
            &[],
        )
        .await?
    {
        let account_id = AccountId(r.get(0));
        let mut a = Account::new(account_id, asset(r.get(2))?);
        a.status = status(r.get(1))?;
        a.overdrawn = r.get(3);
        accounts.insert(account_id.0, a);
    }
    for r in client
        .query("SELECT account_id, currency, available, reserved FROM cash_balances ORDER BY account_id, currency", &[])
        .await?
    {
        let a = accounts.get_mut(&r.get::<_, i64>(0)).ok_or(SnapshotError::Row("cash account"))?;
        a.cash.push(CashBalance { currency: asset(r.get(1))?, available: r.get(2), reserved: r.get(3) });
    }
    for r in client
        .query(
            "SELECT account_id, symbol, quantity, reserved_quantity, cost_basis, realized_pnl, currency FROM positions
             ORDER BY account_id, symbol",
            &[],
        )
        .await?
    {
        let a = accounts.get_mut(&r.get::<_, i64>(0)).ok_or(SnapshotError::Row("position account"))?;
        a.positions.push(Position {
            symbol: asset(r.get(1))?,
            quantity: r.get(2),
            reserved_quantity: r.get(3),
            cost_basis: r.get(4),
            realized_pnl: r.get(5),
            currency: asset(r.get(6))?,
        });
    }
    rows.accounts = accounts.into_values().collect();
    for r in client
        .query(
            "SELECT account_id, order_id, kind, asset, amount, remaining, consumed, released, state, expires_at_ms,
                    sequence, closed_at_ms FROM reservations",
            &[],
        )
        .await?
    {
        let kind = match r.get::<_, &str>(2) {
            "CASH" => ReservationKind::Cash,
            "SECURITY" => ReservationKind::Security,
            _ => return Err(SnapshotError::Row("kind")),
        };
        let state = [ReservationState::Open, ReservationState::Consumed, ReservationState::Released, ReservationState::Expired]
            .into_iter()
            .find(|s| s.name() == r.get::<_, &str>(8))
            .ok_or(SnapshotError::Row("state"))?;
        let expires: i64 = r.get(9);
        rows.reservations.push(Reservation {
            account_id: AccountId(r.get(0)),
            order_id: id(r.get(1))?,
            kind,
            asset: asset(r.get(3))?,
            amount: r.get(4),
            remaining: r.get(5),
            consumed: r.get(6),
            released: r.get(7),
            state,
            expires_at_ms: (expires != 0).then_some(expires),
            sequence: r.get::<_, i64>(10) as u64,
            closed_at_ms: r.get(11),
        });
    }
    for r in client
        .query(
            "SELECT position, key, fingerprint, result, sequence, asset, available, reserved, released, recorded_at_ms
             FROM idempotency_keys ORDER BY position",
            &[],
        )
        .await?
    {
        let result = ResultCode::from_u8(r.get::<_, i16>(3) as u8).ok_or(SnapshotError::Row("result"))?;
        let asset_text: Option<&str> = r.get(5);
        let outcome = Outcome {
            result,
            replayed: false,
            sequence: r.get::<_, i64>(4) as u64,
            asset: asset_text.map(asset).transpose()?,
            available: r.get::<_, Decimal>(6),
            reserved: r.get(7),
            released: r.get(8),
        };
        let entry = IdempotencyEntry { fingerprint: r.get::<_, i64>(2) as u64, outcome, recorded_at_ms: r.get(9) };
        rows.keys.push((r.get::<_, i64>(0) as u64, id(r.get(1))?, entry));
    }
    for r in client
        .query(
            "SELECT topic, partition, \"offset\" FROM kafka_offsets",
            &[],
        )
        .await?
    {
        let topic = Topic::from_u8(r.get::<_, i16>(0) as u8).ok_or(SnapshotError::Row("topic"))?;
        rows.offsets.push((topic, r.get(1), r.get(2)));
    }
    Ok(Some(rows))
}
