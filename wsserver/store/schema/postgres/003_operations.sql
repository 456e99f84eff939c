-- Version 3: retention, deleted users, account events (protocol sections 12, 14).

-- Retention deletes by age (created_ms) in small batches: this index lets each
-- batch find the oldest messages without scanning the table.
CREATE INDEX messages_created ON messages (created_ms);

-- A deleted user's id stays taken for good (register answers user_exists).
CREATE TABLE deleted_users (
    user_id     TEXT PRIMARY KEY,
    deleted_ms  BIGINT NOT NULL
);

-- Changes to accounts that every node must act on at once (a deleted user's
-- connections close with 4003).  Nodes poll it by id.  Writers take an
-- EXCLUSIVE lock on the table before inserting, so ids are committed in id
-- order and a poller reading "id > last seen" never skips one.  ``detail``:
-- what the kind needs (for "deleted", the stream head when the user was deleted).
CREATE TABLE account_events (
    id          BIGSERIAL PRIMARY KEY,
    user_id     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT,
    created_ms  BIGINT NOT NULL
);
CREATE INDEX account_events_created ON account_events (created_ms);
