-- Version 1: users, the JWT secret, login challenges and messages.
CREATE TABLE users (
    user_id     TEXT PRIMARY KEY,
    username    TEXT NOT NULL,
    public_key  BLOB NOT NULL,
    created_ms  INTEGER NOT NULL
);

CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  BLOB NOT NULL
);

-- Newest first is rowid order.
CREATE TABLE challenges (
    challenge   TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    expires_ms  INTEGER NOT NULL
);

-- AUTOINCREMENT: ids only ever grow, even if rows were removed.
CREATE TABLE messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    sender        TEXT NOT NULL,
    recipient     TEXT NOT NULL,
    content       TEXT NOT NULL,
    signature     BLOB,
    nonce         TEXT,
    verification  TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending',
    created_ms    INTEGER NOT NULL
);

CREATE INDEX messages_recipient ON messages (recipient, id);
