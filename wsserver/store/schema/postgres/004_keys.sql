-- Version 4: keys per device, the key log, sign-out (protocol section 12),
-- and the key that signed each message.

-- The key log: one row per entry, oldest first by seq.  The primary key is
-- what makes two racing appends of one seq impossible: the second insert
-- fails, and the store answers keylog_conflict.  (Appends of one user also
-- lock the user's row first, SELECT ... FOR UPDATE, so on every node they
-- run one after the other and the second sees the first's entry.)
-- ``by_key`` is the entry's ``by`` (the signing key's key_id; NULL for
-- entry 0, as are the signatures).
CREATE TABLE key_log (
    user_id        TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    action         TEXT NOT NULL,
    public_key     BYTEA NOT NULL,
    name           TEXT,
    at_ms          BIGINT NOT NULL,
    by_key         TEXT,
    signature      BYTEA,
    key_signature  BYTEA,
    PRIMARY KEY (user_id, seq)
);

-- The active keys, a projection of the key log written in the same
-- transaction as each entry (a revoke deletes the row): a token check or a
-- login reads at most MAX_KEYS_PER_USER rows, however long the log grows.
-- ``seq``: the entry that added the key (the order keys are listed in).
-- key_ids are computed from public_key where needed (SHA-256 is not SQL).
CREATE TABLE user_keys (
    user_id     TEXT NOT NULL,
    public_key  BYTEA NOT NULL,
    seq         INTEGER NOT NULL,
    name        TEXT,
    added_ms    BIGINT NOT NULL,
    PRIMARY KEY (user_id, public_key)
);

-- POST /auth/logout?all=true raises it; tokens of a lower generation are refused.
ALTER TABLE users ADD COLUMN token_gen INTEGER NOT NULL DEFAULT 0;

-- Signed-out tokens (POST /auth/logout), kept until they expire.
CREATE TABLE revoked_tokens (
    jti         TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    expires_ms  BIGINT NOT NULL
);
CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_ms);
CREATE INDEX revoked_tokens_user ON revoked_tokens (user_id);

-- Whether a deletion's message phase finished: the tombstone is written
-- with the account's removal, the messages go afterwards in short
-- transactions, and ``purged`` is set once none is left.  Every node finishes
-- the deletions left unfinished (a failed page, a process stopped half-way)
-- at start and every ``PURGE_INTERVAL`` seconds.  Tombstones of before this
-- version start unfinished, so a delete-user that failed half-way under
-- version 3 is finished too (each reads the messages table once, in slices).
ALTER TABLE deleted_users ADD COLUMN purged BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX deleted_users_unpurged ON deleted_users (user_id) WHERE NOT purged;

-- There is no index on messages (sender): it would cost every message's
-- insert (about a third more on SQLite) for the sake of a rare deletion.  A
-- deletion finds the messages a user sent by reading the table a slice of
-- ids at a time (by primary key), and those sent to them through
-- messages_recipient.

-- The key that signed a message (NULL when unsigned, and for every message
-- stored before this version).
ALTER TABLE messages ADD COLUMN key_id TEXT;

-- Every existing user's registration becomes entry 0 of their key log, and
-- their one key their one active key, so a version-3 database keeps working.
INSERT INTO key_log (user_id, seq, action, public_key, name, at_ms)
    SELECT user_id, 0, 'register', public_key, NULL, created_ms FROM users;
INSERT INTO user_keys (user_id, public_key, seq, name, added_ms)
    SELECT user_id, public_key, 0, NULL, created_ms FROM users;
