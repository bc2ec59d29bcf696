-- The seed's Reserve: one PostgreSQL transaction per request.
\set acct random(1, :accounts)
\set n random(1, 2000000000)
BEGIN;
SELECT result FROM request_history WHERE request_id = 'r' || :client_id || '-' || :n;
SELECT available FROM accounts WHERE account_id = :acct FOR UPDATE;
UPDATE accounts SET available = available - 1.00, reserved = reserved + 1.00
    WHERE account_id = :acct AND available >= 1.00;
INSERT INTO reserves (request_id, account_id, order_id, amount)
    VALUES ('r' || :client_id || '-' || :n, :acct, 'o' || :client_id || '-' || :n, 1.00)
    ON CONFLICT DO NOTHING;
INSERT INTO request_history (request_id, result)
    VALUES ('r' || :client_id || '-' || :n, 'OK') ON CONFLICT DO NOTHING;
INSERT INTO outbox (topic, key, payload)
    VALUES ('trading.account.events', :acct::text, 'reserved ' || :n);
COMMIT;
