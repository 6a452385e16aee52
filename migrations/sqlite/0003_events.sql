-- One ordered change stream for every domain (API.md § Change stream) replaces the
-- documents-only change log, and durable consumers record how far they have read.
-- AUTOINCREMENT: a position is never handed out twice, even after the newest events are
-- pruned. SQLite's single writer commits in position order.

CREATE TABLE events (
    position    INTEGER PRIMARY KEY AUTOINCREMENT,
    topic       TEXT NOT NULL,
    key         TEXT NOT NULL,
    op          TEXT NOT NULL,
    actor_type  TEXT NOT NULL,
    actor_id    TEXT,
    time        TEXT NOT NULL,
    data        TEXT,
    old_data    TEXT
);
CREATE INDEX events_time ON events (time);

INSERT INTO events (position, topic, key, op, actor_type, actor_id, time, data, old_data)
    SELECT seq, 'db/' || collection, id, op, 'system', 'migration', time, document, old_document
    FROM changes ORDER BY seq;
-- Continue past every position the old log handed out, even pruned ones.
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'events', COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0)
    WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'events');
UPDATE sqlite_sequence
    SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0))
    WHERE name = 'events';
DROP TABLE changes;

CREATE TABLE consumers (
    name        TEXT PRIMARY KEY,
    position    INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
