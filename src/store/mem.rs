//! [`MemStore`]: the store in memory, with the same contract as [`super::SqliteStore`], for fast
//! tests of the layers above.
//!
//! A commit applies its list to a copy of the maps and keeps the copy only when every change
//! applied (all or none, by construction; the copy costs time in proportion to the store's size,
//! which suits tests). Every record written passes through the same JSON encoding as in SQLite,
//! so both stores hold the same values (instants cut to the millisecond).

use std::collections::BTreeMap;

use jiff::Timestamp;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::change::{apply, Change, ImageQuery, JobQuery, OccurrenceQuery, Tx};
use super::ms::to_ms;
use super::records::{
    EventRow, HookRunKey, HookRunRecord, ImageRecord, Intent, JobRecord, Lease, OccurrenceRow,
    ScheduleRow, TaskRecord,
};
use super::{EventId, IdKind, ImageId, IntentId, JobId, LeaseId, Store, StoreError};

/// The store in memory; nothing survives the value.
#[derive(Debug, Default)]
pub struct MemStore {
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone)]
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
        let mut state = self.state.lock();
        let mut next = state.clone();
        for (i, c) in changes.into_iter().enumerate() {
            apply(&mut next, i, c)?;
        }
        *state = next;
        Ok(())
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
}

impl Tx for State {
    fn job(&mut self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.jobs.get(&id).cloned())
    }

    fn put_job(&mut self, job: &JobRecord, _insert: bool) -> Result<(), StoreError> {
        self.jobs.insert(job.id, stored(job)?);
        Ok(())
    }

    fn task(&mut self, job: JobId, index: u32) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self.tasks.get(&(job, index)).cloned())
    }

    fn put_task(&mut self, task: &TaskRecord, _insert: bool) -> Result<(), StoreError> {
        self.tasks.insert((task.job, task.index), stored(task)?);
        Ok(())
    }

    fn hook_run(&mut self, key: &HookRunKey) -> Result<Option<HookRunRecord>, StoreError> {
        Ok(self.hook_runs.get(key).map(|(_, r)| r.clone()))
    }

    fn put_hook_run(&mut self, run: &HookRunRecord, insert: bool) -> Result<(), StoreError> {
        let seq = match (insert, self.hook_runs.get(&run.key)) {
            (false, Some((seq, _))) => *seq,
            _ => {
                self.hook_seq += 1;
                self.hook_seq
            }
        };
        self.hook_runs.insert(run.key, (seq, stored(run)?));
        Ok(())
    }

    fn intent(&mut self, id: IntentId) -> Result<Option<Intent>, StoreError> {
        Ok(self.intents.get(&id).cloned())
    }

    fn put_intent(&mut self, intent: &Intent, _insert: bool) -> Result<(), StoreError> {
        self.intents.insert(intent.id, stored(intent)?);
        Ok(())
    }

    fn lease(&mut self, id: LeaseId) -> Result<Option<Lease>, StoreError> {
        Ok(self.leases.get(&id).cloned())
    }

    fn lease_on_dev(&mut self, st_dev: u64) -> Result<Option<Lease>, StoreError> {
        Ok(self.leases.values().find(|l| l.st_dev == st_dev).cloned())
    }

    fn insert_lease(&mut self, lease: &Lease) -> Result<(), StoreError> {
        self.leases.insert(lease.id, stored(lease)?);
        Ok(())
    }

    fn delete_lease(&mut self, id: LeaseId) -> Result<(), StoreError> {
        self.leases.remove(&id);
        Ok(())
    }

    fn image(&mut self, id: ImageId) -> Result<Option<ImageRecord>, StoreError> {
        Ok(self.images.get(&id).cloned())
    }

    fn put_image(&mut self, image: &ImageRecord, _insert: bool) -> Result<(), StoreError> {
        self.images.insert(image.id, stored(image)?);
        Ok(())
    }

    fn schedule(&mut self, name: &str) -> Result<Option<ScheduleRow>, StoreError> {
        Ok(self.schedules.get(name).cloned())
    }

    fn put_schedule(&mut self, s: &ScheduleRow, _insert: bool) -> Result<(), StoreError> {
        self.schedules.insert(s.name.clone(), stored(s)?);
        Ok(())
    }

    fn event(&mut self, id: EventId) -> Result<Option<EventRow>, StoreError> {
        Ok(self.events.get(&id).cloned())
    }

    fn event_named(&mut self, name: &str) -> Result<Option<EventId>, StoreError> {
        Ok(self.events.values().find(|e| e.name == name).map(|e| e.id))
    }

    fn put_event(&mut self, e: &EventRow, _insert: bool) -> Result<(), StoreError> {
        self.events.insert(e.id, stored(e)?);
        Ok(())
    }

    fn occurrence(
        &mut self,
        event: EventId,
        due: Timestamp,
    ) -> Result<Option<OccurrenceRow>, StoreError> {
        Ok(self.occurrences.get(&(event, to_ms(due))).cloned())
    }

    fn insert_occurrence(&mut self, o: &OccurrenceRow) -> Result<(), StoreError> {
        self.occurrences.insert((o.event, to_ms(o.due)), stored(o)?);
        Ok(())
    }
}
