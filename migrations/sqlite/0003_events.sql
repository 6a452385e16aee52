-- One ordered change stream for every domain (API.md § Change stream) replaces the
-- documents-only change log, and durable consumers record how far they have read.
-- AUTOINCREMENT: a position is never handed out twice, even after pruning the newest events.

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
CREATE INDEX events_topic ON events (topic, position);

INSERT INTO events (position, topic, key, op, actor_type, actor_id, time, data, old_data)
    SELECT seq, 'db/' || collection, id, op, 'system', NULL, time, document, old_document
    FROM changes ORDER BY seq;
-- Keep AUTOINCREMENT past every position the old log handed out.
INSERT OR REPLACE INTO sqlite_sequence (name, seq)
    SELECT 'events', MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0),
                         COALESCE((SELECT MAX(position) FROM events), 0));
DROP TABLE changes;

CREATE TABLE consumers (
    name        TEXT PRIMARY KEY,
    position    INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
