-- Version 1: users, the JWT secret, login challenges, messages and the
-- stream head that hands out message ids in commit order.
CREATE TABLE users (
    user_id     TEXT PRIMARY KEY,
    username    TEXT NOT NULL,
    public_key  BYTEA NOT NULL,
    created_ms  BIGINT NOT NULL
);

CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  BYTEA NOT NULL
);

-- Newest first is seq order.
CREATE TABLE challenges (
    seq         BIGSERIAL PRIMARY KEY,
    challenge   TEXT NOT NULL UNIQUE,
    user_id     TEXT NOT NULL,
    expires_ms  BIGINT NOT NULL
);
CREATE INDEX challenges_user ON challenges (user_id);
CREATE INDEX challenges_expiry ON challenges (expires_ms);

-- Ids are not a sequence: each batch takes the next ones from stream_head
-- under its row lock, inside its transaction, so commit order is id order.
CREATE TABLE messages (
    id            BIGINT PRIMARY KEY,
    sender        TEXT NOT NULL,
    recipient     TEXT NOT NULL,
    content       TEXT NOT NULL,
    signature     BYTEA,
    nonce         TEXT,
    verification  TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending',
    created_ms    BIGINT NOT NULL,
    recipients    INTEGER
);
CREATE INDEX messages_recipient ON messages (recipient, id);
CREATE UNIQUE INDEX messages_sender_nonce ON messages (sender, nonce)
    WHERE nonce IS NOT NULL;
CREATE INDEX messages_pending ON messages (recipient, id)
    WHERE status = 'pending';

-- One row: the largest id handed out.
CREATE TABLE stream_head (
    one      BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    last_id  BIGINT NOT NULL
);
INSERT INTO stream_head (one, last_id) VALUES (TRUE, 0);
