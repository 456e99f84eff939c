-- Version 6: who wrote to whom (presence contacts, docs/protocol.md section
-- 15 "Presence").  A conversations row (user_id, peer) has wrote = TRUE once
-- user_id sent peer a direct message (a note to self: its one row); the
-- other direction's row may exist with wrote = FALSE (peer only received).
-- Under PRESENCE=contacts, peer may watch user_id only if wrote (or they
-- share a group): one primary-key probe per watched user.  Kept at insert
-- time, as the rows themselves are (the store remembers the directed pairs
-- it wrote).
ALTER TABLE conversations ADD COLUMN wrote BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE conversations SET wrote = TRUE WHERE EXISTS (
    SELECT 1 FROM messages m
    WHERE m.conv = CASE WHEN conversations.user_id COLLATE "C" <= conversations.peer COLLATE "C"
        THEN conversations.user_id || ' ' || conversations.peer
        ELSE conversations.peer || ' ' || conversations.user_id END
    AND m.sender = conversations.user_id
);
-- A pair whose messages are all gone (retention, a deletion's) kept its
-- rows: who wrote can no longer be told, so both keep the rule of version
-- 5 (each may see the other) rather than lose each other's presence.
UPDATE conversations SET wrote = TRUE WHERE NOT EXISTS (
    SELECT 1 FROM messages m
    WHERE m.conv = CASE WHEN conversations.user_id COLLATE "C" <= conversations.peer COLLATE "C"
        THEN conversations.user_id || ' ' || conversations.peer
        ELSE conversations.peer || ' ' || conversations.user_id END
);
