//! [`SqliteStore`]: the store in one SQLite file (section 1.2).
//!
//! The file is opened with `journal_mode=WAL` (readers in other processes never block the
//! writer, nor it them), `synchronous=FULL` (a commit that returned survives kill -9 and power
//! loss), `foreign_keys=ON` and a busy timeout ([`STORE_BUSY_TIMEOUT_MS`]). Every
//! [`Store::commit`] and [`Store::allocate`] is one `BEGIN IMMEDIATE` transaction: it takes the
//! write lock before it reads, so the preconditions it checks still hold when it writes, also
//! against another process. The schema (`schema.sql`) is created by the first open; its version
//! is `PRAGMA user_version`.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use parking_lot::Mutex;
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::change::{apply, Change, ImageQuery, JobQuery, OccurrenceQuery, Tx};
use super::ms::to_ms;
use super::records::{
    EventRow, HookRunKey, HookRunRecord, ImageRecord, Intent, JobRecord, Lease, OccurrenceOutcome,
    OccurrenceRow, ScheduleRow, TaskRecord,
};
use super::{
    BackupDay, EventId, IdKind, ImageId, IntentId, JobId, LeaseId, Store, StoreError, Trimmed,
};
use crate::limits::STORE_BUSY_TIMEOUT_MS;

/// The schema version this build creates and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 3;

/// Version 1, as the first open creates it; [`MIGRATIONS`] take it to [`SCHEMA_VERSION`].
const SCHEMA: &str = include_str!("schema.sql");

/// Each later version and the statements that make it from the one before, run in the
/// transaction of the open that finds the older version.
/// - 2: the job's plan SHA-256 (PLAN-18) as a column of its own, copied from the rows written
///   before, so that the jobs of one plan text can be found.
/// - 3: an index on the events' `next_due`, so that [`Store::events_due_by`] (every scheduler
///   pass) reads the due events only instead of scanning every event row.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        2,
        "ALTER TABLE jobs ADD COLUMN plan_sha256 TEXT;\n\
         UPDATE jobs SET plan_sha256 = json_extract(body, '$.plan_sha256');\n\
         CREATE INDEX jobs_by_plan_sha256 ON jobs(plan_sha256);",
    ),
    (3, "CREATE INDEX events_by_next_due ON events(next_due);"),
];
const _: () = assert!(MIGRATIONS[MIGRATIONS.len() - 1].0 == SCHEMA_VERSION);

/// The store in one SQLite file; one connection, used by one thread at a time. Other processes
/// (`timezero jobs`, a second daemon refused by its lock) open the same file with their own
/// [`SqliteStore`].
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl SqliteStore {
    /// Open the store at `path`, creating the file and its schema when they do not exist.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] when the file cannot be opened or set up (WAL refused, schema not
    /// created), [`StoreError::Schema`] when its schema version is newer than
    /// [`SCHEMA_VERSION`].
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let err = |op: &'static str| {
            let path = path.clone();
            move |source| StoreError::Sqlite { op, path, source }
        };
        let conn = Connection::open(&path).map_err(err("open"))?;
        conn.busy_timeout(std::time::Duration::from_millis(STORE_BUSY_TIMEOUT_MS))
            .map_err(err("set busy timeout"))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(err("set journal_mode=WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Sqlite {
                op: "set journal_mode=WAL",
                path,
                source: rusqlite::Error::InvalidParameterName(format!(
                    "the journal mode stayed {mode}"
                )),
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err("set synchronous=FULL"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err("set foreign_keys=ON"))?;
        let mut store = SqliteStore {
            conn: Mutex::new(conn),
            path,
        };
        store.migrate()?;
        Ok(store)
    }

    /// The file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// Create the schema in an empty file (under the write lock, so two first opens create it
    /// once) and refuse a version this build does not read.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |op: &'static str| {
            let path = path.clone();
            move |source| StoreError::Sqlite { op, path, source }
        };
        let conn = self.conn.get_mut();
        // The usual case, without the write lock: a reader opens while a writer works.
        let found: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err("read the schema version"))?;
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err("begin the schema transaction"))?;
        let found: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err("read the schema version"))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::Schema {
                path,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        let mut at = found;
        if at == 0 {
            tx.execute_batch(SCHEMA).map_err(err("create the schema"))?;
            at = 1;
        }
        for (version, sql) in MIGRATIONS {
            if *version > at {
                tx.execute_batch(sql)
                    .map_err(err("migrate the schema to a later version"))?;
                at = *version;
            }
        }
        if at != found {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(err("set the schema version"))?;
        }
        tx.commit().map_err(err("commit the schema"))
    }

    /// Rows of `table` (its `body` column) matching `conds`, in `order`, decoded.
    fn select<T: DeserializeOwned>(
        &self,
        table: &'static str,
        conds: &[(&str, Value)],
        order: &str,
    ) -> Result<Vec<T>, StoreError> {
        let mut sql = format!("SELECT body FROM {table}");
        for (i, (c, _)) in conds.iter().enumerate() {
            sql.push_str(if i == 0 { " WHERE " } else { " AND " });
            sql.push_str(c);
        }
        sql.push_str(" ORDER BY ");
        sql.push_str(order);
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare_cached(&sql)
            .map_err(self.err("prepare a query"))?;
        let rows = stmt
            .query_map(
                rusqlite::params_from_iter(conds.iter().map(|(_, v)| v)),
                |r| r.get::<_, String>(0),
            )
            .map_err(self.err("query"))?;
        let mut out = Vec::new();
        for body in rows {
            out.push(decode(table, &body.map_err(self.err("read a row"))?)?);
        }
        Ok(out)
    }
}

fn decode<T: DeserializeOwned>(table: &str, body: &str) -> Result<T, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt {
        what: format!("{table}: {e}: {body}"),
    })
}

fn encode<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt {
        what: format!("a record does not encode: {e}"),
    })
}

/// The row of the `ids` table that counts the calendar's generation
/// ([`Store::calendar_generation`]).
const CALENDAR_GENERATION: &str = "calendar_generation";

/// Move the calendar generation on by one inside `tx`.
fn bump_generation(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO ids (kind, next) VALUES (?1, 1) \
         ON CONFLICT (kind) DO UPDATE SET next = next + 1",
        params![CALENDAR_GENERATION],
    )
}

/// A u64 kept in an INTEGER column: the same 64 bits (ids and device numbers are compared for
/// equality only).
fn int(u: u64) -> i64 {
    i64::from_ne_bytes(u.to_ne_bytes())
}

/// A task index for the `hook_runs.task` column, -1 for none.
fn task_col(task: Option<u32>) -> i64 {
    task.map_or(-1, i64::from)
}

impl Store for SqliteStore {
    fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        let calendar = changes.iter().any(Change::writes_calendar);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err("begin"))?;
        {
            let mut stx = SqlTx {
                tx: &tx,
                path: &self.path,
            };
            for (i, c) in changes.into_iter().enumerate() {
                apply(&mut stx, i, c)?;
            }
        }
        if calendar {
            bump_generation(&tx).map_err(self.err("move the calendar generation on"))?;
        }
        tx.commit().map_err(self.err("commit"))
    }

    fn allocate_many(&self, kind: IdKind, n: usize) -> Result<Vec<u64>, StoreError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let count = i64::try_from(n).map_err(|_| StoreError::Invalid {
            change: 0,
            what: format!("{n} ids of kind {} at once", kind.as_str()),
        })?;
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err("begin"))?;
        let last: i64 = tx
            .query_row(
                "INSERT INTO ids (kind, next) VALUES (?1, ?2) \
                 ON CONFLICT (kind) DO UPDATE SET next = next + ?2 RETURNING next",
                params![kind.as_str(), count],
                |r| r.get(0),
            )
            .map_err(self.err("allocate ids"))?;
        tx.commit().map_err(self.err("commit"))?;
        let corrupt = || StoreError::Corrupt {
            what: format!("ids: the {} counter is {last}", kind.as_str()),
        };
        let last = u64::try_from(last).map_err(|_| corrupt())?;
        let first = last
            .checked_sub(u64::try_from(n).map_err(|_| corrupt())?)
            .ok_or_else(corrupt)?;
        Ok((first + 1..=last).collect())
    }

    fn calendar_generation(&self) -> Result<u64, StoreError> {
        let conn = self.conn.lock();
        let n: Option<i64> = conn
            .query_row(
                "SELECT next FROM ids WHERE kind = ?1",
                params![CALENDAR_GENERATION],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err("read the calendar generation"))?;
        u64::try_from(n.unwrap_or(0)).map_err(|_| StoreError::Corrupt {
            what: format!("ids: the calendar generation is {n:?}"),
        })
    }

    fn next_id(&self, kind: IdKind) -> Result<u64, StoreError> {
        let conn = self.conn.lock();
        let last = read_counter(&conn, kind).map_err(self.err("read an id counter"))??;
        last.checked_add(1).ok_or_else(|| StoreError::Corrupt {
            what: format!("ids: the {} counter is {last}", kind.as_str()),
        })
    }

    fn allocate(&self, kind: IdKind) -> Result<u64, StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err("begin"))?;
        let next: i64 = tx
            .query_row(
                "INSERT INTO ids (kind, next) VALUES (?1, 1) \
                 ON CONFLICT (kind) DO UPDATE SET next = next + 1 RETURNING next",
                params![kind.as_str()],
                |r| r.get(0),
            )
            .map_err(self.err("allocate an id"))?;
        tx.commit().map_err(self.err("commit"))?;
        u64::try_from(next).map_err(|_| StoreError::Corrupt {
            what: format!("ids: the {} counter is {next}", kind.as_str()),
        })
    }

    fn jobs(&self, q: &JobQuery) -> Result<Vec<JobRecord>, StoreError> {
        let mut conds: Vec<(&str, Value)> = Vec::new();
        if let Some(e) = q.event {
            conds.push(("event = ?", Value::Integer(int(e.0))));
        }
        if let Some(d) = q.backup_day {
            conds.push(("backup_day = ?", Value::Text(d.to_string())));
        }
        if let Some(p) = &q.plan {
            conds.push(("plan = ?", Value::Text(p.clone())));
        }
        if let Some(states) = &q.states {
            // Rows of other states are not decoded: `,queued,active,` holds `,state,`.
            let list: String = states.iter().map(|k| format!(",{}", k.as_str())).collect();
            conds.push((
                "instr(?, ',' || state || ',') > 0",
                Value::Text(format!("{list},")),
            ));
        }
        let jobs: Vec<JobRecord> = self.select("jobs", &conds, "id")?;
        Ok(jobs.into_iter().filter(|j| q.matches(j)).collect())
    }

    fn job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self
            .select("jobs", &[("id = ?", Value::Integer(int(id.0)))], "id")?
            .pop())
    }

    fn tasks(&self, job: JobId) -> Result<Vec<TaskRecord>, StoreError> {
        self.select("tasks", &[("job = ?", Value::Integer(int(job.0)))], "idx")
    }

    fn hook_runs(&self, job: JobId) -> Result<Vec<HookRunRecord>, StoreError> {
        self.select(
            "hook_runs",
            &[("job = ?", Value::Integer(int(job.0)))],
            "rowid",
        )
    }

    fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        self.select("schedules", &[], "name")
    }

    fn events(&self) -> Result<Vec<EventRow>, StoreError> {
        self.select("events", &[], "id")
    }

    fn events_due_by(&self, t: Timestamp) -> Result<Vec<EventRow>, StoreError> {
        self.select(
            "events",
            &[(
                "next_due IS NOT NULL AND next_due <= ?",
                Value::Integer(to_ms(t)),
            )],
            "id",
        )
    }

    fn occurrences(&self, q: &OccurrenceQuery) -> Result<Vec<OccurrenceRow>, StoreError> {
        let mut conds: Vec<(&str, Value)> = Vec::new();
        if let Some(d) = q.backup_day {
            conds.push(("backup_day = ?", Value::Text(d.to_string())));
        }
        if let Some(e) = q.event {
            conds.push(("event = ?", Value::Integer(int(e.0))));
        }
        if let Some(t) = q.due_from {
            conds.push(("due_at >= ?", Value::Integer(to_ms(t))));
        }
        if let Some(t) = q.due_before {
            conds.push(("due_at < ?", Value::Integer(to_ms(t))));
        }
        let rows: Vec<OccurrenceRow> = self.select("occurrences", &conds, "due_at, event")?;
        Ok(rows.into_iter().filter(|o| q.matches(o)).collect())
    }

    fn images(&self, q: &ImageQuery) -> Result<Vec<ImageRecord>, StoreError> {
        let mut conds: Vec<(&str, Value)> = Vec::new();
        if let Some(p) = &q.plan {
            conds.push(("plan = ?", Value::Text(p.clone())));
        }
        if let Some(s) = &q.source {
            conds.push(("source = ?", Value::Text(s.clone())));
        }
        if let Some(d) = q.backup_day {
            conds.push(("backup_day = ?", Value::Text(d.to_string())));
        }
        if let Some(j) = q.job {
            conds.push(("job = ?", Value::Integer(int(j.0))));
        }
        let rows: Vec<ImageRecord> = self.select("images", &conds, "t0_unix_ms, id")?;
        Ok(rows.into_iter().filter(|i| q.matches(i)).collect())
    }

    fn image(&self, id: ImageId) -> Result<Option<ImageRecord>, StoreError> {
        Ok(self
            .select("images", &[("id = ?", Value::Integer(int(id.0)))], "id")?
            .pop())
    }

    fn open_intents(&self) -> Result<Vec<Intent>, StoreError> {
        self.select("intents", &[("open = ?", Value::Integer(1))], "id")
    }

    fn open_leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.select("leases", &[], "id")
    }

    fn trim_history(&self, before: BackupDay) -> Result<Trimmed, StoreError> {
        // The ended jobs of earlier days that nothing refers to any more.
        const GONE: &str = "SELECT id FROM jobs WHERE backup_day < ?1 \
             AND state IN ('done', 'canceled') \
             AND id NOT IN (SELECT job FROM images) \
             AND id NOT IN (SELECT job FROM intents WHERE open = 1) \
             AND id NOT IN (SELECT job FROM leases)";
        let day = before.to_string();
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err("begin"))?;
        let del = |what: &str| -> Result<usize, StoreError> {
            tx.execute(&format!("DELETE FROM {what} IN ({GONE})"), [&day])
                .map_err(self.err("trim history"))
        };
        del("tasks WHERE job")?;
        del("hook_runs WHERE job")?;
        del("intents WHERE job")?;
        let jobs = del("jobs WHERE id")?;
        let occurrences = tx
            .execute(
                "DELETE FROM occurrences WHERE backup_day < ?1 \
                 AND (job IS NULL OR job NOT IN (SELECT id FROM jobs))",
                [&day],
            )
            .map_err(self.err("trim history"))?;
        if occurrences > 0 {
            bump_generation(&tx).map_err(self.err("move the calendar generation on"))?;
        }
        tx.commit().map_err(self.err("commit"))?;
        conn.execute_batch("PRAGMA optimize")
            .map_err(self.err("optimize"))?;
        Ok(Trimmed { jobs, occurrences })
    }
}

/// [`Tx`] over an open `BEGIN IMMEDIATE` transaction.
struct SqlTx<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    path: &'a Path,
}

impl SqlTx<'_> {
    fn err(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            op,
            path: self.path.to_path_buf(),
            source,
        }
    }

    fn one<T: DeserializeOwned>(
        &self,
        table: &'static str,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Option<T>, StoreError> {
        let body: Option<String> = self
            .tx
            .prepare_cached(sql)
            .map_err(self.err("prepare a read"))?
            .query_row(params, |r| r.get(0))
            .optional()
            .map_err(self.err("read a row"))?;
        body.map(|b| decode(table, &b)).transpose()
    }

    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> Result<(), StoreError> {
        let n = self
            .tx
            .prepare_cached(sql)
            .map_err(self.err("prepare a write"))?
            .execute(params)
            .map_err(self.err("write a row"))?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::Corrupt {
                what: format!("{n} rows written where one was expected: {sql}"),
            })
        }
    }
}

impl Tx for SqlTx<'_> {
    fn job(&mut self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.one("jobs", "SELECT body FROM jobs WHERE id = ?1", [int(id.0)])
    }

    fn put_job(&mut self, j: &JobRecord, insert: bool) -> Result<(), StoreError> {
        let body = encode(j)?;
        let p = params![
            int(j.id.0),
            int(j.event.0),
            to_ms(j.due_at),
            j.backup_day.to_string(),
            j.state.kind().as_str(),
            i64::from(j.attempt),
            j.kind.plan(),
            body,
            j.plan_sha256
                .map(|h| h.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        ];
        if insert {
            self.exec(
                "INSERT INTO jobs (id, event, due_at, backup_day, state, attempt, plan, body, \
                 plan_sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                p,
            )
        } else {
            self.exec(
                "UPDATE jobs SET event = ?2, due_at = ?3, backup_day = ?4, state = ?5, \
                 attempt = ?6, plan = ?7, body = ?8, plan_sha256 = ?9 WHERE id = ?1",
                p,
            )
        }
    }

    fn task(&mut self, job: JobId, index: u32) -> Result<Option<TaskRecord>, StoreError> {
        self.one(
            "tasks",
            "SELECT body FROM tasks WHERE job = ?1 AND idx = ?2",
            params![int(job.0), i64::from(index)],
        )
    }

    fn put_task(&mut self, t: &TaskRecord, insert: bool) -> Result<(), StoreError> {
        let p = params![int(t.job.0), i64::from(t.index), encode(t)?];
        if insert {
            self.exec("INSERT INTO tasks (job, idx, body) VALUES (?1, ?2, ?3)", p)
        } else {
            self.exec("UPDATE tasks SET body = ?3 WHERE job = ?1 AND idx = ?2", p)
        }
    }

    fn hook_run(&mut self, k: &HookRunKey) -> Result<Option<HookRunRecord>, StoreError> {
        self.one(
            "hook_runs",
            "SELECT body FROM hook_runs WHERE job = ?1 AND attempt = ?2 AND stage = ?3 \
             AND task = ?4",
            params![
                int(k.job.0),
                i64::from(k.attempt),
                k.stage.as_str(),
                task_col(k.task)
            ],
        )
    }

    fn put_hook_run(&mut self, r: &HookRunRecord, insert: bool) -> Result<(), StoreError> {
        let k = r.key;
        let p = params![
            int(k.job.0),
            i64::from(k.attempt),
            k.stage.as_str(),
            task_col(k.task),
            encode(r)?
        ];
        if insert {
            self.exec(
                "INSERT INTO hook_runs (job, attempt, stage, task, body) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                p,
            )
        } else {
            self.exec(
                "UPDATE hook_runs SET body = ?5 WHERE job = ?1 AND attempt = ?2 AND stage = ?3 \
                 AND task = ?4",
                p,
            )
        }
    }

    fn intent(&mut self, id: IntentId) -> Result<Option<Intent>, StoreError> {
        self.one(
            "intents",
            "SELECT body FROM intents WHERE id = ?1",
            [int(id.0)],
        )
    }

    fn put_intent(&mut self, i: &Intent, insert: bool) -> Result<(), StoreError> {
        let p = params![
            int(i.id.0),
            int(i.job.0),
            i64::from(i.outcome.is_none()),
            encode(i)?
        ];
        if insert {
            self.exec(
                "INSERT INTO intents (id, job, open, body) VALUES (?1, ?2, ?3, ?4)",
                p,
            )
        } else {
            self.exec(
                "UPDATE intents SET job = ?2, open = ?3, body = ?4 WHERE id = ?1",
                p,
            )
        }
    }

    fn lease(&mut self, id: LeaseId) -> Result<Option<Lease>, StoreError> {
        self.one(
            "leases",
            "SELECT body FROM leases WHERE id = ?1",
            [int(id.0)],
        )
    }

    fn lease_on_dev(&mut self, st_dev: u64) -> Result<Option<Lease>, StoreError> {
        self.one(
            "leases",
            "SELECT body FROM leases WHERE st_dev = ?1",
            [int(st_dev)],
        )
    }

    fn insert_lease(&mut self, l: &Lease) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO leases (id, job, st_dev, body) VALUES (?1, ?2, ?3, ?4)",
            params![int(l.id.0), int(l.job.0), int(l.st_dev), encode(l)?],
        )
    }

    fn delete_lease(&mut self, id: LeaseId) -> Result<(), StoreError> {
        self.exec("DELETE FROM leases WHERE id = ?1", [int(id.0)])
    }

    fn image(&mut self, id: ImageId) -> Result<Option<ImageRecord>, StoreError> {
        self.one(
            "images",
            "SELECT body FROM images WHERE id = ?1",
            [int(id.0)],
        )
    }

    fn put_image(&mut self, i: &ImageRecord, insert: bool) -> Result<(), StoreError> {
        let p = params![
            int(i.id.0),
            int(i.job.0),
            i.plan,
            i.backup_day.to_string(),
            i.state.kind().as_str(),
            int(i.t0_unix_ms),
            i.source.locator,
            encode(i)?
        ];
        if insert {
            self.exec(
                "INSERT INTO images (id, job, plan, backup_day, state, t0_unix_ms, source, body) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                p,
            )
        } else {
            self.exec(
                "UPDATE images SET job = ?2, plan = ?3, backup_day = ?4, state = ?5, \
                 t0_unix_ms = ?6, source = ?7, body = ?8 WHERE id = ?1",
                p,
            )
        }
    }

    fn schedule(&mut self, name: &str) -> Result<Option<ScheduleRow>, StoreError> {
        self.one(
            "schedules",
            "SELECT body FROM schedules WHERE name = ?1",
            [name],
        )
    }

    fn put_schedule(&mut self, s: &ScheduleRow, insert: bool) -> Result<(), StoreError> {
        let p = params![s.name, encode(s)?];
        if insert {
            self.exec("INSERT INTO schedules (name, body) VALUES (?1, ?2)", p)
        } else {
            self.exec("UPDATE schedules SET body = ?2 WHERE name = ?1", p)
        }
    }

    fn event(&mut self, id: EventId) -> Result<Option<EventRow>, StoreError> {
        self.one(
            "events",
            "SELECT body FROM events WHERE id = ?1",
            [int(id.0)],
        )
    }

    fn event_named(&mut self, name: &str) -> Result<Option<EventId>, StoreError> {
        let id: Option<i64> = self
            .tx
            .prepare_cached("SELECT id FROM events WHERE name = ?1")
            .map_err(self.err("prepare a read"))?
            .query_row([name], |r| r.get(0))
            .optional()
            .map_err(self.err("read a row"))?;
        Ok(id.map(|i| EventId(u64::from_ne_bytes(i.to_ne_bytes()))))
    }

    fn put_event(&mut self, e: &EventRow, insert: bool) -> Result<(), StoreError> {
        let p = params![
            int(e.id.0),
            e.name,
            e.schedule,
            e.next_due.map(to_ms),
            encode(e)?
        ];
        if insert {
            self.exec(
                "INSERT INTO events (id, name, schedule, next_due, body) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                p,
            )
        } else {
            self.exec(
                "UPDATE events SET name = ?2, schedule = ?3, next_due = ?4, body = ?5 \
                 WHERE id = ?1",
                p,
            )
        }
    }

    fn occurrence(
        &mut self,
        event: EventId,
        due: Timestamp,
    ) -> Result<Option<OccurrenceRow>, StoreError> {
        self.one(
            "occurrences",
            "SELECT body FROM occurrences WHERE event = ?1 AND due_at = ?2",
            params![int(event.0), to_ms(due)],
        )
    }

    fn insert_occurrence(&mut self, o: &OccurrenceRow) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO occurrences (event, due_at, backup_day, job, body) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                int(o.event.0),
                to_ms(o.due),
                o.backup_day.to_string(),
                match o.outcome {
                    OccurrenceOutcome::Started(j) => Some(int(j.0)),
                    _ => None,
                },
                encode(o)?
            ],
        )
    }

    fn schedule_users(&mut self, name: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT name FROM events WHERE schedule = ?1 ORDER BY id")
            .map_err(self.err("prepare a read"))?;
        let rows = stmt
            .query_map([name], |r| r.get::<_, String>(0))
            .map_err(self.err("read rows"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.err("read a row"))
    }

    fn event_jobs(&mut self, id: EventId) -> Result<Vec<JobId>, StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT id FROM jobs WHERE event = ?1 ORDER BY id")
            .map_err(self.err("prepare a read"))?;
        let rows = stmt
            .query_map([int(id.0)], |r| r.get::<_, i64>(0))
            .map_err(self.err("read rows"))?;
        rows.map(|r| r.map(|i| JobId(u64::from_ne_bytes(i.to_ne_bytes()))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err("read a row"))
    }

    fn delete_schedule(&mut self, name: &str) -> Result<(), StoreError> {
        self.exec("DELETE FROM schedules WHERE name = ?1", [name])
    }

    fn delete_event(&mut self, id: EventId) -> Result<(), StoreError> {
        self.tx
            .prepare_cached("DELETE FROM occurrences WHERE event = ?1")
            .map_err(self.err("prepare a write"))?
            .execute([int(id.0)])
            .map_err(self.err("delete rows"))?;
        self.exec("DELETE FROM events WHERE id = ?1", [int(id.0)])
    }

    fn id_counter(&mut self, kind: IdKind) -> Result<u64, StoreError> {
        read_counter(self.tx, kind).map_err(self.err("read an id counter"))?
    }

    fn set_id_counter(&mut self, kind: IdKind, last: u64) -> Result<(), StoreError> {
        let last = i64::try_from(last).map_err(|_| StoreError::Corrupt {
            what: format!(
                "ids: {} counter {last} does not fit the column",
                kind.as_str()
            ),
        })?;
        self.exec(
            "INSERT INTO ids (kind, next) VALUES (?1, ?2) \
             ON CONFLICT (kind) DO UPDATE SET next = ?2",
            params![kind.as_str(), last],
        )
    }
}

/// The last id of `kind` handed out (0 when none was), read through `conn` (a connection or an
/// open transaction); a counter that is not a valid id is [`StoreError::Corrupt`].
fn read_counter(conn: &Connection, kind: IdKind) -> rusqlite::Result<Result<u64, StoreError>> {
    let n: Option<i64> = conn
        .prepare_cached("SELECT next FROM ids WHERE kind = ?1")?
        .query_row(params![kind.as_str()], |r| r.get(0))
        .optional()?;
    Ok(
        u64::try_from(n.unwrap_or(0)).map_err(|_| StoreError::Corrupt {
            what: format!("ids: the {} counter is {n:?}", kind.as_str()),
        }),
    )
}
