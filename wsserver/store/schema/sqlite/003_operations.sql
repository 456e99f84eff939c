-- Version 3: retention, deleted users, account events (protocol sections 12, 14).

-- Retention deletes by age (created_ms) in small batches: this index lets each
-- batch find the oldest messages without scanning the table.
CREATE INDEX messages_created ON messages (created_ms);

-- A deleted user's id stays taken for good (register answers user_exists).
CREATE TABLE deleted_users (
    user_id     TEXT PRIMARY KEY,
    deleted_ms  INTEGER NOT NULL
);

-- Changes to accounts that every node must act on at once (a deleted user's
-- connections close with 4003).  Nodes poll it by id; AUTOINCREMENT so ids
-- only ever grow.  ``detail``: what the kind needs (for "deleted", the stream
-- head when the user was deleted).
CREATE TABLE account_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT,
    created_ms  INTEGER NOT NULL
);
CREATE INDEX account_events_created ON account_events (created_ms);
