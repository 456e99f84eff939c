-- Version 2: idempotent sends, broadcast recipient counts, fast look-ups of
-- pending messages and of a user's challenges.

ALTER TABLE messages ADD COLUMN recipients INTEGER;

-- A nonce identifies one message of its sender.  Version 1 did not enforce
-- that; keep the first message of any repeated (sender, nonce) as the owner.
UPDATE messages SET nonce = NULL
 WHERE nonce IS NOT NULL
   AND id NOT IN (SELECT MIN(id) FROM messages WHERE nonce IS NOT NULL
                   GROUP BY sender, nonce);

CREATE UNIQUE INDEX messages_sender_nonce ON messages (sender, nonce)
    WHERE nonce IS NOT NULL;

CREATE INDEX messages_pending ON messages (recipient, id)
    WHERE status = 'pending';

CREATE INDEX challenges_user ON challenges (user_id);
CREATE INDEX challenges_expiry ON challenges (expires_ms);
