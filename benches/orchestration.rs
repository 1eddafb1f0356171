//! Criterion benchmarks of the orchestration layers at scale: 10,000 events on 2,000 schedules
//! and 1,000 queued jobs in a `SqliteStore` in a temporary directory. One scheduler tick with
//! nothing due (the due events read, the retry pass and a broker pass), one broker pass alone,
//! a calendar pass at an instant with due occurrences (the whole calendar read, the view built,
//! `decide`; not committed), a whole tick at the next instant where something is due (a
//! scheduler that has run before, clock moved from one due minute to the next; the jobs it
//! creates are cancelled outside the measured time), and `schedule due --at` (the calendar read, the view built,
//! `due_at`), also `due_at` alone on a built view.
//!
//! Run with `cargo bench --bench orchestration`. Figures: docs/benchmarks.md.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, reason = "a benchmark set-up fails loudly")]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use jiff::Timestamp;
use timezero::calendar::{self, due_at, CalendarView, Schedule};
use timezero::clock::{Clock, ManualClock};
use timezero::job::{
    calendar_records, JobOutcome, JobWork, Limits, Needs, NewdaySettings, Readiness, Scheduler,
};
use timezero::store::{
    Change, EventId, EventKind, EventRow, IdKind, JobId, JobKind, JobReason, JobRecord, JobState,
    JobStatus, OccurrenceOutcome, OccurrenceRow, Priority, ScheduleRow, SqliteStore, Store,
    WaitReason,
};

const SCHEDULES: usize = 2_000;
const EVENTS: usize = 10_000;
const JOBS: usize = 1_000;
const ZONE: &str = "Europe/Berlin";

/// Work whose jobs wait for their start time: every broker pass looks at all of them, none
/// starts, so every pass does the same work.
struct Waiting;

impl JobWork for Waiting {
    fn needs(&self, _job: &JobRecord, _now: Timestamp) -> Needs {
        Needs {
            resources: Vec::new(),
            readiness: Readiness::WaitStartTime,
        }
    }

    fn run(&self, _job: &JobRecord, _clock: &dyn Clock) -> JobOutcome {
        JobOutcome::Done {
            status: JobStatus::Success,
            reason: None,
        }
    }

    fn resume(&self, job: &JobRecord, clock: &dyn Clock) -> JobOutcome {
        self.run(job, clock)
    }

    fn stop(&self, _job: JobId, _attempt: u32, _reason: &JobReason) {}
}

/// The `i`th schedule's cron expression: minutes and hours spread over the day, some weekly,
/// some monthly.
fn expr(i: usize) -> String {
    let (m, h) = (i % 60, (i / 60) % 24);
    match i % 4 {
        0 | 1 => format!("{m} {h} * * *"),
        2 => format!("{m} {h} * * {}", i % 7),
        _ => format!("{m} {h} L * *"),
    }
}

/// The store: NEWDAY, the schedules, the events (five per schedule, plans shared by 20 events,
/// priorities 1..=9), the queued jobs with their occurrences.
fn fill(store: &SqliteStore, now: Timestamp) -> Timestamp {
    let zone = jiff::tz::TimeZone::get(ZONE).unwrap();
    let mut changes = vec![Change::PutSchedule {
        schedule: ScheduleRow {
            name: calendar::NEWDAY_SCHEDULE.to_string(),
            expr: "0 8 * * *".to_string(),
            zone: ZONE.to_string(),
            enabled: true,
        },
        replace: false,
    }];
    let newday = calendar::default_newday_schedule(zone.clone());
    changes.push(Change::PutEvent {
        event: EventRow {
            id: EventId(store.allocate(IdKind::Event).unwrap()),
            name: "NEWDAY".to_string(),
            schedule: calendar::NEWDAY_SCHEDULE.to_string(),
            kind: EventKind::Newday,
            priority: Priority::ALWAYS,
            blocking: false,
            enabled: true,
            next_due: newday.next_after(now),
        },
        replace: false,
    });
    let mut schedules = Vec::new();
    for i in 0..SCHEDULES {
        let s = Schedule::parse(&format!("s{i}"), &expr(i), zone.clone()).unwrap();
        changes.push(Change::PutSchedule {
            schedule: ScheduleRow {
                name: s.name.clone(),
                expr: expr(i),
                zone: ZONE.to_string(),
                enabled: true,
            },
            replace: false,
        });
        schedules.push(s);
    }
    let mut events = Vec::new();
    for i in 0..EVENTS {
        let s = &schedules[i % SCHEDULES];
        let id = EventId(store.allocate(IdKind::Event).unwrap());
        events.push(id);
        changes.push(Change::PutEvent {
            event: EventRow {
                id,
                name: format!("ev{i}"),
                schedule: s.name.clone(),
                kind: EventKind::Plan {
                    plan: format!("plan{}", i % (EVENTS / 20)),
                },
                priority: Priority::new(i64::try_from(1 + i % 9).unwrap()).unwrap(),
                blocking: i % 500 == 0,
                enabled: true,
                next_due: s.next_after(now),
            },
            replace: false,
        });
    }
    store.commit(changes).unwrap();
    let mut changes = Vec::new();
    for i in 0..JOBS {
        let id = JobId(store.allocate(IdKind::Job).unwrap());
        let event = events[i * (EVENTS / JOBS)];
        let due = Timestamp::from_second(now.as_second() - 60 - i64::try_from(i).unwrap()).unwrap();
        let backup_day = timezero::store::BackupDay(due.to_zoned(zone.clone()).date());
        changes.push(Change::InsertJob {
            job: JobRecord {
                id,
                kind: JobKind::Backup {
                    plan: format!("plan{}", i % (EVENTS / 20)),
                },
                event,
                due_at: due,
                backup_day,
                priority: Priority::new(1).unwrap(),
                attempt: 1,
                state: JobState::Queued {
                    waiting_on: WaitReason::StartTime,
                },
                owner: None,
                plan_text: None,
                plan_sha256: None,
                progress: None,
                created: due,
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
        });
    }
    store.commit(changes).unwrap();
    // An instant with occurrences: schedule 0's next one.
    schedules[0].next_after(now).unwrap()
}

/// Ticks at successive instants where something is due: a second store filled alike, a
/// scheduler that already decided the first due instant (so it runs as a daemon's does, with the
/// calendar read once), then per iteration the clock moved to the next due instant (untimed),
/// one tick (timed), and the jobs it created cancelled (untimed), so the queue stays at 1,000.
fn tick_at_due_instants(c: &mut Criterion, dir: &std::path::Path, now: Timestamp) {
    let store = Arc::new(SqliteStore::open(dir.join("due.sqlite")).unwrap());
    fill(&store, now);
    let clock = Arc::new(ManualClock::new(now));
    let scheduler = Scheduler::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::clone(&clock) as Arc<dyn Clock>,
        Arc::new(Waiting),
        Limits::default(),
        NewdaySettings::default(),
        "bench".to_string(),
    );
    let step = |timed: &mut Duration| {
        let next = scheduler.next_wake().unwrap().unwrap();
        clock.set(next);
        let t = Instant::now();
        let created = scheduler.tick().unwrap();
        *timed += t.elapsed();
        // The tick decided the instant: the next wake-up lies after it.
        assert!(scheduler.next_wake().unwrap().is_some_and(|w| w > next));
        for j in created {
            scheduler.cancel(j).unwrap();
        }
    };
    let mut untimed = Duration::ZERO;
    step(&mut untimed);
    let mut g = c.benchmark_group("orchestration");
    g.sample_size(10);
    g.bench_function("tick_at_a_due_instant_10k_events_1k_jobs", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                step(&mut timed);
            }
            timed
        });
    });
    g.finish();
}

fn orchestration(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("orchestration.sqlite")).unwrap());
    // Midday of a weekday, so no occurrence falls due while the clock stands still.
    let now: Timestamp = "2027-03-03T11:59:30Z".parse().unwrap();
    let due = fill(&store, now);
    let clock = ManualClock::new(now);
    let scheduler = Scheduler::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(clock),
        Arc::new(Waiting),
        Limits::default(),
        NewdaySettings::default(),
        "bench".to_string(),
    );
    // The first pass records what each job waits on; later passes change nothing.
    scheduler.tick().unwrap();
    let mut g = c.benchmark_group("orchestration");
    g.sample_size(10);
    g.bench_function("tick_10k_events_1k_jobs", |b| {
        b.iter(|| black_box(scheduler.tick().unwrap()));
    });
    g.bench_function("broker_pass_1k_jobs", |b| {
        b.iter(|| black_box(scheduler.broker_pass().unwrap()));
    });
    g.bench_function("schedule_due_10k_events", |b| {
        b.iter(|| {
            let (s, e, o) = calendar_records(&*store).unwrap();
            let view = CalendarView::new(s, e, o).unwrap();
            black_box(due_at(&view, due))
        });
    });
    // A pass at an instant with due occurrences reads the whole calendar and decides (not
    // committed, so that every iteration does the same).
    g.bench_function("calendar_decide_at_a_due_instant", |b| {
        b.iter(|| {
            let (s, e, o) = calendar_records(&*store).unwrap();
            let view = CalendarView::new(s, e, o).unwrap();
            black_box(calendar::decide(&view, due))
        });
    });
    let (s, e, o) = calendar_records(&*store).unwrap();
    let view = CalendarView::new(s, e, o).unwrap();
    assert!(!due_at(&view, due).is_empty());
    assert!(!calendar::decide(&view, due).is_empty());
    g.bench_function("due_at_on_a_built_view", |b| {
        b.iter(|| black_box(due_at(&view, due)));
    });
    g.finish();
    tick_at_due_instants(c, dir.path(), now);
}

criterion_group!(benches, orchestration);
criterion_main!(benches);
