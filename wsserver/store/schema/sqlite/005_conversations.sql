-- Version 5: history, conversations, groups, read receipts (protocol
-- section 13).  The measurements behind this model are in
-- docs/architecture.md ("History and groups: the data model, measured").

-- The conversation of a direct message: the two user ids sorted (bytewise,
-- as Python's str order) and joined by one space; a note to self is "u u".
-- NULL for broadcasts and group messages, whose pages are ranges of
-- messages_recipient already.  The partial index keeps a page of any direct
-- conversation one backward range scan that stops after the page, however
-- large the table grows (T10).
ALTER TABLE messages ADD COLUMN conv TEXT;
UPDATE messages SET conv = CASE WHEN sender <= recipient
        THEN sender || ' ' || recipient ELSE recipient || ' ' || sender END
    WHERE recipient <> 'broadcast' AND recipient NOT LIKE '#%';
CREATE INDEX messages_conv ON messages (conv, id) WHERE conv IS NOT NULL;

-- Who has a direct conversation with whom: a row per user and peer (both
-- directions; one row for notes to self), written only when a conversation
-- is new (the store remembers the pairs it wrote), never per message.
-- GET /conversations reads the newest id of each from messages_conv.
CREATE TABLE conversations (
    user_id  TEXT NOT NULL,
    peer     TEXT NOT NULL,
    PRIMARY KEY (user_id, peer)
);
INSERT OR IGNORE INTO conversations (user_id, peer)
    SELECT sender, recipient FROM messages WHERE conv IS NOT NULL;
INSERT OR IGNORE INTO conversations (user_id, peer)
    SELECT recipient, sender FROM messages WHERE conv IS NOT NULL;

-- Groups.  group_id is '#' and 1 to 64 characters of the user id alphabet.
CREATE TABLE chat_groups (
    group_id    TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    owner       TEXT NOT NULL,
    created_ms  INTEGER NOT NULL
);

-- A member's window on the group's messages, by message id: a member sees
-- the group's messages with joined_id < id (joined_id: the stream head when
-- they were added) and, once removed, id <= removed_id (the row stays, so
-- their history stops at the removal; removed_id is NULL while a member).
-- delivered_id is the member's delivery cursor: every group message with an
-- id up to it was handed to one of their connections; the ones above it
-- (inside the window) are pending for them.  A group message is stored once
-- (recipient = the group id): no row per member per message.
CREATE TABLE group_members (
    group_id      TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    joined_id     INTEGER NOT NULL,
    removed_id    INTEGER,
    delivered_id  INTEGER NOT NULL,
    added_ms      INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_user ON group_members (user_id, group_id);

-- Read receipts: at most one per message and reader.
CREATE TABLE message_reads (
    message_id  INTEGER NOT NULL,
    user_id     TEXT NOT NULL,
    read_ms     INTEGER NOT NULL,
    PRIMARY KEY (message_id, user_id)
);
