-- Documents, their collections, and the change log every document write appends to.

CREATE TABLE collections (
    name        TEXT PRIMARY KEY,
    rules       TEXT NOT NULL DEFAULT '{}',
    indexes     TEXT NOT NULL DEFAULT '[]',
    schema      TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE documents (
    collection  TEXT NOT NULL,
    id          TEXT NOT NULL,
    data        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (collection, id)
);

CREATE TABLE changes (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    collection    TEXT NOT NULL,
    id            TEXT NOT NULL,
    op            TEXT NOT NULL,
    version       INTEGER NOT NULL,
    document      TEXT,
    old_document  TEXT,
    time          TEXT NOT NULL
);
CREATE INDEX changes_time ON changes (time);
