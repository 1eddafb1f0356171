//! [`MemStore`]: the store in memory, with the same contract as [`super::SqliteStore`], for fast
//! tests of the layers above.
//!
//! A commit applies its list to the maps and logs how to undo each write; when a change fails,
//! the log is played backwards, so the maps are as before the list (all or none). Every record
//! written passes through the same JSON encoding as in SQLite,
//! so both stores hold the same values (instants cut to the millisecond).

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::change::{apply, Change, ImageQuery, JobQuery, OccurrenceQuery, Tx};
use super::ms::to_ms;
use super::records::{
    EventRow, HookRunKey, HookRunRecord, ImageRecord, Intent, JobRecord, JobStateKind, Lease,
    OccurrenceOutcome, OccurrenceRow, ScheduleRow, TaskRecord,
};
use super::{
    BackupDay, EventId, IdKind, ImageId, IntentId, JobId, LeaseId, Store, StoreError, Trimmed,
};

/// The store in memory; nothing survives the value.
#[derive(Debug, Default)]
pub struct MemStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    ids: BTreeMap<IdKind, u64>,
    jobs: BTreeMap<JobId, JobRecord>,
    tasks: BTreeMap<(JobId, u32), TaskRecord>,
    /// With the sequence number of their start (hook runs are listed in start order).
    hook_runs: BTreeMap<HookRunKey, (u64, HookRunRecord)>,
    hook_seq: u64,
    intents: BTreeMap<IntentId, Intent>,
    leases: BTreeMap<LeaseId, Lease>,
    images: BTreeMap<ImageId, ImageRecord>,
    schedules: BTreeMap<String, ScheduleRow>,
    events: BTreeMap<EventId, EventRow>,
    occurrences: BTreeMap<(EventId, i64), OccurrenceRow>,
    /// [`Store::calendar_generation`].
    generation: u64,
}

impl MemStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> MemStore {
        MemStore::default()
    }
}

/// `v` as the SQLite store would read it back.
fn stored<T: Serialize + DeserializeOwned>(v: &T) -> Result<T, StoreError> {
    let text = serde_json::to_string(v).map_err(|e| StoreError::Corrupt {
        what: format!("a record does not encode: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
        what: format!("a record does not decode: {e}: {text}"),
    })
}

impl Store for MemStore {
    fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        let calendar = changes.iter().any(Change::writes_calendar);
        let mut state = self.state.lock();
        let mut tx = Undo {
            state: &mut state,
            log: Vec::new(),
        };
        for (i, c) in changes.into_iter().enumerate() {
            if let Err(e) = apply(&mut tx, i, c) {
                let Undo { state, log } = tx;
                for undo in log.into_iter().rev() {
                    undo(state);
                }
                return Err(e);
            }
        }
        if calendar {
            state.generation += 1;
        }
        Ok(())
    }

    fn allocate_many(&self, kind: IdKind, n: usize) -> Result<Vec<u64>, StoreError> {
        let mut state = self.state.lock();
        let next = state.ids.entry(kind).or_insert(0);
        let first = *next + 1;
        *next += n as u64;
        Ok((first..=*next).collect())
    }

    fn calendar_generation(&self) -> Result<u64, StoreError> {
        Ok(self.state.lock().generation)
    }

    fn next_id(&self, kind: IdKind) -> Result<u64, StoreError> {
        Ok(self.state.lock().ids.get(&kind).copied().unwrap_or(0) + 1)
    }

    fn allocate(&self, kind: IdKind) -> Result<u64, StoreError> {
        let mut state = self.state.lock();
        let n = state.ids.entry(kind).or_insert(0);
        *n += 1;
        Ok(*n)
    }

    fn jobs(&self, q: &JobQuery) -> Result<Vec<JobRecord>, StoreError> {
        let state = self.state.lock();
        Ok(state
            .jobs
            .values()
            .filter(|j| q.matches(j))
            .cloned()
            .collect())
    }

    fn job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.state.lock().jobs.get(&id).cloned())
    }

    fn tasks(&self, job: JobId) -> Result<Vec<TaskRecord>, StoreError> {
        let state = self.state.lock();
        Ok(state
            .tasks
            .range((job, 0)..=(job, u32::MAX))
            .map(|(_, t)| t.clone())
            .collect())
    }

    fn hook_runs(&self, job: JobId) -> Result<Vec<HookRunRecord>, StoreError> {
        let state = self.state.lock();
        let mut runs: Vec<&(u64, HookRunRecord)> = state
            .hook_runs
            .iter()
            .filter(|(k, _)| k.job == job)
            .map(|(_, v)| v)
            .collect();
        runs.sort_by_key(|(seq, _)| *seq);
        Ok(runs.into_iter().map(|(_, r)| r.clone()).collect())
    }

    fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        Ok(self.state.lock().schedules.values().cloned().collect())
    }

    fn events(&self) -> Result<Vec<EventRow>, StoreError> {
        Ok(self.state.lock().events.values().cloned().collect())
    }

    fn occurrences(&self, q: &OccurrenceQuery) -> Result<Vec<OccurrenceRow>, StoreError> {
        let state = self.state.lock();
        let mut rows: Vec<OccurrenceRow> = state
            .occurrences
            .values()
            .filter(|o| q.matches(o))
            .cloned()
            .collect();
        rows.sort_by_key(|o| (to_ms(o.due), o.event));
        Ok(rows)
    }

    fn images(&self, q: &ImageQuery) -> Result<Vec<ImageRecord>, StoreError> {
        let state = self.state.lock();
        let mut rows: Vec<ImageRecord> = state
            .images
            .values()
            .filter(|i| q.matches(i))
            .cloned()
            .collect();
        rows.sort_by_key(|i| (i.t0_unix_ms, i.id));
        Ok(rows)
    }

    fn image(&self, id: ImageId) -> Result<Option<ImageRecord>, StoreError> {
        Ok(self.state.lock().images.get(&id).cloned())
    }

    fn open_intents(&self) -> Result<Vec<Intent>, StoreError> {
        let state = self.state.lock();
        Ok(state
            .intents
            .values()
            .filter(|i| i.outcome.is_none())
            .cloned()
            .collect())
    }

    fn open_leases(&self) -> Result<Vec<Lease>, StoreError> {
        Ok(self.state.lock().leases.values().cloned().collect())
    }

    fn trim_history(&self, before: BackupDay) -> Result<Trimmed, StoreError> {
        let mut state = self.state.lock();
        let s = &mut *state;
        let named: BTreeSet<JobId> = s
            .images
            .values()
            .map(|i| i.job)
            .chain(
                s.intents
                    .values()
                    .filter(|i| i.outcome.is_none())
                    .map(|i| i.job),
            )
            .chain(s.leases.values().map(|l| l.job))
            .collect();
        let gone: BTreeSet<JobId> = s
            .jobs
            .values()
            .filter(|j| {
                j.backup_day < before
                    && matches!(j.state.kind(), JobStateKind::Done | JobStateKind::Canceled)
                    && !named.contains(&j.id)
            })
            .map(|j| j.id)
            .collect();
        s.tasks.retain(|(j, _), _| !gone.contains(j));
        s.hook_runs.retain(|k, _| !gone.contains(&k.job));
        s.intents.retain(|_, i| !gone.contains(&i.job));
        s.jobs.retain(|id, _| !gone.contains(id));
        let before_occ = s.occurrences.len();
        let jobs = &s.jobs;
        s.occurrences.retain(|_, o| {
            o.backup_day >= before
                || matches!(o.outcome, OccurrenceOutcome::Started(j) if jobs.contains_key(&j))
        });
        let occurrences = before_occ - s.occurrences.len();
        if occurrences > 0 {
            s.generation += 1;
        }
        Ok(Trimmed {
            jobs: gone.len(),
            occurrences,
        })
    }
}

/// One write undone.
type UndoFn = Box<dyn FnOnce(&mut State) + Send>;

/// The maps during a commit, with how to undo each write made so far.
struct Undo<'a> {
    state: &'a mut State,
    log: Vec<UndoFn>,
}

/// Insert into a map of [`State`] and log how to put back what was there.
macro_rules! put {
    ($self:ident, $map:ident, $key:expr, $value:expr) => {{
        let key = $key;
        let old = $self.state.$map.insert(key.clone(), $value);
        $self.log.push(Box::new(move |s: &mut State| match old {
            Some(v) => {
                s.$map.insert(key, v);
            }
            None => {
                s.$map.remove(&key);
            }
        }));
    }};
}

impl Tx for Undo<'_> {
    fn job(&mut self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.state.jobs.get(&id).cloned())
    }

    fn put_job(&mut self, job: &JobRecord, _insert: bool) -> Result<(), StoreError> {
        put!(self, jobs, job.id, stored(job)?);
        Ok(())
    }

    fn task(&mut self, job: JobId, index: u32) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self.state.tasks.get(&(job, index)).cloned())
    }

    fn put_task(&mut self, task: &TaskRecord, _insert: bool) -> Result<(), StoreError> {
        put!(self, tasks, (task.job, task.index), stored(task)?);
        Ok(())
    }

    fn hook_run(&mut self, key: &HookRunKey) -> Result<Option<HookRunRecord>, StoreError> {
        Ok(self.state.hook_runs.get(key).map(|(_, r)| r.clone()))
    }

    fn put_hook_run(&mut self, run: &HookRunRecord, insert: bool) -> Result<(), StoreError> {
        let seq = match (insert, self.state.hook_runs.get(&run.key)) {
            (false, Some((seq, _))) => *seq,
            _ => {
                // A sequence number skipped by an undone list leaves a gap, not a reorder.
                self.state.hook_seq += 1;
                self.state.hook_seq
            }
        };
        put!(self, hook_runs, run.key, (seq, stored(run)?));
        Ok(())
    }

    fn intent(&mut self, id: IntentId) -> Result<Option<Intent>, StoreError> {
        Ok(self.state.intents.get(&id).cloned())
    }

    fn put_intent(&mut self, intent: &Intent, _insert: bool) -> Result<(), StoreError> {
        put!(self, intents, intent.id, stored(intent)?);
        Ok(())
    }

    fn lease(&mut self, id: LeaseId) -> Result<Option<Lease>, StoreError> {
        Ok(self.state.leases.get(&id).cloned())
    }

    fn lease_on_dev(&mut self, st_dev: u64) -> Result<Option<Lease>, StoreError> {
        Ok(self
            .state
            .leases
            .values()
            .find(|l| l.st_dev == st_dev)
            .cloned())
    }

    fn insert_lease(&mut self, lease: &Lease) -> Result<(), StoreError> {
        put!(self, leases, lease.id, stored(lease)?);
        Ok(())
    }

    fn delete_lease(&mut self, id: LeaseId) -> Result<(), StoreError> {
        if let Some(old) = self.state.leases.remove(&id) {
            self.log.push(Box::new(move |s: &mut State| {
                s.leases.insert(id, old);
            }));
        }
        Ok(())
    }

    fn image(&mut self, id: ImageId) -> Result<Option<ImageRecord>, StoreError> {
        Ok(self.state.images.get(&id).cloned())
    }

    fn put_image(&mut self, image: &ImageRecord, _insert: bool) -> Result<(), StoreError> {
        put!(self, images, image.id, stored(image)?);
        Ok(())
    }

    fn schedule(&mut self, name: &str) -> Result<Option<ScheduleRow>, StoreError> {
        Ok(self.state.schedules.get(name).cloned())
    }

    fn put_schedule(&mut self, s: &ScheduleRow, _insert: bool) -> Result<(), StoreError> {
        put!(self, schedules, s.name.clone(), stored(s)?);
        Ok(())
    }

    fn event(&mut self, id: EventId) -> Result<Option<EventRow>, StoreError> {
        Ok(self.state.events.get(&id).cloned())
    }

    fn event_named(&mut self, name: &str) -> Result<Option<EventId>, StoreError> {
        Ok(self
            .state
            .events
            .values()
            .find(|e| e.name == name)
            .map(|e| e.id))
    }

    fn put_event(&mut self, e: &EventRow, _insert: bool) -> Result<(), StoreError> {
        put!(self, events, e.id, stored(e)?);
        Ok(())
    }

    fn occurrence(
        &mut self,
        event: EventId,
        due: Timestamp,
    ) -> Result<Option<OccurrenceRow>, StoreError> {
        Ok(self.state.occurrences.get(&(event, to_ms(due))).cloned())
    }

    fn insert_occurrence(&mut self, o: &OccurrenceRow) -> Result<(), StoreError> {
        put!(self, occurrences, (o.event, to_ms(o.due)), stored(o)?);
        Ok(())
    }

    fn schedule_users(&mut self, name: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .state
            .events
            .values()
            .filter(|e| e.schedule == name)
            .map(|e| e.name.clone())
            .collect())
    }

    fn event_jobs(&mut self, id: EventId) -> Result<Vec<JobId>, StoreError> {
        Ok(self
            .state
            .jobs
            .values()
            .filter(|j| j.event == id)
            .map(|j| j.id)
            .collect())
    }

    fn delete_schedule(&mut self, name: &str) -> Result<(), StoreError> {
        if let Some(old) = self.state.schedules.remove(name) {
            let key = name.to_string();
            self.log.push(Box::new(move |s: &mut State| {
                s.schedules.insert(key, old);
            }));
        }
        Ok(())
    }

    fn id_counter(&mut self, kind: IdKind) -> Result<u64, StoreError> {
        Ok(self.state.ids.get(&kind).copied().unwrap_or(0))
    }

    fn set_id_counter(&mut self, kind: IdKind, last: u64) -> Result<(), StoreError> {
        put!(self, ids, kind, last);
        Ok(())
    }

    fn delete_event(&mut self, id: EventId) -> Result<(), StoreError> {
        let keys: Vec<(EventId, i64)> = self
            .state
            .occurrences
            .range((id, i64::MIN)..=(id, i64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some(old) = self.state.occurrences.remove(&key) {
                self.log.push(Box::new(move |s: &mut State| {
                    s.occurrences.insert(key, old);
                }));
            }
        }
        if let Some(old) = self.state.events.remove(&id) {
            self.log.push(Box::new(move |s: &mut State| {
                s.events.insert(id, old);
            }));
        }
        Ok(())
    }
}
