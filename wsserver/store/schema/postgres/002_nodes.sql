-- Version 2: the nodes that use this database, so that a node can tell it is
-- not alone (protocol section 11: nodes without a broker would miss each
-- other's live traffic).  A row is refreshed by its node's heartbeat, removed
-- at its clean shutdown, and counts as gone once its heartbeat is stale.
CREATE TABLE nodes (
    name          TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    has_broker    BOOLEAN NOT NULL,
    heartbeat_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
