//! Tests of the job layer, named after the behaviour ids of docs/orchestration.md ("Jobs", and
//! the calendar ids whose store side the job layer carries: CAL-03, CAL-14, CAL-19). Time comes
//! from a `ManualClock` only; worker threads are joined with `Scheduler::settle`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender};
use jiff::{SignedDuration, Timestamp};
use parking_lot::Mutex;
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::calendar::Schedule;
use crate::clock::{Clock, ManualClock};
use crate::store::{
    BackupDay, Change, EventId, EventKind, EventRow, IdKind, JobId, JobKind, JobQuery, JobReason,
    JobRecord, JobState, JobStateKind, JobStatus, MemStore, OccurrenceOutcome, OccurrenceQuery,
    OccurrenceRow, Phase, Priority, ScheduleRow, SqliteStore, Store, TaskStep, WaitReason,
};

fn at(s: &str) -> Timestamp {
    s.parse().expect("a test instant")
}

fn prio(n: i64) -> Priority {
    Priority::new(n).expect("a test priority")
}

fn mins(n: i64) -> SignedDuration {
    SignedDuration::from_mins(n)
}

fn day(s: &str) -> BackupDay {
    s.parse().expect("a test backup day")
}

// ---------------------------------------------------------------------------------------------
// A fake of the plan layer's work.

/// Both ends of the channel that tells a held attempt why it stops.
type StopChannel = (Sender<JobReason>, Receiver<JobReason>);

/// Work whose outcomes the test scripts per plan (default: success), whose needs the test sets
/// per plan, and which blocks until stopped for the plans the test holds.
#[derive(Default)]
struct FakeWork {
    outcomes: Mutex<HashMap<String, VecDeque<JobOutcome>>>,
    needs: Mutex<HashMap<String, Needs>>,
    held: Mutex<Vec<String>>,
    stops: Mutex<HashMap<(JobId, u32), StopChannel>>,
    log: Mutex<Vec<String>>,
}

impl FakeWork {
    fn script(&self, plan: &str, outcomes: Vec<JobOutcome>) {
        self.outcomes
            .lock()
            .insert(plan.to_string(), outcomes.into());
    }

    fn set_needs(&self, plan: &str, resources: Vec<Resource>, readiness: Readiness) {
        self.needs.lock().insert(
            plan.to_string(),
            Needs {
                resources,
                readiness,
            },
        );
    }

    fn hold(&self, plan: &str) {
        self.held.lock().push(plan.to_string());
    }

    fn stop_channel(&self, job: JobId, attempt: u32) -> StopChannel {
        self.stops
            .lock()
            .entry((job, attempt))
            .or_insert_with(crossbeam::channel::unbounded)
            .clone()
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().clone()
    }

    fn work(&self, what: &str, job: &JobRecord) -> JobOutcome {
        self.log
            .lock()
            .push(format!("{what} {} attempt {}", job.id, job.attempt));
        let plan = job.kind.plan().unwrap_or_default().to_string();
        if self.held.lock().contains(&plan) {
            let (_, rx) = self.stop_channel(job.id, job.attempt);
            let reason = rx.recv().expect("the test keeps the sender");
            return JobOutcome::Canceled { reason };
        }
        self.outcomes
            .lock()
            .get_mut(&plan)
            .and_then(VecDeque::pop_front)
            .unwrap_or(JobOutcome::Done {
                status: JobStatus::Success,
                reason: None,
            })
    }
}

impl JobWork for FakeWork {
    fn needs(&self, job: &JobRecord, _now: Timestamp) -> Needs {
        self.needs
            .lock()
            .get(job.kind.plan().unwrap_or_default())
            .cloned()
            .unwrap_or(Needs {
                resources: Vec::new(),
                readiness: Readiness::Ready,
            })
    }

    fn run(&self, job: &JobRecord, _clock: &dyn Clock) -> JobOutcome {
        self.work("run", job)
    }

    fn resume(&self, job: &JobRecord, _clock: &dyn Clock) -> JobOutcome {
        self.work("resume", job)
    }

    fn stop(&self, job: JobId, attempt: u32, reason: &JobReason) {
        self.log
            .lock()
            .push(format!("stop {job} attempt {attempt} {reason:?}"));
        let (tx, _) = self.stop_channel(job, attempt);
        let _ = tx.send(reason.clone());
    }
}

// ---------------------------------------------------------------------------------------------
// Calendar records in a store.

/// A calendar in `store`: NEWDAY daily 08:00 UTC and the given (name, expr) schedules and
/// (schedule, plan, priority) events, every `next_due` the first occurrence after `start`.
/// Returns the event ids, in the order given (NEWDAY not included).
fn setup_calendar(
    store: &dyn Store,
    start: Timestamp,
    schedules: &[(&str, &str)],
    events: &[(&str, &str, i64)],
) -> Vec<EventId> {
    let mut changes = Vec::new();
    let mut all = vec![("NEWDAY", "0 8 * * *")];
    all.extend_from_slice(schedules);
    let mut parsed = BTreeMap::new();
    for (name, expr) in &all {
        changes.push(Change::PutSchedule {
            schedule: ScheduleRow {
                name: (*name).to_string(),
                expr: (*expr).to_string(),
                zone: "UTC".to_string(),
                enabled: true,
            },
            replace: false,
        });
        let s = Schedule::parse(name, expr, jiff::tz::TimeZone::UTC).expect("a test schedule");
        parsed.insert((*name).to_string(), s);
    }
    let newday = EventId(store.allocate(IdKind::Event).unwrap());
    changes.push(Change::PutEvent {
        event: EventRow {
            id: newday,
            name: "NEWDAY".to_string(),
            schedule: "NEWDAY".to_string(),
            kind: EventKind::Newday,
            priority: Priority::ALWAYS,
            blocking: false,
            enabled: true,
            next_due: parsed["NEWDAY"].next_after(start),
        },
        replace: false,
    });
    let mut ids = Vec::new();
    for (i, (schedule, plan, priority)) in events.iter().enumerate() {
        let id = EventId(store.allocate(IdKind::Event).unwrap());
        ids.push(id);
        changes.push(Change::PutEvent {
            event: EventRow {
                id,
                name: format!("{plan}-{i}"),
                schedule: (*schedule).to_string(),
                kind: EventKind::Plan {
                    plan: (*plan).to_string(),
                },
                priority: prio(*priority),
                blocking: false,
                enabled: true,
                next_due: parsed[*schedule].next_after(start),
            },
            replace: false,
        });
    }
    store.commit(changes).unwrap();
    ids
}

struct Rig {
    store: Arc<dyn Store>,
    clock: ManualClock,
    work: Arc<FakeWork>,
    sched: Scheduler,
}

fn rig_with(store: Arc<dyn Store>, start: Timestamp, limits: Limits, abort: NewdayAbort) -> Rig {
    let clock = ManualClock::new(start);
    let work = Arc::new(FakeWork::default());
    let sched = Scheduler::new(
        Arc::clone(&store),
        Arc::new(clock.clone()),
        Arc::clone(&work) as Arc<dyn JobWork>,
        limits,
        NewdaySettings { abort },
        "test-daemon".to_string(),
    );
    Rig {
        store,
        clock,
        work,
        sched,
    }
}

fn rig(start: Timestamp, limits: Limits) -> Rig {
    rig_with(Arc::new(MemStore::new()), start, limits, NewdayAbort::All)
}

fn job_of(store: &dyn Store, id: JobId) -> JobRecord {
    store.job(id).unwrap().expect("the job exists")
}

/// Insert a job of `plan` in backup day `bd` directly, created at `due` and queued, with a
/// recorded occurrence of `event` (due `id` seconds after `due`).
fn insert_job(store: &dyn Store, event: EventId, plan: &str, due: Timestamp, bd: &str) -> JobId {
    let id = JobId(store.allocate(IdKind::Job).unwrap());
    let backup_day = day(bd);
    let created = due;
    // One occurrence per (event, due): each inserted job has a due of its own.
    let due = due + SignedDuration::from_secs(i64::try_from(id.0).unwrap());
    store
        .commit(vec![Change::InsertJob {
            job: JobRecord {
                id,
                kind: JobKind::Backup {
                    plan: plan.to_string(),
                },
                event,
                due_at: due,
                backup_day,
                priority: prio(1),
                attempt: 1,
                state: JobState::Queued {
                    waiting_on: WaitReason::Broker,
                },
                owner: None,
                plan_text: None,
                plan_sha256: None,
                progress: None,
                created,
                started: None,
                ended: None,
                stop_requested: None,
            },
            occurrence: OccurrenceRow {
                event,
                due,
                backup_day,
                outcome: OccurrenceOutcome::Started(id),
            },
        }])
        .unwrap();
    id
}

/// Move a job to `to` from the state it is in.
fn force(store: &dyn Store, id: JobId, to: JobState, owner: Option<&str>, now: Timestamp) {
    let j = job_of(store, id);
    store
        .commit(vec![Change::Transition {
            job: id,
            from: j.state.kind(),
            attempt: j.attempt,
            to,
            to_attempt: j.attempt,
            owner: owner.map(str::to_string),
            at: now,
        }])
        .unwrap();
}

fn success() -> JobOutcome {
    JobOutcome::Done {
        status: JobStatus::Success,
        reason: None,
    }
}

fn failed(reason: JobReason) -> JobOutcome {
    JobOutcome::Done {
        status: JobStatus::Failed,
        reason: Some(reason),
    }
}

// ---------------------------------------------------------------------------------------------
// Broker (pure).

fn req(job: u64, priority: i64, created_min: i64, resources: Vec<Resource>) -> Request {
    Request {
        job: JobId(job),
        priority: prio(priority),
        created: at("2026-12-01T00:00:00Z") + mins(created_min),
        resources,
        readiness: Readiness::Ready,
    }
}

fn client(c: &str) -> Resource {
    Resource::Client(c.to_string())
}

#[test]
fn job_02_a_request_is_granted_all_or_nothing() {
    let limits = Limits {
        max_jobs: 1,
        ..Limits::default()
    };
    // client:dbhost is taken by an active job; global is free (max 1).
    let counters = Counters::of_active([&[client("dbhost")][..]]);
    let queue = Queue {
        requests: vec![
            req(1, 50, 0, vec![Resource::Global, client("dbhost")]),
            req(2, 10, 1, vec![Resource::Global, client("web")]),
        ],
    };
    let grants = grant(&queue, &counters, &limits);
    assert_eq!(
        grants,
        vec![
            Grant::Waits {
                job: JobId(1),
                on: WaitReason::Resources {
                    names: vec!["client:dbhost".to_string()],
                },
            },
            // j1's refused request took no global slot, so j2 gets the only one.
            Grant::Granted {
                job: JobId(2),
                resources: vec![Resource::Global, client("web")],
            },
        ]
    );
    // Each limit of JOB-02 is a resource of its own.
    let limits = Limits {
        max_jobs_per_plan: 2,
        max_jobs_per_destination: 1,
        max_jobs_per_table: 1,
        clients: BTreeMap::from([("big".to_string(), 3)]),
        ..Limits::default()
    };
    assert_eq!(limits.limit_of(&Resource::Plan("p".into())), 2);
    assert_eq!(limits.limit_of(&client("small")), 1);
    assert_eq!(limits.limit_of(&client("big")), 3);
    let counters = Counters::of_active([&[Resource::Table("/t".into())][..]]);
    let queue = Queue {
        requests: vec![req(3, 1, 0, vec![Resource::Table("/t".into())])],
    };
    assert!(matches!(
        &grant(&queue, &counters, &limits)[0],
        Grant::Waits { on: WaitReason::Resources { names }, .. } if names == &["table:/t"]
    ));
}

#[test]
fn job_02_limits_table_reads_with_defaults_and_refuses_bad_values() {
    #[derive(serde::Deserialize)]
    struct File {
        limits: Limits,
    }
    let l: File = toml::from_str("[limits]\n").unwrap();
    assert_eq!(l.limits, Limits::default());
    assert_eq!(l.limits.max_jobs_per_client, 1);
    assert_eq!(l.limits.job_retry_delay_mins, 10);
    assert_eq!(l.limits.backup_attempts, 2);
    assert_eq!(l.limits.attempt_window_hours, 12);
    let l: File = toml::from_str(
        "[limits]\nmax_jobs = 4\nmax_jobs_per_plan = 3\nstrict = true\n\
         [limits.clients]\ndbhost = 2\n",
    )
    .unwrap();
    assert_eq!(l.limits.max_jobs, 4);
    assert!(l.limits.strict);
    assert_eq!(l.limits.limit_of(&client("dbhost")), 2);
    for bad in [
        "max_jobs_per_plan = 1000",
        "max_jobs_per_plan = 0",
        "job_retry_delay_mins = 61",
        "job_retry_delay_mins = 0",
        "max_jobz = 3",
    ] {
        let text = format!("[limits]\n{bad}\n");
        assert!(toml::from_str::<File>(&text).is_err(), "{bad} is refused");
    }
    let e = toml::from_str::<File>("[limits]\njob_retry_delay_mins = 61\n")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("job_retry_delay_mins"), "{e}");
    let n: NewdaySettings = toml::from_str("abort = \"uncut\"\n").unwrap();
    assert_eq!(n.abort, NewdayAbort::Uncut);
    assert!(toml::from_str::<NewdaySettings>("abort = \"some\"\n").is_err());
}

#[test]
fn job_03_a_queued_job_names_what_it_waits_on() {
    let mut window = req(2, 1, 0, vec![Resource::Global]);
    window.readiness = Readiness::WaitWindow;
    let mut start = req(3, 1, 0, vec![Resource::Global]);
    start.readiness = Readiness::WaitStartTime;
    let queue = Queue {
        requests: vec![req(1, 1, 0, vec![client("dbhost")]), window, start],
    };
    let counters = Counters::of_active([&[client("dbhost")][..]]);
    let grants = grant(&queue, &counters, &Limits::default());
    let on: BTreeMap<JobId, WaitReason> = grants
        .into_iter()
        .map(|g| match g {
            Grant::Waits { job, on } => (job, on),
            other => panic!("every job waits: {other:?}"),
        })
        .collect();
    assert_eq!(
        on[&JobId(1)],
        WaitReason::Resources {
            names: vec!["client:dbhost".into()]
        }
    );
    assert_eq!(on[&JobId(2)], WaitReason::Window);
    assert_eq!(on[&JobId(3)], WaitReason::StartTime);

    // Through the scheduler, the reason is in the job's record.
    let r = rig(at("2026-12-01T12:00:00Z"), Limits::default());
    let ev = setup_calendar(
        &*r.store,
        r.clock.now(),
        &[("h", "0 * * * *")],
        &[("h", "db", 1)],
    );
    r.work
        .set_needs("db", vec![client("dbhost")], Readiness::Ready);
    r.work.hold("db");
    r.clock.advance(mins(60));
    let first = r.sched.tick().unwrap();
    r.clock.advance(mins(60));
    let second = r.sched.tick().unwrap();
    assert_eq!((first.len(), second.len()), (1, 1));
    assert_eq!(
        job_of(&*r.store, first[0]).state.kind(),
        JobStateKind::Active
    );
    // Both jobs are of plan db in one backup day (JOB-12) and on one client.
    assert_eq!(
        job_of(&*r.store, second[0]).state,
        JobState::Queued {
            waiting_on: WaitReason::Resources {
                names: vec!["run:db@20261201".into(), "client:dbhost".into()]
            }
        }
    );
    assert_eq!(job_of(&*r.store, second[0]).event, ev[0]);
    r.sched.cancel(first[0]).unwrap();
    r.sched.settle().unwrap();
}

#[test]
fn job_05_priority_then_creation_and_strict_mode() {
    // One slot of client:a; j2 (priority 90) is first, j1 (created earlier, priority 10) next.
    let queue = Queue {
        requests: vec![
            req(1, 10, 0, vec![client("a")]),
            req(2, 90, 5, vec![client("a")]),
            req(3, 90, 1, vec![client("a")]),
        ],
    };
    let grants = grant(&queue, &Counters::new(), &Limits::default());
    let order: Vec<JobId> = grants.iter().map(Grant::job).collect();
    assert_eq!(order, vec![JobId(3), JobId(2), JobId(1)]);
    assert!(matches!(grants[0], Grant::Granted { .. }));
    assert!(matches!(grants[1], Grant::Waits { .. }));

    // The higher job is blocked on client:a; the lower one needs client:b only.
    let queue = Queue {
        requests: vec![
            req(1, 90, 0, vec![Resource::Global, client("a")]),
            req(2, 10, 1, vec![Resource::Global, client("b")]),
        ],
    };
    let counters = Counters::of_active([&[client("a")][..]]);
    let lax = grant(&queue, &counters, &Limits::default());
    assert!(matches!(lax[1], Grant::Granted { job: JobId(2), .. }));
    let strict = Limits {
        strict: true,
        ..Limits::default()
    };
    let held = grant(&queue, &counters, &strict);
    assert_eq!(
        held[1],
        Grant::Waits {
            job: JobId(2),
            on: WaitReason::Resources {
                names: vec!["client:a".into()]
            }
        }
    );
}

fn resource_strategy() -> impl Strategy<Value = Resource> {
    prop_oneof![
        Just(Resource::Global),
        (0..3u8).prop_map(|i| Resource::Plan(format!("p{i}"))),
        (0..3u8).prop_map(|i| Resource::Client(format!("c{i}"))),
        (0..2u8).prop_map(|i| Resource::Destination(format!("d{i}"))),
        (0..2u8).prop_map(|i| Resource::Table(format!("t{i}"))),
        (0..2u8).prop_map(|i| Resource::Run(format!("p{i}@20261201"))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// JOB-02: a broker pass never lets a resource exceed its limit, and what it grants is
    /// exactly the counters' growth: a refused request leaves every counter as it was.
    #[test]
    fn job_02_a_broker_pass_never_exceeds_a_limit_nor_counts_a_refused_request(
        active in prop::collection::vec(prop::collection::vec(resource_strategy(), 0..4), 0..6),
        queued in prop::collection::vec(
            (0..5i64, 0..100i64, prop::collection::vec(resource_strategy(), 0..5)), 0..12),
        max_jobs in 1..6u32,
        per_plan in 1..3u32,
        per_client in 1..3u32,
        strict in any::<bool>(),
    ) {
        let limits = Limits {
            max_jobs,
            max_jobs_per_plan: per_plan,
            max_jobs_per_client: per_client,
            max_jobs_per_destination: 2,
            max_jobs_per_table: 1,
            strict,
            ..Limits::default()
        };
        // Start from counters within the limits: only the active jobs that fit.
        let mut counters = Counters::new();
        for a in &active {
            let fits = a.iter().all(|r| counters.held(r) < limits.limit_of(r));
            if fits {
                counters.take(a);
            }
        }
        let queue = Queue {
            requests: queued
                .iter()
                .enumerate()
                .map(|(i, (p, c, r))| req(i as u64 + 1, *p, *c, r.clone()))
                .collect(),
        };
        let grants = grant(&queue, &counters, &limits);
        prop_assert_eq!(grants.len(), queue.requests.len());
        let mut after = counters.clone();
        for g in &grants {
            if let Grant::Granted { job, resources } = g {
                let asked = &queue.requests[(job.0 - 1) as usize].resources;
                for r in asked {
                    prop_assert!(resources.contains(r), "granted all of {:?}", asked);
                }
                after.take(resources);
            }
        }
        for (r, n) in after.iter() {
            prop_assert!(
                n <= limits.limit_of(r) || n == counters.held(r),
                "{} held {} > {}", r, n, limits.limit_of(r)
            );
        }
        // A job that waits on resources names only resources that are full after the pass
        // (or, strict, full for a job ahead of it).
        for g in &grants {
            if let Grant::Waits { on: WaitReason::Resources { names }, .. } = g {
                prop_assert!(!names.is_empty());
                for name in names {
                    let full = after
                        .iter()
                        .any(|(r, n)| r.to_string() == *name && n >= limits.limit_of(r));
                    prop_assert!(full, "{} is full", name);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The state machine and the scheduler.

#[test]
fn job_01_a_due_event_gives_a_queued_job_visible_before_grant() {
    let start = at("2026-12-01T12:00:00Z");
    let r = rig(start, Limits::default());
    let ev = setup_calendar(
        &*r.store,
        start,
        &[("evening", "0 20 * * *")],
        &[("evening", "db", 7)],
    );
    r.clock.set(at("2026-12-01T20:00:00Z"));
    let created = r.sched.calendar_pass().unwrap();
    assert_eq!(created.len(), 1);
    let j = job_of(&*r.store, created[0]);
    assert_eq!(j.id.to_string(), format!("j{}", created[0].0));
    assert_eq!(
        j.state,
        JobState::Queued {
            waiting_on: WaitReason::Broker
        }
    );
    assert_eq!(j.kind, JobKind::Backup { plan: "db".into() });
    assert_eq!(j.event, ev[0]);
    assert_eq!(j.priority, prio(7));
    assert_eq!(j.due_at, at("2026-12-01T20:00:00Z"));
    assert_eq!(j.backup_day, day("20261201"));
    assert_eq!(j.attempt, 1);
    // Visible to a reader of the store (`timezero jobs`) before any broker pass.
    let queued = r
        .store
        .jobs(&JobQuery {
            states: Some(vec![JobStateKind::Queued]),
            ..JobQuery::default()
        })
        .unwrap();
    assert_eq!(queued.len(), 1);
    assert!(r.work.log().is_empty());
    // The occurrence row names the job, and the event moved on.
    let occ = r.store.occurrences(&OccurrenceQuery::default()).unwrap();
    assert_eq!(occ.len(), 1);
    assert_eq!(occ[0].outcome, OccurrenceOutcome::Started(created[0]));
    let e = r.store.events().unwrap();
    let e = e.iter().find(|e| e.id == ev[0]).unwrap();
    assert_eq!(e.next_due, Some(at("2026-12-02T20:00:00Z")));
}

#[test]
fn job_04_active_on_grant_and_resources_released_whatever_the_end() {
    let start = at("2026-12-01T12:00:00Z");
    let r = rig(start, Limits::default());
    let ev = setup_calendar(&*r.store, start, &[("h", "0 * * * *")], &[("h", "a", 1)]);
    // Three jobs of three plans on one client (max 1 each): one ends by failure without retry,
    // one is canceled, the third then runs.
    let t = r.clock.now();
    let j1 = insert_job(&*r.store, ev[0], "a", t, "20261201");
    let j2 = insert_job(&*r.store, ev[0], "b", t + mins(1), "20261201");
    let j3 = insert_job(&*r.store, ev[0], "c", t + mins(2), "20261201");
    for p in ["a", "b", "c"] {
        r.work
            .set_needs(p, vec![client("dbhost")], Readiness::Ready);
    }
    r.work
        .script("a", vec![failed(JobReason::Plan("bad".into()))]);
    r.work.hold("b");
    assert_eq!(r.sched.broker_pass().unwrap(), vec![j1]);
    assert_eq!(job_of(&*r.store, j1).state.kind(), JobStateKind::Active);
    assert!(job_of(&*r.store, j1).started.is_some());
    assert_eq!(job_of(&*r.store, j1).owner.as_deref(), Some("test-daemon"));
    r.sched.settle().unwrap();
    assert_eq!(
        job_of(&*r.store, j1).state,
        JobState::Done {
            status: JobStatus::Failed,
            reason: Some(JobReason::Plan("bad".into()))
        }
    );
    assert_eq!(r.sched.broker_pass().unwrap(), vec![j2]);
    r.sched.cancel(j2).unwrap();
    r.sched.settle().unwrap();
    assert_eq!(
        job_of(&*r.store, j2).state,
        JobState::Canceled {
            reason: JobReason::CanceledByUser
        }
    );
    assert_eq!(r.sched.broker_pass().unwrap(), vec![j3]);
    r.sched.settle().unwrap();
    assert_eq!(job_of(&*r.store, j3).state.status_code(), Some(0));
}

#[test]
fn job_06_done_status_is_0_1_or_the_reason_code() {
    let t = at("2026-12-01T12:00:00Z");
    let mut job = JobRecord {
        id: JobId(1),
        kind: JobKind::Backup { plan: "p".into() },
        event: EventId(1),
        due_at: t,
        backup_day: day("20261201"),
        priority: prio(1),
        attempt: 1,
        state: JobState::Active {
            phase: Phase::Checks,
        },
        owner: Some("d".into()),
        plan_text: None,
        plan_sha256: None,
        progress: None,
        created: t,
        started: Some(t),
        ended: None,
        stop_requested: None,
    };
    let no_retry = RetryCount {
        started_in_window: 2,
        backup_attempts: 2,
        delay: mins(10),
    };
    let end = |job: &JobRecord, outcome: JobOutcome| -> JobState {
        let (changes, actions) = step(
            job,
            Event::Ended {
                outcome,
                retry: no_retry,
                at: t,
            },
        );
        assert!(actions.is_empty());
        match &changes[..] {
            [Change::Transition { to, from, .. }] => {
                assert_eq!(*from, JobStateKind::Active);
                to.clone()
            }
            other => panic!("one transition, got {other:?}"),
        }
    };
    assert_eq!(end(&job, success()).status_code(), Some(0));
    let partial = JobOutcome::Done {
        status: JobStatus::Partial,
        reason: Some(JobReason::HookExit(101)),
    };
    assert_eq!(end(&job, partial).status_code(), Some(1));
    assert_eq!(
        end(&job, failed(JobReason::Engine("x".into()))).status_code(),
        Some(17)
    );
    let skipped = JobOutcome::Done {
        status: JobStatus::Skipped,
        reason: Some(JobReason::OutsideWindow),
    };
    assert_eq!(end(&job, skipped).status_code(), Some(6));
    // An ended job ignores a late end.
    job.state = JobState::Done {
        status: JobStatus::Success,
        reason: None,
    };
    let (c, a) = step(
        &job,
        Event::Ended {
            outcome: success(),
            retry: no_retry,
            at: t,
        },
    );
    assert!(c.is_empty() && a.is_empty());
}

#[test]
fn job_07_a_failed_job_retries_after_the_delay_with_the_same_id() {
    let start = at("2026-12-01T12:00:00Z");
    let r = rig(start, Limits::default());
    let ev = setup_calendar(&*r.store, start, &[("h", "0 * * * *")], &[("h", "db", 1)]);
    r.work.script(
        "db",
        vec![
            failed(JobReason::HookTimedOut),
            failed(JobReason::HookTimedOut),
        ],
    );
    let j = insert_job(&*r.store, ev[0], "db", start, "20261201");
    r.sched.broker_pass().unwrap();
    r.sched.settle().unwrap();
    assert_eq!(
        job_of(&*r.store, j).state,
        JobState::WaitingForRetry {
            at: start + mins(10)
        }
    );
    r.clock.advance(mins(9));
    r.sched.tick().unwrap();
    assert_eq!(
        job_of(&*r.store, j).state.kind(),
        JobStateKind::WaitingForRetry
    );
    r.clock.advance(mins(1));
    r.sched.tick().unwrap();
    let again = job_of(&*r.store, j);
    assert_eq!((again.id, again.attempt), (j, 2));
    assert_eq!(again.state.kind(), JobStateKind::Active);
    r.sched.settle().unwrap();
    // Two attempts started within 12 h: no third.
    assert_eq!(
        job_of(&*r.store, j).state,
        JobState::Done {
            status: JobStatus::Failed,
            reason: Some(JobReason::HookTimedOut)
        }
    );
    assert_eq!(
        r.work.log(),
        vec![format!("run {j} attempt 1"), format!("run {j} attempt 2")]
    );

    // The rule itself: attempts left and a retryable reason → the delay; otherwise done.
    let job = JobRecord {
        state: JobState::Active {
            phase: Phase::Checks,
        },
        ..job_of(&*r.store, j)
    };
    let retry = |n, reason: JobReason| {
        step(
            &job,
            Event::Ended {
                outcome: failed(reason),
                retry: RetryCount {
                    started_in_window: n,
                    backup_attempts: 3,
                    delay: mins(25),
                },
                at: start,
            },
        )
        .0
    };
    assert!(matches!(
        &retry(2, JobReason::TargetBusy)[..],
        [Change::Transition { to: JobState::WaitingForRetry { at }, to_attempt: 2, .. }]
            if *at == start + mins(25)
    ));
    assert!(matches!(
        &retry(3, JobReason::TargetBusy)[..],
        [Change::Transition {
            to: JobState::Done { .. },
            ..
        }]
    ));
    assert!(matches!(
        &retry(1, JobReason::BackupsDisabled)[..],
        [Change::Transition {
            to: JobState::Done { .. },
            ..
        }]
    ));
}

#[test]
fn job_08_a_queued_job_whose_window_closes_is_canceled() {
    let start = at("2026-12-01T12:00:00Z");
    let r = rig(start, Limits::default());
    let ev = setup_calendar(&*r.store, start, &[("h", "0 * * * *")], &[("h", "db", 1)]);
    let j = insert_job(&*r.store, ev[0], "db", start, "20261201");
    r.work.set_needs("db", Vec::new(), Readiness::WaitWindow);
    r.sched.broker_pass().unwrap();
    assert_eq!(
        job_of(&*r.store, j).state,
        JobState::Queued {
            waiting_on: WaitReason::Window
        }
    );
    r.work.set_needs("db", Vec::new(), Readiness::WindowClosed);
    r.sched.broker_pass().unwrap();
    let done = job_of(&*r.store, j);
    assert_eq!(
        done.state,
        JobState::Canceled {
            reason: JobReason::WindowClosed
        }
    );
    assert_eq!(done.state.status_code(), Some(3));
    assert!(done.ended.is_some());
    assert!(r.work.log().is_empty());
}

#[test]
fn job_09_recovery_resumes_past_the_cut_and_fails_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orchestration.sqlite");
    let start = at("2026-12-01T12:00:00Z");
    let (before, after, alive_job) = {
        let store = SqliteStore::open(&path).unwrap();
        let ev = setup_calendar(&store, start, &[("h", "0 * * * *")], &[("h", "db", 1)]);
        let before = insert_job(&store, ev[0], "a", start, "20261201");
        let after = insert_job(&store, ev[0], "b", start, "20261201");
        let alive_job = insert_job(&store, ev[0], "c", start, "20261201");
        let pre = Phase::Task {
            index: 1,
            step: TaskStep::Pre,
        };
        let copy = Phase::Task {
            index: 1,
            step: TaskStep::Copy,
        };
        force(
            &store,
            before,
            JobState::Active { phase: pre },
            Some("dead"),
            start,
        );
        force(
            &store,
            after,
            JobState::Active { phase: copy },
            Some("dead"),
            start,
        );
        force(
            &store,
            alive_job,
            JobState::Active { phase: pre },
            Some("alive"),
            start,
        );
        (before, after, alive_job)
        // The store is dropped here: the daemon is gone.
    };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let r = rig_with(store, start + mins(5), Limits::default(), NewdayAbort::All);
    let alive = |o: &str| o == "alive";
    let mut taken = r.sched.recover(&alive).unwrap();
    taken.sort();
    assert_eq!(taken, vec![before, after]);
    // Before the cut: failed DaemonRestarted, then the retry rule (one attempt of two used).
    assert_eq!(
        job_of(&*r.store, before).state,
        JobState::WaitingForRetry {
            at: start + mins(15)
        }
    );
    // Past the cut: same attempt, owned by the new instance, resumed.
    let a = job_of(&*r.store, after);
    assert_eq!(a.attempt, 1);
    assert_eq!(a.owner.as_deref(), Some("test-daemon"));
    r.sched.settle().unwrap();
    assert_eq!(r.work.log(), vec![format!("resume {after} attempt 1")]);
    assert_eq!(job_of(&*r.store, after).state.status_code(), Some(0));
    assert_eq!(
        job_of(&*r.store, alive_job).state.kind(),
        JobStateKind::Active
    );
    // A second recovery takes nothing over: no attempt runs twice.
    assert!(r.sched.recover(&alive).unwrap().is_empty());
    // With one attempt allowed, a job before its cut ends Failed DaemonRestarted(phase).
    let t = job_of(&*r.store, alive_job);
    let (c, _) = step(
        &t,
        Event::OwnerDead {
            owner: "x".into(),
            retry: RetryCount {
                started_in_window: 1,
                backup_attempts: 1,
                delay: mins(10),
            },
            at: start,
        },
    );
    assert!(matches!(
        &c[..],
        [Change::Transition {
            to: JobState::Done {
                status: JobStatus::Failed,
                reason: Some(JobReason::DaemonRestarted(Phase::Task {
                    index: 1,
                    step: TaskStep::Pre
                }))
            },
            ..
        }]
    ));
    // The owner text of this process is alive; a made-up one is not.
    assert!(owner_alive(&owner_of_this_process()));
    assert!(!owner_alive("pid 1 start 0 boot nope"));
    assert!(!owner_alive("dead"));
}

#[test]
fn job_11_cancel_queued_at_once_and_active_through_its_work() {
    let start = at("2026-12-01T12:00:00Z");
    let r = rig(start, Limits::default());
    let ev = setup_calendar(&*r.store, start, &[("h", "0 * * * *")], &[("h", "db", 1)]);
    let q = insert_job(&*r.store, ev[0], "q", start, "20261201");
    r.work.set_needs("q", Vec::new(), Readiness::WaitStartTime);
    let a = insert_job(&*r.store, ev[0], "a", start, "20261201");
    r.work.hold("a");
    r.sched.broker_pass().unwrap();
    assert!(r.sched.cancel(q).unwrap());
    assert_eq!(
        job_of(&*r.store, q).state,
        JobState::Canceled {
            reason: JobReason::CanceledByUser
        }
    );
    assert!(r.sched.cancel(a).unwrap());
    r.sched.settle().unwrap();
    assert_eq!(
        job_of(&*r.store, a).state,
        JobState::Canceled {
            reason: JobReason::CanceledByUser
        }
    );
    // The stop may reach the work before or after its run began.
    let mut log = r.work.log();
    log.sort();
    assert_eq!(
        log,
        vec![
            format!("run {a} attempt 1"),
            format!("stop {a} attempt 1 CanceledByUser")
        ]
    );
    // An ended job is not canceled again.
    assert!(!r.sched.cancel(a).unwrap());
}

#[test]
fn job_11_a_stop_request_recorded_elsewhere_reaches_the_running_scheduler() {
    let start = at("2026-12-01T12:00:00Z");
    let r = rig(start, Limits::default());
    let ev = setup_calendar(&*r.store, start, &[("h", "0 * * * *")], &[("h", "db", 1)]);
    let a = insert_job(&*r.store, ev[0], "a", start, "20261201");
    r.work.hold("a");
    r.sched.broker_pass().unwrap();
    // Another process (`jobs cancel`) records the request; it does not reach the work itself.
    let job = job_of(&*r.store, a);
    let (changes, actions) = step(&job, Event::Cancel { at: start });
    assert_eq!(actions.len(), 1);
    r.store.commit(changes.clone()).unwrap();
    // Asking twice keeps the first request.
    r.store.commit(changes).unwrap();
    let job = job_of(&*r.store, a);
    assert_eq!(job.state.kind(), JobStateKind::Active);
    let request = job.stop_requested.expect("the request is recorded");
    assert_eq!(
        (request.attempt, request.reason, request.at),
        (1, JobReason::CanceledByUser, start)
    );
    // The scheduler running the attempt passes it on at its next tick, once.
    r.sched.tick().unwrap();
    r.sched.tick().unwrap();
    r.sched.settle().unwrap();
    assert_eq!(
        job_of(&*r.store, a).state,
        JobState::Canceled {
            reason: JobReason::CanceledByUser
        }
    );
    let stops = r
        .work
        .log()
        .iter()
        .filter(|l| l.starts_with("stop"))
        .count();
    assert_eq!(stops, 1);
    // A request for a job that is not active is refused by the store.
    let (changes, _) = step(&job_of(&*r.store, a), Event::Cancel { at: start });
    assert!(changes.is_empty());
    let refused = r.store.commit(vec![Change::RequestStop {
        job: a,
        attempt: 1,
        reason: JobReason::CanceledByUser,
        at: start,
    }]);
    assert!(matches!(
        refused,
        Err(crate::store::StoreError::Conflict { .. })
    ));
}

#[test]
fn job_11_an_attempt_asked_to_stop_that_fails_ends_canceled_not_retried() {
    let start = at("2026-12-01T12:00:00Z");
    let r = rig(start, Limits::default());
    let ev = setup_calendar(&*r.store, start, &[("h", "0 * * * *")], &[("h", "db", 1)]);
    let a = insert_job(&*r.store, ev[0], "a", start, "20261201");
    force(
        &*r.store,
        a,
        JobState::Active {
            phase: Phase::Checks,
        },
        Some("x"),
        start,
    );
    let (changes, _) = step(&job_of(&*r.store, a), Event::Cancel { at: start });
    r.store.commit(changes).unwrap();
    let retry = RetryCount {
        started_in_window: 1,
        backup_attempts: 2,
        delay: mins(10),
    };
    let (changes, _) = step(
        &job_of(&*r.store, a),
        Event::Ended {
            outcome: failed(JobReason::HookExit(3)),
            retry,
            at: start,
        },
    );
    r.store.commit(changes).unwrap();
    assert_eq!(
        job_of(&*r.store, a).state,
        JobState::Canceled {
            reason: JobReason::CanceledByUser
        }
    );
}

#[test]
fn job_12_two_attempts_of_one_plan_and_backup_day_are_never_active_together() {
    let start = at("2026-12-01T12:00:00Z");
    let r = rig(start, Limits::default());
    let ev = setup_calendar(
        &*r.store,
        start,
        &[("h", "0 * * * *")],
        &[("h", "db", 1), ("h", "db", 2)],
    );
    r.work.hold("db");
    let j1 = insert_job(&*r.store, ev[0], "db", start, "20261201");
    let j2 = insert_job(&*r.store, ev[1], "db", start + mins(1), "20261201");
    let j3 = insert_job(&*r.store, ev[1], "db", start + mins(2), "20261202");
    let started = r.sched.broker_pass().unwrap();
    assert_eq!(started, vec![j1, j3]);
    assert_eq!(
        job_of(&*r.store, j2).state,
        JobState::Queued {
            waiting_on: WaitReason::Resources {
                names: vec!["run:db@20261201".into()]
            }
        }
    );
    // Once j1 ended, j2 gets its turn.
    r.sched.cancel(j1).unwrap();
    r.sched.cancel(j3).unwrap();
    r.sched.settle().unwrap();
    r.work.held.lock().clear();
    assert_eq!(r.sched.broker_pass().unwrap(), vec![j2]);
    r.sched.settle().unwrap();
    assert_eq!(job_of(&*r.store, j2).state.status_code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// Calendar ids carried by the job layer.

#[test]
fn cal_03_an_immediate_start_is_a_one_time_event() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("orchestration.sqlite")).unwrap());
    let start = at("2026-12-01T12:00:00.123456Z");
    let r = rig_with(store, start, Limits::default(), NewdayAbort::All);
    let ev = setup_calendar(
        &*r.store,
        start,
        &[("evening", "0 20 * * *")],
        &[("evening", "db", 50)],
    );
    let posted = r.sched.post_immediate("db", None).unwrap();
    let j = job_of(&*r.store, posted.job().expect("priority 0 always runs"));
    assert_eq!(j.priority, Priority::ALWAYS);
    assert_eq!(j.event, posted.event);
    assert_eq!(j.kind, JobKind::Backup { plan: "db".into() });
    assert_eq!(j.due_at, at("2026-12-01T12:00:00.123Z"));
    let e = r.store.events().unwrap();
    let e = e.iter().find(|e| e.id == posted.event).unwrap();
    assert_eq!(e.next_due, None, "a one-time event has no next occurrence");
    // With a priority below the evening event's, the same plan is suppressed that day.
    let low = r.sched.post_immediate("db", Some(prio(3))).unwrap();
    assert_eq!(
        low.outcome,
        Some(OccurrenceOutcome::Suppressed { by: ev[0] })
    );
    assert_eq!(low.job(), None);
    let high = r.sched.post_immediate("other", Some(prio(3))).unwrap();
    assert_eq!(job_of(&*r.store, high.job().unwrap()).priority, prio(3));
    // Every job has an event row.
    let events: Vec<EventId> = r.store.events().unwrap().iter().map(|e| e.id).collect();
    for j in r.store.jobs(&JobQuery::default()).unwrap() {
        assert!(events.contains(&j.event));
    }
}

fn newday_case(abort: NewdayAbort) -> (Vec<String>, BTreeMap<&'static str, JobState>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("orchestration.sqlite")).unwrap());
    let start = at("2026-12-01T20:00:00Z");
    let r = rig_with(store, start, Limits::default(), abort);
    let ev = setup_calendar(&*r.store, start, &[("h", "0 * * * *")], &[("h", "db", 1)]);
    let s = &*r.store;
    let queued = insert_job(s, ev[0], "q", start, "20261201");
    let waiting = insert_job(s, ev[0], "w", start, "20261201");
    force(
        s,
        waiting,
        JobState::WaitingForRetry {
            at: start + mins(10),
        },
        None,
        start,
    );
    let uncut = insert_job(s, ev[0], "u", start, "20261201");
    force(
        s,
        uncut,
        JobState::Active {
            phase: Phase::PlanPre,
        },
        Some("test-daemon"),
        start,
    );
    let cut = insert_job(s, ev[0], "c", start, "20261201");
    force(
        s,
        cut,
        JobState::Active {
            phase: Phase::Task {
                index: 1,
                step: TaskStep::Copy,
            },
        },
        Some("test-daemon"),
        start,
    );
    let next_day = insert_job(s, ev[0], "n", start, "20261202");
    r.clock.set(at("2026-12-02T08:00:00Z"));
    r.sched.calendar_pass().unwrap();
    let states = BTreeMap::from([
        ("queued", job_of(s, queued).state),
        ("waiting", job_of(s, waiting).state),
        ("uncut", job_of(s, uncut).state),
        ("cut", job_of(s, cut).state),
        ("next_day", job_of(s, next_day).state),
    ]);
    let mut log = r.work.log();
    for id in [uncut, cut] {
        log = log
            .into_iter()
            .map(|l| l.replace(&id.to_string(), if id == uncut { "U" } else { "C" }))
            .collect();
    }
    (log, states)
}

#[test]
fn cal_14_newday_cancels_pending_work_and_aborts_running_jobs() {
    let newday = JobState::Canceled {
        reason: JobReason::Newday,
    };
    let (log, states) = newday_case(NewdayAbort::All);
    assert_eq!(states["queued"], newday);
    assert_eq!(states["waiting"], newday);
    assert_eq!(states["queued"].status_code(), Some(4));
    assert_eq!(states["next_day"].kind(), JobStateKind::Queued);
    // Running jobs are told to stop, as `jobs cancel` does; they end when their work returns.
    assert_eq!(states["uncut"].kind(), JobStateKind::Active);
    assert_eq!(
        log,
        vec![
            "stop U attempt 1 Newday".to_string(),
            "stop C attempt 1 Newday".to_string()
        ]
    );
    let (log, states) = newday_case(NewdayAbort::Uncut);
    assert_eq!(states["queued"], newday);
    assert_eq!(log, vec!["stop U attempt 1 Newday".to_string()]);
}

/// Every (event, occurrence) due up to `end` has exactly one row; every started one exactly one
/// job naming it; no job without its row.
fn check_exactly_once(store: &dyn Store, start: Timestamp, end: Timestamp) {
    let schedules: BTreeMap<String, Schedule> = store
        .schedules()
        .unwrap()
        .into_iter()
        .map(|s| {
            let p = Schedule::parse(&s.name, &s.expr, jiff::tz::TimeZone::UTC).unwrap();
            (s.name, p)
        })
        .collect();
    let occ = store.occurrences(&OccurrenceQuery::default()).unwrap();
    let jobs = store.jobs(&JobQuery::default()).unwrap();
    let mut started = 0;
    for e in store.events().unwrap() {
        if e.kind == EventKind::Newday {
            continue;
        }
        let s = &schedules[&e.schedule];
        let mut expected = Vec::new();
        let mut t = start;
        while let Some(n) = s.next_after(t).filter(|n| *n <= end) {
            expected.push(n);
            t = n;
        }
        let rows: Vec<&OccurrenceRow> = occ.iter().filter(|o| o.event == e.id).collect();
        let dues: Vec<Timestamp> = rows.iter().map(|o| o.due).collect();
        assert_eq!(dues, expected, "event {} has one row per occurrence", e.id);
        for o in rows {
            if let OccurrenceOutcome::Started(j) = o.outcome {
                started += 1;
                let matching: Vec<&JobRecord> = jobs.iter().filter(|x| x.id == j).collect();
                assert_eq!(matching.len(), 1);
                assert_eq!((matching[0].event, matching[0].due_at), (o.event, o.due));
            }
        }
    }
    assert_eq!(jobs.len(), started, "no job without its occurrence");
}

#[test]
fn cal_19_exactly_once_across_restarts_at_random_points() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orchestration.sqlite");
    let start = at("2026-12-01T10:00:00Z");
    {
        let store = SqliteStore::open(&path).unwrap();
        setup_calendar(
            &store,
            start,
            &[
                ("q", "*/20 * * * *"),
                ("h", "0 * * * *"),
                ("eve", "0 20 * * *"),
            ],
            &[("q", "a", 1), ("h", "b", 1), ("eve", "b", 5), ("h", "c", 0)],
        );
    }
    let clock = ManualClock::new(start);
    let mut rng = SmallRng::seed_from_u64(19);
    let work = Arc::new(FakeWork::default());
    let open = |clock: &ManualClock| {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        Scheduler::new(
            store,
            Arc::new(clock.clone()),
            Arc::clone(&work) as Arc<dyn JobWork>,
            Limits::default(),
            NewdaySettings::default(),
            "test-daemon".to_string(),
        )
    };
    let mut sched = Some(open(&clock));
    for _ in 0..40 {
        // Minute steps, hour steps, and now and then a jump over several hours (downtime).
        let by = match rng.random_range(0..10) {
            0 => rng.random_range(120..900),
            1..=4 => rng.random_range(1..20),
            _ => rng.random_range(20..90),
        };
        clock.advance(mins(by));
        if rng.random_range(0..3) == 0 {
            // A restart: the scheduler and its store are dropped, a new one opens the file.
            sched = None;
        }
        let s = sched.get_or_insert_with(|| open(&clock));
        s.calendar_pass().unwrap();
        if rng.random_range(0..4) == 0 {
            // Another instance on the same file at the same instant decides nothing new.
            let other = open(&clock);
            assert!(other.calendar_pass().unwrap().is_empty());
        }
    }
    drop(sched);
    let store = SqliteStore::open(&path).unwrap();
    check_exactly_once(&store, start, clock.now());
    let jobs = store.jobs(&JobQuery::default()).unwrap();
    assert!(!jobs.is_empty());
}

#[test]
fn cal_19_two_schedulers_on_one_file_start_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orchestration.sqlite");
    let start = at("2026-12-01T10:00:00Z");
    let first: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    setup_calendar(&*first, start, &[("h", "0 * * * *")], &[("h", "db", 1)]);
    let second: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let a = rig_with(first, start, Limits::default(), NewdayAbort::All);
    let b = rig_with(second, start, Limits::default(), NewdayAbort::All);
    a.clock.advance(mins(60));
    b.clock.advance(mins(60));
    // Both read the calendar before either commits and decide the same.
    let view_a = a.sched.view().unwrap();
    let view_b = b.sched.view().unwrap();
    let decided_b = crate::calendar::decide(&view_b, b.clock.now());
    assert_eq!(crate::calendar::decide(&view_a, a.clock.now()), decided_b);
    let made_a = a.sched.calendar_pass().unwrap();
    assert_eq!(made_a.len(), 1);
    // What b decided from its stale view no longer applies: the event's advance is a
    // compare-and-set, and the occurrence is recorded once.
    let stale: Vec<Change> = decided_b
        .iter()
        .filter_map(|d| match *d {
            crate::calendar::Decision::Advance { event, from, to } => {
                Some(Change::AdvanceEvent { event, from, to })
            }
            _ => None,
        })
        .collect();
    assert!(matches!(
        b.store.commit(stale),
        Err(crate::store::StoreError::Conflict { .. })
    ));
    // b's own pass reads again and finds nothing left to do.
    assert!(b.sched.calendar_pass().unwrap().is_empty());
    check_exactly_once(&*a.store, start, a.clock.now());
}

#[test]
fn next_wake_is_the_earliest_due_event_or_retry() {
    let start = at("2026-12-01T12:00:00Z");
    let r = rig(start, Limits::default());
    assert_eq!(r.sched.next_wake().unwrap(), None);
    let ev = setup_calendar(
        &*r.store,
        start,
        &[("evening", "0 20 * * *")],
        &[("evening", "db", 7)],
    )[0];
    assert_eq!(
        r.sched.next_wake().unwrap(),
        Some(at("2026-12-01T20:00:00Z"))
    );
    // A job waiting for its retry wakes the scheduler at the end of its delay.
    let j = insert_job(&*r.store, ev, "db", start, "20261201");
    let retry_at = at("2026-12-01T12:10:00Z");
    force(
        &*r.store,
        j,
        JobState::WaitingForRetry { at: retry_at },
        None,
        start,
    );
    assert_eq!(r.sched.next_wake().unwrap(), Some(retry_at));
}

#[test]
fn immediate_only_starts_posted_runs_and_leaves_scheduled_events_due() {
    let start = at("2026-12-01T12:00:00Z");
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let r = rig_with(
        Arc::clone(&store),
        start,
        Limits::default(),
        NewdayAbort::All,
    );
    let sched = r.sched.immediate_only();
    let ev = setup_calendar(
        &*store,
        start,
        &[("evening", "0 20 * * *")],
        &[("evening", "db", 7)],
    );
    // The scheduled event is not among the wake-ups; NEWDAY (08:00 next day) is.
    assert_eq!(sched.next_wake().unwrap(), Some(at("2026-12-02T08:00:00Z")));
    r.clock.set(at("2026-12-01T20:30:00Z"));
    assert!(sched.tick().unwrap().is_empty());
    let posted = sched.post_immediate("web", None).unwrap();
    let job = posted.job().expect("the immediate run started a job");
    sched.settle().unwrap();
    let jobs = store.jobs(&JobQuery::default()).unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, job);
    assert_eq!(jobs[0].kind, JobKind::Backup { plan: "web".into() });
    // The scheduled event still waits at its occurrence, untouched.
    let e = store.events().unwrap();
    let e = e.iter().find(|e| e.id == ev[0]).unwrap();
    assert_eq!(e.next_due, Some(at("2026-12-01T20:00:00Z")));
}

// ---------------------------------------------------------------------------------------------
// The durable transactions of a due tick.

/// A store that counts the transactions it is asked for and, when told to, lets another caller
/// take the next job id just before the next list that reserves job ids commits.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn Store>,
    commits: std::sync::atomic::AtomicUsize,
    allocations: std::sync::atomic::AtomicUsize,
    take_next_job_id: std::sync::atomic::AtomicBool,
}

impl Counting {
    fn new(inner: Arc<dyn Store>) -> Counting {
        Counting {
            inner,
            commits: 0.into(),
            allocations: 0.into(),
            take_next_job_id: false.into(),
        }
    }

    /// Transactions so far (commits and allocations), and how many were commits.
    fn transactions(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        let commits = self.commits.load(SeqCst);
        (commits + self.allocations.load(SeqCst), commits)
    }
}

impl Store for Counting {
    fn commit(&self, changes: Vec<Change>) -> Result<(), crate::store::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let reserves = changes.iter().any(|c| {
            matches!(
                c,
                Change::ReserveIds {
                    kind: IdKind::Job,
                    ..
                }
            )
        });
        if reserves && self.take_next_job_id.swap(false, SeqCst) {
            self.inner.allocate(IdKind::Job)?;
        }
        self.commits.fetch_add(1, SeqCst);
        self.inner.commit(changes)
    }
    fn allocate(&self, kind: IdKind) -> Result<u64, crate::store::StoreError> {
        self.allocations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.allocate(kind)
    }
    fn allocate_many(&self, kind: IdKind, n: usize) -> Result<Vec<u64>, crate::store::StoreError> {
        self.allocations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.allocate_many(kind, n)
    }
    fn next_id(&self, kind: IdKind) -> Result<u64, crate::store::StoreError> {
        self.inner.next_id(kind)
    }
    fn calendar_generation(&self) -> Result<u64, crate::store::StoreError> {
        self.inner.calendar_generation()
    }
    fn jobs(&self, q: &JobQuery) -> Result<Vec<JobRecord>, crate::store::StoreError> {
        self.inner.jobs(q)
    }
    fn job(&self, id: JobId) -> Result<Option<JobRecord>, crate::store::StoreError> {
        self.inner.job(id)
    }
    fn tasks(&self, job: JobId) -> Result<Vec<crate::store::TaskRecord>, crate::store::StoreError> {
        self.inner.tasks(job)
    }
    fn hook_runs(
        &self,
        job: JobId,
    ) -> Result<Vec<crate::store::HookRunRecord>, crate::store::StoreError> {
        self.inner.hook_runs(job)
    }
    fn schedules(&self) -> Result<Vec<ScheduleRow>, crate::store::StoreError> {
        self.inner.schedules()
    }
    fn events(&self) -> Result<Vec<EventRow>, crate::store::StoreError> {
        self.inner.events()
    }
    fn events_due_by(&self, t: Timestamp) -> Result<Vec<EventRow>, crate::store::StoreError> {
        self.inner.events_due_by(t)
    }
    fn occurrences(
        &self,
        q: &OccurrenceQuery,
    ) -> Result<Vec<OccurrenceRow>, crate::store::StoreError> {
        self.inner.occurrences(q)
    }
    fn images(
        &self,
        q: &crate::store::ImageQuery,
    ) -> Result<Vec<crate::store::ImageRecord>, crate::store::StoreError> {
        self.inner.images(q)
    }
    fn image(
        &self,
        id: crate::store::ImageId,
    ) -> Result<Option<crate::store::ImageRecord>, crate::store::StoreError> {
        self.inner.image(id)
    }
    fn open_intents(&self) -> Result<Vec<crate::store::Intent>, crate::store::StoreError> {
        self.inner.open_intents()
    }
    fn open_leases(&self) -> Result<Vec<crate::store::Lease>, crate::store::StoreError> {
        self.inner.open_leases()
    }
    fn trim_history(
        &self,
        before: BackupDay,
    ) -> Result<crate::store::Trimmed, crate::store::StoreError> {
        self.inner.trim_history(before)
    }
}

#[test]
fn job_03_a_due_tick_writes_its_new_jobs_and_what_they_wait_on_in_one_transaction() {
    let start = at("2026-12-01T12:00:00Z");
    let dir = tempfile::tempdir().unwrap();
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("o.sqlite")).unwrap());
    let counting = Arc::new(Counting::new(sqlite));
    let r = rig_with(
        Arc::clone(&counting) as Arc<dyn Store>,
        start,
        Limits::default(),
        NewdayAbort::All,
    );
    setup_calendar(
        &*r.store,
        start,
        &[("evening", "0 20 * * *")],
        &[("evening", "db", 7), ("evening", "web", 3)],
    );
    r.work.set_needs("db", Vec::new(), Readiness::WaitStartTime);
    r.work.set_needs("web", Vec::new(), Readiness::WaitWindow);
    r.clock.set(at("2026-12-01T20:00:00Z"));
    let before = counting.transactions();
    let created = r.sched.tick().unwrap();
    let after = counting.transactions();
    assert_eq!(created.len(), 2);
    // One transaction: the ids, the jobs with their occurrences and wait reasons, the advance.
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1));
    let waits: Vec<JobState> = created
        .iter()
        .map(|j| job_of(&*r.store, *j).state)
        .collect();
    assert!(waits.contains(&JobState::Queued {
        waiting_on: WaitReason::StartTime
    }));
    assert!(waits.contains(&JobState::Queued {
        waiting_on: WaitReason::Window
    }));
    // The broker's next pass agrees and records nothing.
    r.sched.broker_pass().unwrap();
    assert_eq!(counting.transactions(), after);
    // A job that is ready is left to the broker, which starts it in a transaction of its own.
    r.work.set_needs("db", Vec::new(), Readiness::Ready);
    r.sched.broker_pass().unwrap();
    r.sched.settle().unwrap();
    let db = created
        .iter()
        .map(|j| job_of(&*r.store, *j))
        .find(|j| j.kind.plan() == Some("db"))
        .unwrap();
    assert_eq!(db.state.kind(), JobStateKind::Done);
}

#[test]
fn cal_19_a_pass_whose_job_ids_were_taken_meanwhile_reads_again_and_starts_once() {
    let start = at("2026-12-01T12:00:00Z");
    let counting = Arc::new(Counting::new(Arc::new(MemStore::new())));
    let r = rig_with(
        Arc::clone(&counting) as Arc<dyn Store>,
        start,
        Limits::default(),
        NewdayAbort::All,
    );
    setup_calendar(
        &*r.store,
        start,
        &[("evening", "0 20 * * *")],
        &[("evening", "db", 7)],
    );
    r.clock.set(at("2026-12-01T20:00:00Z"));
    // Another caller takes the id the pass read, between its read and its commit.
    let taken = r.store.next_id(IdKind::Job).unwrap();
    counting
        .take_next_job_id
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let created = r.sched.calendar_pass().unwrap();
    assert_eq!(created.len(), 1);
    assert_ne!(
        created[0],
        JobId(taken),
        "the taken id is not handed out twice"
    );
    assert_eq!(r.store.jobs(&JobQuery::default()).unwrap().len(), 1);
    check_exactly_once(&*r.store, start, r.clock.now());
}
