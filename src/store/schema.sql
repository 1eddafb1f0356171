-- The orchestration store, schema version 1 (docs/orchestration.md 1.2); sqlite.rs's MIGRATIONS
-- take a new file, like an old one, on to the current version.
-- Each row keeps its whole record as JSON in `body` (the truth); the other columns are copies of
-- the fields rows are found, ordered and constrained by. Instants are INTEGER milliseconds since
-- the Unix epoch, backup days TEXT 'YYYYMMDD'.

CREATE TABLE ids (
    kind TEXT PRIMARY KEY,
    next INTEGER NOT NULL
) STRICT;

CREATE TABLE schedules (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
) STRICT;

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    schedule TEXT NOT NULL REFERENCES schedules(name),
    next_due INTEGER,
    body TEXT NOT NULL
) STRICT;

-- `job` is the job an occurrence started, NULL for the others.
CREATE TABLE occurrences (
    event INTEGER NOT NULL REFERENCES events(id),
    due_at INTEGER NOT NULL,
    backup_day TEXT NOT NULL,
    job INTEGER,
    body TEXT NOT NULL,
    PRIMARY KEY (event, due_at)
) STRICT;
CREATE INDEX occurrences_by_day ON occurrences(backup_day);
CREATE INDEX occurrences_by_due ON occurrences(due_at);

CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    event INTEGER NOT NULL REFERENCES events(id),
    due_at INTEGER NOT NULL,
    backup_day TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    plan TEXT,
    body TEXT NOT NULL
) STRICT;
CREATE INDEX jobs_by_state ON jobs(state);
CREATE INDEX jobs_by_day ON jobs(backup_day);

CREATE TABLE tasks (
    job INTEGER NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job, idx)
) STRICT;

-- `task` is -1 for the plan's stages.
CREATE TABLE hook_runs (
    job INTEGER NOT NULL REFERENCES jobs(id),
    attempt INTEGER NOT NULL,
    stage TEXT NOT NULL,
    task INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (job, attempt, stage, task)
) STRICT;

CREATE TABLE intents (
    id INTEGER PRIMARY KEY,
    job INTEGER NOT NULL REFERENCES jobs(id),
    open INTEGER NOT NULL,
    body TEXT NOT NULL
) STRICT;
CREATE INDEX intents_open ON intents(open);

CREATE TABLE leases (
    id INTEGER PRIMARY KEY,
    job INTEGER NOT NULL REFERENCES jobs(id),
    st_dev INTEGER NOT NULL UNIQUE,
    body TEXT NOT NULL
) STRICT;

CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    job INTEGER NOT NULL REFERENCES jobs(id),
    plan TEXT NOT NULL,
    backup_day TEXT NOT NULL,
    state TEXT NOT NULL,
    t0_unix_ms INTEGER NOT NULL,
    source TEXT NOT NULL,
    body TEXT NOT NULL
) STRICT;
CREATE INDEX images_by_plan ON images(plan, source);
