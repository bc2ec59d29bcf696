//! Versioned migrations, applied at start-up in one transaction each.

/// `(version, statements)`; append new versions, never edit old ones.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE accounts (
        account_id bigint PRIMARY KEY,
        status text NOT NULL,
        base_currency text NOT NULL,
        overdrawn boolean NOT NULL);
     CREATE TABLE cash_balances (
        account_id bigint NOT NULL,
        currency text NOT NULL,
        available numeric NOT NULL,
        reserved numeric NOT NULL,
        -- Position in the account's list (the API lists balances in this order).
        ordinal smallint NOT NULL,
        PRIMARY KEY (account_id, currency));
     CREATE TABLE positions (
        account_id bigint NOT NULL,
        symbol text NOT NULL,
        quantity numeric NOT NULL,
        reserved_quantity numeric NOT NULL,
        cost_basis numeric NOT NULL,
        realized_pnl numeric NOT NULL,
        currency text NOT NULL,
        ordinal smallint NOT NULL,
        PRIMARY KEY (account_id, symbol));
     CREATE TABLE reservations (
        account_id bigint NOT NULL,
        order_id text NOT NULL,
        kind text NOT NULL,
        asset text NOT NULL,
        amount numeric NOT NULL,
        remaining numeric NOT NULL,
        consumed numeric NOT NULL,
        released numeric NOT NULL,
        state text NOT NULL,
        expires_at_ms bigint NOT NULL,
        sequence bigint NOT NULL,
        closed_at_ms bigint NOT NULL,
        closed_sequence bigint NOT NULL,
        PRIMARY KEY (account_id, order_id));
     -- Idempotency keys still in their window, in recording order: one row
     -- per batch of consecutive ring positions (format: key_batch.rs).
     CREATE TABLE idempotency_key_batches (
        first_position bigint PRIMARY KEY,
        last_position bigint NOT NULL,
        keys bytea NOT NULL);
     CREATE TABLE kafka_offsets (
        topic smallint NOT NULL,
        partition integer NOT NULL,
        \"offset\" bigint NOT NULL,
        PRIMARY KEY (topic, partition));
     CREATE TABLE snapshot_meta (
        id integer PRIMARY KEY CHECK (id = 1),
        sequence bigint NOT NULL,
        timestamp_ms bigint NOT NULL,
        keys_base bigint NOT NULL,
        -- Account events are published to Kafka up to here (NULL: Kafka off).
        outbox_watermark bigint,
        written_at timestamptz NOT NULL DEFAULT now());",
    ),
    (
        2,
        // The state machine's settings at the snapshot's sequence
        // (`Command::Configure`): replay goes on with them, whatever the
        // flags. The defaults are `StateConfig::default()`, for a row
        // written before this migration (nothing was deployed then).
        "ALTER TABLE snapshot_meta
            ADD COLUMN idempotency_window_ms bigint NOT NULL DEFAULT 86400000
                CHECK (idempotency_window_ms > 0),
            ADD COLUMN tick_work_max bigint NOT NULL DEFAULT 10000 CHECK (tick_work_max > 0);",
    ),
    (
        3,
        "-- The identity of the write-ahead log the snapshot was taken from (32 hex
         -- digits): a WAL of another deployment, or an empty data dir in front of
         -- this snapshot, is refused at start-up (NULL: written before log ids).
         ALTER TABLE snapshot_meta ADD COLUMN log_id text;",
    ),
    (
        4,
        "-- Every account event (design 4.2), written in the transaction of the
         -- snapshot whose sequence it is at or below: the movements behind the
         -- balances. Absent fields are NULL. Retention is the operator's.
         CREATE TABLE account_events (
            sequence bigint NOT NULL,
            event_index integer NOT NULL,
            event_id text NOT NULL,
            account_id bigint NOT NULL,
            type text NOT NULL,
            order_id text,
            asset text,
            amount numeric NOT NULL,
            available_after numeric NOT NULL,
            reserved_after numeric NOT NULL,
            cause_id text,
            reason text,
            \"timestamp\" bigint NOT NULL,
            PRIMARY KEY (sequence, event_index));
         -- One account's movements in time order.
         CREATE INDEX account_events_by_account ON account_events (account_id, sequence, event_index);",
    ),
    (
        5,
        "-- A replica group's snapshots: the raft term of the leader that wrote it
         -- (NULL: a single node). A deposed leader's snapshot of an older term is
         -- refused, so the tables never go back to a predecessor's view.
         ALTER TABLE snapshot_meta ADD COLUMN term bigint;",
    ),
];
