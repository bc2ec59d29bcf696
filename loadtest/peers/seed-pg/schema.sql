CREATE TABLE accounts (account_id bigint PRIMARY KEY, available numeric NOT NULL, reserved numeric NOT NULL);
CREATE TABLE reserves (request_id text PRIMARY KEY, account_id bigint NOT NULL, order_id text NOT NULL,
                       amount numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE request_history (request_id text PRIMARY KEY, result text NOT NULL,
                              created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE outbox (id bigserial PRIMARY KEY, topic text NOT NULL, key text NOT NULL, payload text NOT NULL);
INSERT INTO accounts SELECT g, 1000000000, 0 FROM generate_series(1, :accounts) g;
