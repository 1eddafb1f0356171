//! The orchestration store: jobs, calendar events and occurrences, hook runs, intents, leases
//! and catalog images (docs/orchestration.md, section 1.2).
//!
//! The store is the only door to orchestration state. [`Store::commit`] takes a list of
//! [`Change`]s, each with its precondition, and applies all of them or none in one transaction
//! (like the activity table's commit): a calendar occurrence becomes a job in the transaction that
//! advances its event, a job changes state only from the state its caller saw, a side effect is
//! bracketed by an [`Intent`] and its outcome. Two implementations keep the same contract:
//! [`SqliteStore`] (one SQLite file in WAL mode, `synchronous=FULL`, `BEGIN IMMEDIATE` per commit)
//! and [`MemStore`] (memory, for fast tests of the layers above).
//!
//! - [`records`]: the rows (jobs, tasks, hook runs, intents, leases, images, schedules, events,
//!   occurrences);
//! - [`change`]: [`Change`], the queries, and the one function that checks and applies a change
//!   for both stores;
//! - [`sqlite`] and [`mem`]: the two stores; `schema.sql`: the SQLite schema.
//!
//! Decisions: instants are kept as milliseconds since the Unix epoch ([`ms`]; finer parts are
//! cut); ids come from [`Store::allocate`], a transaction of its own on a counter per kind, so two
//! processes never hand out one id and an id is never reused even when the list that was to use
//! it fails, or from a [`Change::ReserveIds`] at the head of the list that uses them, which hands
//! them out in that list's transaction (none when it fails); the SQLite schema carries its version in `PRAGMA user_version`
//! ([`sqlite::SCHEMA_VERSION`]), and a file of a newer version is refused
//! ([`StoreError::Schema`]).
//!
//! Beside them are the small value types every orchestration layer names: the ids of jobs,
//! images, events, intents and leases, the backup day and the priority.

use std::fmt;
use std::path::PathBuf;

use jiff::civil::Date;
use jiff::Timestamp;

pub mod change;
#[cfg(test)]
mod contract;
pub mod mem;
pub mod records;
pub mod sqlite;
#[cfg(test)]
mod sqlite_tests;

pub use change::{Change, ImageQuery, JobQuery, OccurrenceQuery, Toggle};
pub use mem::MemStore;
pub use records::{
    ChecksumAlgorithm, EventKind, EventRow, HookResult, HookRunKey, HookRunRecord, HookStage,
    ImageChecksums, ImageRecord, ImageState, ImageStateKind, Intent, IntentAction, IntentOutcome,
    JobKind, JobProgress, JobReason, JobRecord, JobState, JobStateKind, JobStatus, Lease,
    OccurrenceOutcome, OccurrenceRow, Phase, ScheduleRow, StopRequest, TaskRecord, TaskStatus,
    TaskStep, WaitReason,
};
pub use sqlite::SqliteStore;

/// Why a value type could not be built from its text or number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A priority outside 0..=99.
    #[error("priority {0} is out of range (0 = always executed, 1 lowest .. 99 highest)")]
    Priority(i64),
    /// An id that is not its letter followed by a number (`j42`, `i17`, `e3`).
    #[error("{what} id {text:?} is not {prefix} followed by a number")]
    Id {
        /// Which id ("job", "image", "event").
        what: &'static str,
        /// Its letter.
        prefix: char,
        /// The text given.
        text: String,
    },
    /// A backup day that is not `YYYYMMDD` or `YYYY-MM-DD`.
    #[error("backup day {0:?} is not YYYYMMDD or YYYY-MM-DD")]
    BackupDay(String),
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $what:literal) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize,
            serde::Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ValueError;
            fn from_str(s: &str) -> Result<Self, ValueError> {
                let digits = s.strip_prefix($prefix).unwrap_or(s);
                digits.parse().map($name).map_err(|_| ValueError::Id {
                    what: $what,
                    prefix: $prefix,
                    text: s.to_string(),
                })
            }
        }
    };
}

id_type!(
    /// A job (`j42`): one run of a plan, a restore, a command or maintenance, with its attempts.
    JobId,
    'j',
    "job"
);
id_type!(
    /// A catalog image (`i17`): one time-zero copy recorded at its cut.
    ImageId,
    'i',
    "image"
);
id_type!(
    /// A calendar event (`e3`): what starts, on which schedule, at which priority.
    EventId,
    'e',
    "event"
);

id_type!(
    /// An intent (`n5`): a side effect recorded before it is done.
    IntentId,
    'n',
    "intent"
);
id_type!(
    /// A freeze lease (`l2`).
    LeaseId,
    'l',
    "lease"
);

/// The kinds of ids [`Store::allocate`] hands out, one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdKind {
    /// [`JobId`].
    Job,
    /// [`ImageId`].
    Image,
    /// [`EventId`].
    Event,
    /// [`IntentId`].
    Intent,
    /// [`LeaseId`].
    Lease,
}

impl IdKind {
    /// The counter's name in the store.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            IdKind::Job => "job",
            IdKind::Image => "image",
            IdKind::Event => "event",
            IdKind::Intent => "intent",
            IdKind::Lease => "lease",
        }
    }
}

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A change's precondition did not hold; nothing of the list was applied.
    #[error("change {change} of the list does not apply: {what}")]
    Conflict {
        /// The change's index in the list.
        change: usize,
        /// Which precondition failed, with what was found.
        what: String,
    },
    /// A change contradicts itself (e.g. an occurrence that names another job); nothing of the
    /// list was applied.
    #[error("change {change} of the list is malformed: {what}")]
    Invalid {
        /// The change's index in the list.
        change: usize,
        /// What is wrong.
        what: String,
    },
    /// SQLite failed.
    #[error("store {path}: {op}: {source}")]
    Sqlite {
        /// What was being done.
        op: &'static str,
        /// The store's file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file's schema is not one this build reads.
    #[error("store {path} has schema version {found}; this build reads up to {supported}")]
    Schema {
        /// The store's file.
        path: PathBuf,
        /// The version found.
        found: i64,
        /// The newest version this build reads.
        supported: i64,
    },
    /// A stored row does not decode.
    #[error("store row does not decode: {what}")]
    Corrupt {
        /// Which row, and why.
        what: String,
    },
}

/// The orchestration store (docs/orchestration.md, section 1.2). Every query returns rows in a
/// fixed order, given with each method.
pub trait Store: Send + Sync + fmt::Debug {
    /// Apply every change of the list or none, in order, in one transaction; each change's
    /// precondition is checked inside it, after the changes before it.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] naming the first change whose precondition fails,
    /// [`StoreError::Invalid`] for a malformed change, or a storage error; in every case nothing
    /// of the list is applied.
    fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError>;

    /// A new id of this kind, never handed out before by this store (from 1, increasing; a
    /// transaction of its own).
    ///
    /// # Errors
    /// A storage error.
    fn allocate(&self, kind: IdKind) -> Result<u64, StoreError>;

    /// The id [`Store::allocate`] would hand out next for `kind` (a read: nothing is handed
    /// out). A list that creates rows names ids from here after a [`Change::ReserveIds`], which
    /// hands them out in the list's own transaction, or conflicts when another caller took them
    /// first.
    ///
    /// # Errors
    /// A storage error, or [`StoreError::Corrupt`].
    fn next_id(&self, kind: IdKind) -> Result<u64, StoreError>;

    /// `n` new ids of `kind` at once, in one transaction (ascending; none is ever handed out
    /// again, as with [`Store::allocate`]).
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    fn allocate_many(&self, kind: IdKind, n: usize) -> Result<Vec<u64>, StoreError> {
        (0..n).map(|_| self.allocate(kind)).collect()
    }

    /// The calendar's generation: a counter that every committed list with a change that
    /// [`Change::writes_calendar`] moves on by one, in the same transaction, as does a
    /// [`Store::trim_history`] that removed occurrences. A reader that kept the calendar read at
    /// generation `g` may use it as long as the generation is still `g`; 0 for a new store.
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    fn calendar_generation(&self) -> Result<u64, StoreError>;

    /// Jobs matching `q`, by id.
    ///
    /// # Errors
    /// A storage error, or [`StoreError::Corrupt`].
    fn jobs(&self, q: &JobQuery) -> Result<Vec<JobRecord>, StoreError>;

    /// One job.
    ///
    /// # Errors
    /// As [`Store::jobs`].
    fn job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;

    /// A job's tasks, by index.
    ///
    /// # Errors
    /// As [`Store::jobs`].
    fn tasks(&self, job: JobId) -> Result<Vec<TaskRecord>, StoreError>;

    /// A job's hook runs, in the order they were started.
    ///
    /// # Errors
    /// As [`Store::jobs`].
    fn hook_runs(&self, job: JobId) -> Result<Vec<HookRunRecord>, StoreError>;

    /// Schedules, by name.
    ///
    /// # Errors
    /// As [`Store::jobs`].
    fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError>;

    /// Events, by id.
    ///
    /// # Errors
    /// As [`Store::jobs`].
    fn events(&self) -> Result<Vec<EventRow>, StoreError>;

    /// The events whose `next_due` is at or before `t`, by id (what a scheduler pass may have
    /// to decide; it reads the whole calendar only when one of them is enabled).
    ///
    /// # Errors
    /// As [`Store::jobs`].
    fn events_due_by(&self, t: Timestamp) -> Result<Vec<EventRow>, StoreError> {
        Ok(self
            .events()?
            .into_iter()
            .filter(|e| e.next_due.is_some_and(|d| d <= t))
            .collect())
    }

    /// Occurrences matching `q`, by due instant, then event.
    ///
    /// # Errors
    /// As [`Store::jobs`].
    fn occurrences(&self, q: &OccurrenceQuery) -> Result<Vec<OccurrenceRow>, StoreError>;

    /// Images matching `q`, by T0, then id.
    ///
    /// # Errors
    /// As [`Store::jobs`].
    fn images(&self, q: &ImageQuery) -> Result<Vec<ImageRecord>, StoreError>;

    /// One image.
    ///
    /// # Errors
    /// As [`Store::jobs`].
    fn image(&self, id: ImageId) -> Result<Option<ImageRecord>, StoreError>;

    /// Intents without an outcome, by id (recovery resolves them, section 3.2).
    ///
    /// # Errors
    /// As [`Store::jobs`].
    fn open_intents(&self) -> Result<Vec<Intent>, StoreError>;

    /// Leases held, by id.
    ///
    /// # Errors
    /// As [`Store::jobs`].
    fn open_leases(&self) -> Result<Vec<Lease>, StoreError>;

    /// Forget the history of backup days before `before` (CAL-14, `history_days`): ended jobs
    /// (`Done`, `Canceled`) of those days that no image, open intent or lease names, with their
    /// tasks, hook runs and intents, and those days' occurrences except the ones that started a
    /// job that is kept. In one transaction; SQLite then runs `PRAGMA optimize`.
    ///
    /// # Errors
    /// A storage error; nothing is forgotten then.
    fn trim_history(&self, before: BackupDay) -> Result<Trimmed, StoreError>;
}

/// What [`Store::trim_history`] forgot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trimmed {
    /// Jobs removed (with their tasks, hook runs and intents).
    pub jobs: usize,
    /// Occurrences removed.
    pub occurrences: usize,
}

/// Instants in the store: milliseconds since the Unix epoch, as an integer column and in the
/// rows' JSON; the parts of a millisecond are cut. Use with `#[serde(with = "ms")]`, or
/// `ms::opt` for an `Option<Timestamp>`.
pub mod ms {
    use jiff::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    /// The instant as stored.
    #[must_use]
    pub fn to_ms(t: Timestamp) -> i64 {
        t.as_millisecond()
    }

    /// The instant of a stored number; `None` outside the range of [`Timestamp`].
    #[must_use]
    pub fn from_ms(ms: i64) -> Option<Timestamp> {
        Timestamp::from_millisecond(ms).ok()
    }

    /// Serialize as milliseconds.
    ///
    /// # Errors
    /// The serializer's.
    pub fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(to_ms(*t))
    }

    /// Deserialize from milliseconds.
    ///
    /// # Errors
    /// The deserializer's, or a number outside the range of [`Timestamp`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let n = i64::deserialize(d)?;
        from_ms(n)
            .ok_or_else(|| serde::de::Error::custom(format!("instant {n} ms is out of range")))
    }

    /// The same for `Option<Timestamp>` (`null` for `None`).
    pub mod opt {
        use jiff::Timestamp;
        use serde::{Deserialize, Deserializer, Serializer};

        /// Serialize as milliseconds or `null`.
        ///
        /// # Errors
        /// The serializer's.
        pub fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_some(&super::to_ms(*t)),
                None => s.serialize_none(),
            }
        }

        /// Deserialize from milliseconds or `null`.
        ///
        /// # Errors
        /// The deserializer's, or a number outside the range of [`Timestamp`].
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
            Option::<i64>::deserialize(d)?
                .map(|n| {
                    super::from_ms(n).ok_or_else(|| {
                        serde::de::Error::custom(format!("instant {n} ms is out of range"))
                    })
                })
                .transpose()
        }
    }
}

/// A job's or event's priority: 1 (lowest) to 99 (highest); 0 means always executed, never
/// suppressed and suppressing nothing.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "i64", into = "u8")]
pub struct Priority(u8);

impl Priority {
    /// Always executed: never suppressed, suppresses nothing.
    pub const ALWAYS: Priority = Priority(0);

    /// A priority from a number; anything outside 0..=99 is refused.
    ///
    /// # Errors
    /// [`ValueError::Priority`] outside 0..=99.
    pub fn new(n: i64) -> Result<Priority, ValueError> {
        match u8::try_from(n) {
            Ok(p) if i64::from(p) <= i64::from(crate::limits::PRIORITY_MAX) => Ok(Priority(p)),
            _ => Err(ValueError::Priority(n)),
        }
    }

    /// The number, 0..=99.
    #[must_use]
    pub fn get(self) -> u8 {
        self.0
    }

    /// Whether this is priority 0 (always executed).
    #[must_use]
    pub fn is_always(self) -> bool {
        self.0 == 0
    }
}

impl TryFrom<i64> for Priority {
    type Error = ValueError;
    fn try_from(n: i64) -> Result<Priority, ValueError> {
        Priority::new(n)
    }
}

impl From<Priority> for u8 {
    fn from(p: Priority) -> u8 {
        p.0
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Priority {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Priority, ValueError> {
        let n: i64 = s.trim().parse().map_err(|_| ValueError::Priority(-1))?;
        Priority::new(n)
    }
}

/// A backup day: the civil date of the last NEWDAY occurrence at or before an instant. Jobs,
/// log lines and target names carry it as `YYYYMMDD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackupDay(pub Date);

impl fmt::Display for BackupDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}{:02}{:02}",
            self.0.year(),
            self.0.month(),
            self.0.day()
        )
    }
}

impl std::str::FromStr for BackupDay {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<BackupDay, ValueError> {
        let bad = || ValueError::BackupDay(s.to_string());
        if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) {
            let y: i16 = s[..4].parse().map_err(|_| bad())?;
            let m: i8 = s[4..6].parse().map_err(|_| bad())?;
            let d: i8 = s[6..].parse().map_err(|_| bad())?;
            return Date::new(y, m, d).map(BackupDay).map_err(|_| bad());
        }
        s.parse::<Date>().map(BackupDay).map_err(|_| bad())
    }
}

impl serde::Serialize for BackupDay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BackupDay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BackupDay, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse_with_their_letter() {
        assert_eq!(JobId(42).to_string(), "j42");
        assert_eq!("j42".parse::<JobId>().unwrap(), JobId(42));
        assert_eq!("17".parse::<ImageId>().unwrap(), ImageId(17));
        assert!("x3".parse::<EventId>().is_err());
    }

    #[test]
    fn priorities_outside_0_to_99_are_refused() {
        assert!(Priority::new(0).unwrap().is_always());
        assert_eq!(Priority::new(99).unwrap().get(), 99);
        assert_eq!(Priority::new(100), Err(ValueError::Priority(100)));
        assert_eq!(Priority::new(-1), Err(ValueError::Priority(-1)));
        assert!("abc".parse::<Priority>().is_err());
    }

    #[test]
    fn backup_day_prints_as_yyyymmdd_and_parses_both_forms() {
        let d: BackupDay = "20070910".parse().unwrap();
        assert_eq!(d.to_string(), "20070910");
        assert_eq!("2007-09-10".parse::<BackupDay>().unwrap(), d);
        assert!("20070931".parse::<BackupDay>().is_err());
        assert!("2007091".parse::<BackupDay>().is_err());
    }

    #[test]
    fn cat_09_job_progress_written_before_the_ring_fields_loads_with_zeros() {
        let old = r#"{"bytes_done":5,"bytes_total":9,"waits_for_full":2,"waits_for_empty":1,"checkpoint":5}"#;
        let p: JobProgress = serde_json::from_str(old).unwrap();
        assert_eq!(
            (p.bytes_done, p.waits_for_full, p.checkpoint),
            (5, 2, Some(5))
        );
        assert_eq!(
            (p.ring_bytes, p.ring_buffers, p.ring_buffer_bytes),
            (0, 0, 0)
        );
    }
}
