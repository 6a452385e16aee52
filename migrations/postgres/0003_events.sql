-- One ordered change stream for every domain (API.md § Change stream) replaces the
-- documents-only change log, and durable consumers record how far they have read.
--
-- `position` comes from a sequence when the event is appended, so positions are taken in
-- insert order while transactions commit in another. Appending transactions hold a shared
-- advisory lock from before they take a position until they end, which lets readers deliver
-- positions in commit order (src/changes/tailer.rs). `xid` records the appending transaction.

CREATE SEQUENCE events_position_seq;

CREATE TABLE events (
    position    BIGINT PRIMARY KEY,
    xid         xid8 NOT NULL,
    topic       TEXT NOT NULL,
    key         TEXT NOT NULL,
    op          TEXT NOT NULL,
    actor_type  TEXT NOT NULL,
    actor_id    TEXT,
    time        TIMESTAMPTZ NOT NULL,
    data        JSONB,
    old_data    JSONB
);
CREATE INDEX events_time ON events (time);

INSERT INTO events (position, xid, topic, key, op, actor_type, actor_id, time, data, old_data)
    SELECT seq, pg_current_xact_id(), 'db/' || collection, id, op, 'system', 'migration', time,
           document, old_document
    FROM changes;
-- Continue past every position the old log handed out, even pruned ones.
SELECT setval('events_position_seq',
              GREATEST((SELECT last_value FROM changes_seq_seq),
                       (SELECT COALESCE(MAX(position), 0) FROM events), 1));
DROP TABLE changes;

CREATE TABLE consumers (
    name        TEXT PRIMARY KEY,
    position    BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
