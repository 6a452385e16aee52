-- Documents, their collections, and the change log every document write appends to.
-- Ids compare in "C" collation so order and cursors match SQLite's byte order.

CREATE TABLE collections (
    name        TEXT PRIMARY KEY,
    rules       JSONB NOT NULL DEFAULT '{}',
    indexes     JSONB NOT NULL DEFAULT '[]',
    schema      JSONB,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE documents (
    collection  TEXT NOT NULL,
    id          TEXT COLLATE "C" NOT NULL,
    data        JSONB NOT NULL,
    version     BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (collection, id)
);

CREATE TABLE changes (
    seq           BIGSERIAL PRIMARY KEY,
    collection    TEXT NOT NULL,
    id            TEXT NOT NULL,
    op            TEXT NOT NULL,
    version       BIGINT NOT NULL,
    document      JSONB,
    old_document  JSONB,
    time          TIMESTAMPTZ NOT NULL
);
CREATE INDEX changes_time ON changes (time);
