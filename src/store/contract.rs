//! The store contract (docs/orchestration.md, section 5, STORE-01 to STORE-10): one suite,
//! stamped by [`contract_suite!`] over [`SqliteStore`] and [`MemStore`]; fixtures shared with the
//! SQLite-only tests.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use jiff::{SignedDuration, Timestamp};

use super::*;
use crate::ids::{Generation, GrainSize, SessionId, VolumeId};
use crate::model::{CopyMode, ExtentSpec, VolumeRef};
use crate::state::{Reason, ReasonCode};

/// An instant `s` seconds after a fixed start.
pub(super) fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000)
        .unwrap()
        .checked_add(SignedDuration::from_secs(s))
        .unwrap()
}

pub(super) fn day(s: &str) -> BackupDay {
    s.parse().unwrap()
}

pub(super) fn schedule(name: &str) -> ScheduleRow {
    ScheduleRow {
        name: name.to_string(),
        expr: "cron 0 20 * * *".to_string(),
        zone: "Europe/Berlin".to_string(),
        enabled: true,
    }
}

pub(super) fn event(id: u64, plan: &str, next_due: Option<Timestamp>) -> EventRow {
    EventRow {
        id: EventId(id),
        name: format!("ev-{plan}-{id}"),
        schedule: "daily".to_string(),
        kind: EventKind::Plan {
            plan: plan.to_string(),
        },
        priority: Priority::new(5).unwrap(),
        blocking: false,
        enabled: true,
        next_due,
    }
}

pub(super) fn job(id: u64, event: u64, due: Timestamp, plan: &str, d: &str) -> JobRecord {
    JobRecord {
        id: JobId(id),
        kind: JobKind::Backup {
            plan: plan.to_string(),
        },
        event: EventId(event),
        due_at: due,
        backup_day: day(d),
        priority: Priority::new(5).unwrap(),
        attempt: 1,
        state: JobState::Queued {
            waiting_on: WaitReason::Broker,
        },
        owner: None,
        plan_text: Some(format!("name = \"{plan}\"\n")),
        plan_sha256: Some([0xa7; 32]),
        progress: None,
        created: due,
        started: None,
        ended: None,
        stop_requested: None,
    }
}

pub(super) fn started(j: &JobRecord) -> OccurrenceRow {
    OccurrenceRow {
        event: j.event,
        due: j.due_at,
        backup_day: j.backup_day,
        outcome: OccurrenceOutcome::Started(j.id),
    }
}

/// Schedule "daily" and event `e1` (plan "db", next due at(0)).
pub(super) fn calendar(store: &dyn Store) {
    store
        .commit(vec![
            Change::PutSchedule {
                schedule: schedule("daily"),
                replace: false,
            },
            Change::PutEvent {
                event: event(1, "db", Some(at(0))),
                replace: false,
            },
        ])
        .unwrap();
}

/// [`calendar`] and job `j1` started by e1's occurrence at(0), the event advanced to at(60).
fn with_job(store: &dyn Store) -> JobRecord {
    calendar(store);
    let j = job(1, 1, at(0), "db", "20270101");
    store
        .commit(vec![
            Change::InsertJob {
                job: j.clone(),
                occurrence: started(&j),
            },
            Change::AdvanceEvent {
                event: EventId(1),
                from: Some(at(0)),
                to: Some(at(60)),
            },
        ])
        .unwrap();
    j
}

fn volume(locator: &str, n: u64) -> VolumeRef {
    VolumeRef {
        id: VolumeId::from_parts(n, n + 1),
        size: 1 << 30,
        sector_size: 512,
        generation: Generation(n),
        locator: locator.to_string(),
    }
}

fn image(id: u64, job: u64, plan: &str, source: &str, t0: u64, d: &str) -> ImageRecord {
    ImageRecord {
        id: ImageId(id),
        job: JobId(job),
        task: 0,
        plan: plan.to_string(),
        backup_day: day(d),
        table: PathBuf::from("/var/lib/timezero/db.tzt"),
        session: SessionId(id + 100),
        t0_unix_ms: t0,
        mode: CopyMode::Copy,
        grain: GrainSize::new(65536).unwrap(),
        source: volume(source, id),
        target: volume(&format!("/backup/{plan}/{id}.img"), id + 50),
        extents: vec![
            ExtentSpec {
                source_offset: 0,
                target_offset: 0,
                len: 1 << 20,
            },
            ExtentSpec {
                source_offset: 8 << 20,
                target_offset: 1 << 20,
                len: 2 << 20,
            },
        ],
        state: ImageState::Incomplete,
        checksums: None,
    }
}

fn intent(id: u64, job: u64) -> Intent {
    Intent {
        id: IntentId(id),
        job: JobId(job),
        attempt: 1,
        task: Some(0),
        action: IntentAction::Establish {
            table: PathBuf::from("/var/lib/timezero/db.tzt"),
            target: format!("/backup/db/{id}.img"),
        },
        created: at(5),
        outcome: None,
        resolved: None,
    }
}

fn lease(id: u64, job: u64, st_dev: u64) -> Lease {
    Lease {
        id: LeaseId(id),
        job: JobId(job),
        mount: PathBuf::from(format!("/srv/m{id}")),
        st_dev,
        deadline: at(600),
    }
}

fn transition(j: JobId, from: JobStateKind, attempt: u32, to: JobState) -> Change {
    Change::Transition {
        job: j,
        from,
        attempt,
        to,
        to_attempt: attempt,
        owner: Some("pid 1 boot b".to_string()),
        at: at(10),
    }
}

fn active(index: u32, step: TaskStep) -> JobState {
    JobState::Active {
        phase: Phase::Task { index, step },
    }
}

fn conflict_at(r: Result<(), StoreError>) -> (usize, String) {
    match r {
        Err(StoreError::Conflict { change, what }) => (change, what),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

pub(super) fn store_01_transition_only_from_the_named_state(store: &dyn Store) {
    let j = with_job(store);
    // From the wrong kind: refused, job unchanged.
    let (i, what) = conflict_at(store.commit(vec![transition(
        j.id,
        JobStateKind::Active,
        1,
        JobState::Done {
            status: JobStatus::Success,
            reason: None,
        },
    )]));
    assert_eq!(i, 0);
    assert!(what.contains("queued") && what.contains("j1"), "{what}");
    assert_eq!(store.job(j.id).unwrap().unwrap(), j);
    // From the right kind but another attempt: refused.
    conflict_at(store.commit(vec![transition(
        j.id,
        JobStateKind::Queued,
        2,
        active(0, TaskStep::Checks),
    )]));
    // The right one applies, sets started and the owner.
    store
        .commit(vec![transition(
            j.id,
            JobStateKind::Queued,
            1,
            active(0, TaskStep::Cut),
        )])
        .unwrap();
    // A phase change keeps the start; progress is recorded while active at that attempt.
    store
        .commit(vec![
            Change::Transition {
                job: j.id,
                from: JobStateKind::Active,
                attempt: 1,
                to: active(0, TaskStep::Copy),
                to_attempt: 1,
                owner: Some("pid 1 boot b".to_string()),
                at: at(50),
            },
            Change::SetProgress {
                job: j.id,
                attempt: 1,
                progress: JobProgress {
                    bytes_done: 4096,
                    bytes_total: 1 << 20,
                    ..JobProgress::default()
                },
            },
        ])
        .unwrap();
    conflict_at(store.commit(vec![Change::SetProgress {
        job: j.id,
        attempt: 2,
        progress: JobProgress::default(),
    }]));
    let now = store.job(j.id).unwrap().unwrap();
    assert_eq!(now.state, active(0, TaskStep::Copy));
    assert_eq!(now.started, Some(at(10)));
    assert_eq!(now.progress.unwrap().bytes_done, 4096);
    assert_eq!(now.owner.as_deref(), Some("pid 1 boot b"));
    assert_eq!(now.ended, None);
    // Failed with attempts left, then queued again as attempt 2 (JOB-07).
    store
        .commit(vec![transition(
            j.id,
            JobStateKind::Active,
            1,
            JobState::WaitingForRetry { at: at(700) },
        )])
        .unwrap();
    store
        .commit(vec![Change::Transition {
            job: j.id,
            from: JobStateKind::WaitingForRetry,
            attempt: 1,
            to: JobState::Queued {
                waiting_on: WaitReason::Resources {
                    names: vec!["client:dbhost".to_string()],
                },
            },
            to_attempt: 2,
            owner: None,
            at: at(700),
        }])
        .unwrap();
    let now = store.job(j.id).unwrap().unwrap();
    assert_eq!((now.state.kind(), now.attempt), (JobStateKind::Queued, 2));
    let (_, what) = conflict_at(store.commit(vec![Change::SetProgress {
        job: j.id,
        attempt: 2,
        progress: JobProgress::default(),
    }]));
    assert!(what.contains("queued"), "{what}");
    // Ending sets `ended`; the status follows the reason's code.
    store
        .commit(vec![Change::Transition {
            job: j.id,
            from: JobStateKind::Queued,
            attempt: 2,
            to: JobState::Canceled {
                reason: JobReason::WindowClosed,
            },
            to_attempt: 2,
            owner: None,
            at: at(800),
        }])
        .unwrap();
    let now = store.job(j.id).unwrap().unwrap();
    assert_eq!(now.ended, Some(at(800)));
    assert_eq!(now.state.status_code(), Some(3));
    // A job that does not exist: a conflict too.
    let (_, what) = conflict_at(store.commit(vec![transition(
        JobId(9),
        JobStateKind::Queued,
        1,
        active(0, TaskStep::Checks),
    )]));
    assert!(what.contains("j9"), "{what}");
}

pub(super) fn store_02_conflict_names_the_change_and_applies_nothing(store: &dyn Store) {
    let j = with_job(store);
    let before_jobs = store.jobs(&JobQuery::default()).unwrap();
    let before_events = store.events().unwrap();
    let j2 = job(2, 1, at(60), "db", "20270101");
    let (i, what) = conflict_at(store.commit(vec![
        // Would apply alone:
        Change::InsertJob {
            job: j2.clone(),
            occurrence: started(&j2),
        },
        Change::AdvanceEvent {
            event: EventId(1),
            from: Some(at(60)),
            to: Some(at(120)),
        },
        transition(j.id, JobStateKind::Queued, 1, active(0, TaskStep::Checks)),
        Change::PutIntent(intent(1, 1)),
        // Fails: the job is Active by now (the changes before it are seen), not Queued.
        transition(j.id, JobStateKind::Queued, 1, active(0, TaskStep::Checks)),
        Change::PutLease(lease(1, 1, 77)),
    ]));
    assert_eq!(i, 4, "{what}");
    assert!(what.contains("active"), "{what}");
    assert_eq!(store.jobs(&JobQuery::default()).unwrap(), before_jobs);
    assert_eq!(store.events().unwrap(), before_events);
    assert!(store.open_intents().unwrap().is_empty());
    assert!(store.open_leases().unwrap().is_empty());
    assert_eq!(
        store
            .occurrences(&OccurrenceQuery::default())
            .unwrap()
            .len(),
        1
    );
    // A malformed change is refused the same way.
    let j3 = job(3, 1, at(120), "db", "20270101");
    let mut o = started(&j3);
    o.outcome = OccurrenceOutcome::Started(JobId(4));
    match store.commit(vec![Change::InsertJob {
        job: j3,
        occurrence: o,
    }]) {
        Err(StoreError::Invalid { change: 0, .. }) => {}
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(store.jobs(&JobQuery::default()).unwrap(), before_jobs);
}

pub(super) fn store_03_an_occurrence_is_recorded_once(store: &dyn Store) {
    let j = with_job(store);
    // The same (event, due) again, as another job: refused.
    let dup = job(2, 1, at(0), "db", "20270101");
    let (_, what) = conflict_at(store.commit(vec![Change::InsertJob {
        job: dup.clone(),
        occurrence: started(&dup),
    }]));
    assert!(
        what.contains("e1") && what.contains("already recorded"),
        "{what}"
    );
    // Or as a non-run: refused.
    conflict_at(store.commit(vec![Change::RecordOccurrence(OccurrenceRow {
        event: EventId(1),
        due: at(0),
        backup_day: day("20270101"),
        outcome: OccurrenceOutcome::Missed,
    })]));
    // The same job id for another occurrence: refused.
    let same_id = job(1, 1, at(60), "db", "20270101");
    conflict_at(store.commit(vec![Change::InsertJob {
        job: same_id.clone(),
        occurrence: started(&same_id),
    }]));
    // Another due instant of the event is a new occurrence.
    store
        .commit(vec![Change::RecordOccurrence(OccurrenceRow {
            event: EventId(1),
            due: at(60),
            backup_day: day("20270101"),
            outcome: OccurrenceOutcome::Suppressed { by: EventId(2) },
        })])
        .unwrap();
    // A started outcome goes through InsertJob only; an unknown event is a conflict.
    assert!(matches!(
        store.commit(vec![Change::RecordOccurrence(started(&job(
            5,
            1,
            at(90),
            "db",
            "20270101"
        )))]),
        Err(StoreError::Invalid { .. })
    ));
    let orphan = job(6, 9, at(90), "db", "20270101");
    let (_, what) = conflict_at(store.commit(vec![Change::InsertJob {
        job: orphan.clone(),
        occurrence: started(&orphan),
    }]));
    assert!(what.contains("e9"), "{what}");
    let all = store.occurrences(&OccurrenceQuery::default()).unwrap();
    assert_eq!(
        all.iter().map(|o| o.outcome).collect::<Vec<_>>(),
        vec![
            OccurrenceOutcome::Started(j.id),
            OccurrenceOutcome::Suppressed { by: EventId(2) }
        ]
    );
    assert_eq!(store.jobs(&JobQuery::default()).unwrap(), vec![j]);
}

pub(super) fn store_04_advance_event_only_from_its_next_due(store: &dyn Store) {
    calendar(store);
    let (_, what) = conflict_at(store.commit(vec![Change::AdvanceEvent {
        event: EventId(1),
        from: Some(at(60)),
        to: Some(at(120)),
    }]));
    assert!(what.contains("e1"), "{what}");
    conflict_at(store.commit(vec![Change::AdvanceEvent {
        event: EventId(1),
        from: None,
        to: Some(at(120)),
    }]));
    // Sub-millisecond parts are cut when stored and when compared.
    let fine = at(0).checked_add(SignedDuration::from_nanos(400)).unwrap();
    store
        .commit(vec![Change::AdvanceEvent {
            event: EventId(1),
            from: Some(fine),
            to: None,
        }])
        .unwrap();
    assert_eq!(store.events().unwrap()[0].next_due, None);
    store
        .commit(vec![Change::AdvanceEvent {
            event: EventId(1),
            from: None,
            to: Some(at(120)),
        }])
        .unwrap();
    assert_eq!(store.events().unwrap()[0].next_due, Some(at(120)));
    conflict_at(store.commit(vec![Change::AdvanceEvent {
        event: EventId(2),
        from: None,
        to: None,
    }]));
}

pub(super) fn store_05_open_intents_are_listed_until_resolved(store: &dyn Store) {
    with_job(store);
    store
        .commit(vec![
            Change::PutIntent(intent(1, 1)),
            Change::PutIntent(intent(2, 1)),
        ])
        .unwrap();
    conflict_at(store.commit(vec![Change::PutIntent(intent(2, 1))]));
    conflict_at(store.commit(vec![Change::PutIntent(intent(3, 8))]));
    let mut resolved = intent(4, 1);
    resolved.outcome = Some(IntentOutcome::Done);
    assert!(matches!(
        store.commit(vec![Change::PutIntent(resolved)]),
        Err(StoreError::Invalid { .. })
    ));
    assert_eq!(
        store.open_intents().unwrap(),
        vec![intent(1, 1), intent(2, 1)]
    );
    store
        .commit(vec![Change::Resolve {
            intent: IntentId(1),
            outcome: IntentOutcome::Established(SessionId(7)),
            at: at(20),
        }])
        .unwrap();
    assert_eq!(store.open_intents().unwrap(), vec![intent(2, 1)]);
    let (_, what) = conflict_at(store.commit(vec![Change::Resolve {
        intent: IntentId(1),
        outcome: IntentOutcome::Unknown,
        at: at(30),
    }]));
    assert!(what.contains("already resolved"), "{what}");
    conflict_at(store.commit(vec![Change::Resolve {
        intent: IntentId(9),
        outcome: IntentOutcome::Unknown,
        at: at(30),
    }]));
    store
        .commit(vec![Change::Resolve {
            intent: IntentId(2),
            outcome: IntentOutcome::Failed("EIO".to_string()),
            at: at(30),
        }])
        .unwrap();
    assert!(store.open_intents().unwrap().is_empty());
}

pub(super) fn store_06_leases_are_listed_until_dropped(store: &dyn Store) {
    with_job(store);
    store
        .commit(vec![
            Change::PutLease(lease(1, 1, 2049)),
            Change::PutLease(lease(2, 1, 2050)),
        ])
        .unwrap();
    // A second lease on the same filesystem (PLAN-12's "another job holds a lease").
    let (_, what) = conflict_at(store.commit(vec![Change::PutLease(lease(3, 1, 2049))]));
    assert!(what.contains("2049") && what.contains("l1"), "{what}");
    conflict_at(store.commit(vec![Change::PutLease(lease(1, 1, 9))]));
    conflict_at(store.commit(vec![Change::PutLease(lease(4, 7, 9))]));
    assert_eq!(
        store.open_leases().unwrap(),
        vec![lease(1, 1, 2049), lease(2, 1, 2050)]
    );
    store.commit(vec![Change::DropLease(LeaseId(1))]).unwrap();
    assert_eq!(store.open_leases().unwrap(), vec![lease(2, 1, 2050)]);
    conflict_at(store.commit(vec![Change::DropLease(LeaseId(1))]));
    // Dropped, the filesystem can be leased again.
    store
        .commit(vec![Change::PutLease(lease(3, 1, 2049))])
        .unwrap();
    assert_eq!(store.open_leases().unwrap().len(), 2);
}

pub(super) fn store_07_image_states_change_only_from_the_named_state(store: &dyn Store) {
    with_job(store);
    let img = image(1, 1, "db", "/dev/vg0/db-a", 1000, "20270101");
    store.commit(vec![Change::PutImage(img.clone())]).unwrap();
    assert_eq!(store.image(ImageId(1)).unwrap(), Some(img.clone()));
    conflict_at(store.commit(vec![Change::PutImage(img.clone())]));
    conflict_at(store.commit(vec![Change::PutImage(image(
        2, 5, "db", "x", 1, "20270101",
    ))]));
    let (_, what) = conflict_at(store.commit(vec![Change::SetImageState {
        image: ImageId(1),
        from: ImageStateKind::Valid,
        to: ImageState::Expired,
    }]));
    assert!(what.contains("incomplete"), "{what}");
    // Checksums go in with the change to Valid, and only while the image is incomplete.
    let sums = ImageChecksums {
        algorithm: ChecksumAlgorithm::Crc32,
        block_bytes: 1 << 20,
        image_bytes: 3 << 20,
        sums: vec![1, 0xdead_beef, u32::MAX],
    };
    store
        .commit(vec![
            Change::SetImageChecksums {
                image: ImageId(1),
                checksums: sums.clone(),
            },
            Change::SetImageState {
                image: ImageId(1),
                from: ImageStateKind::Incomplete,
                to: ImageState::Valid,
            },
        ])
        .unwrap();
    assert_eq!(
        store.image(ImageId(1)).unwrap().unwrap().checksums,
        Some(sums.clone())
    );
    let (_, what) = conflict_at(store.commit(vec![Change::SetImageChecksums {
        image: ImageId(1),
        checksums: sums,
    }]));
    assert!(what.contains("not incomplete"), "{what}");
    let lost = ImageState::Lost {
        why: "session terminated".to_string(),
        engine: Some(Reason::new(ReasonCode::VolumeMissing, "/backup/db/1.img")),
    };
    store
        .commit(vec![Change::SetImageState {
            image: ImageId(1),
            from: ImageStateKind::Valid,
            to: lost.clone(),
        }])
        .unwrap();
    assert_eq!(store.image(ImageId(1)).unwrap().unwrap().state, lost);
    conflict_at(store.commit(vec![Change::SetImageState {
        image: ImageId(3),
        from: ImageStateKind::Valid,
        to: ImageState::Expired,
    }]));
    assert_eq!(store.image(ImageId(3)).unwrap(), None);
}

pub(super) fn store_08_queries_filter_and_order(store: &dyn Store) {
    calendar(store);
    store
        .commit(vec![Change::PutEvent {
            event: event(2, "web", Some(at(0))),
            replace: false,
        }])
        .unwrap();
    let jobs = [
        job(1, 1, at(0), "db", "20270101"),
        job(2, 2, at(0), "web", "20270101"),
        job(3, 1, at(86_400), "db", "20270102"),
        job(4, 2, at(86_400), "web", "20270102"),
    ];
    let mut changes: Vec<Change> = jobs
        .iter()
        .rev()
        .map(|j| Change::InsertJob {
            job: j.clone(),
            occurrence: started(j),
        })
        .collect();
    changes.push(Change::RecordOccurrence(OccurrenceRow {
        event: EventId(2),
        due: at(3600),
        backup_day: day("20270101"),
        outcome: OccurrenceOutcome::Missed,
    }));
    changes.push(transition(
        JobId(3),
        JobStateKind::Queued,
        1,
        active(0, TaskStep::Copy),
    ));
    store.commit(changes).unwrap();
    let ids = |q: JobQuery| -> Vec<u64> {
        store
            .jobs(&q)
            .unwrap()
            .into_iter()
            .map(|j| j.id.0)
            .collect()
    };
    assert_eq!(ids(JobQuery::default()), vec![1, 2, 3, 4]);
    assert_eq!(
        ids(JobQuery {
            plan: Some("db".into()),
            ..JobQuery::default()
        }),
        vec![1, 3]
    );
    assert_eq!(
        ids(JobQuery {
            states: Some(vec![JobStateKind::Active]),
            ..JobQuery::default()
        }),
        vec![3]
    );
    assert_eq!(
        ids(JobQuery {
            states: Some(vec![JobStateKind::Queued, JobStateKind::Done]),
            backup_day: Some(day("20270102")),
            ..JobQuery::default()
        }),
        vec![4]
    );
    assert_eq!(
        ids(JobQuery {
            event: Some(EventId(2)),
            ..JobQuery::default()
        }),
        vec![2, 4]
    );
    let occ = |q: OccurrenceQuery| -> Vec<(u64, i64)> {
        store
            .occurrences(&q)
            .unwrap()
            .into_iter()
            .map(|o| (o.event.0, o.due.as_second() - at(0).as_second()))
            .collect()
    };
    assert_eq!(
        occ(OccurrenceQuery::default()),
        vec![(1, 0), (2, 0), (2, 3600), (1, 86_400), (2, 86_400)]
    );
    assert_eq!(
        occ(OccurrenceQuery {
            backup_day: Some(day("20270101")),
            ..OccurrenceQuery::default()
        }),
        vec![(1, 0), (2, 0), (2, 3600)]
    );
    assert_eq!(
        occ(OccurrenceQuery {
            due_from: Some(at(1)),
            due_before: Some(at(86_400)),
            ..OccurrenceQuery::default()
        }),
        vec![(2, 3600)]
    );
    assert_eq!(
        occ(OccurrenceQuery {
            event: Some(EventId(1)),
            due_from: Some(at(0)),
            ..OccurrenceQuery::default()
        }),
        vec![(1, 0), (1, 86_400)]
    );
    let imgs = [
        image(1, 1, "db", "/dev/a", 3000, "20270101"),
        image(2, 1, "db", "/dev/b", 1000, "20270101"),
        image(3, 3, "db", "/dev/a", 2000, "20270102"),
        image(4, 2, "web", "/dev/a", 1000, "20270101"),
    ];
    store
        .commit(
            imgs.iter()
                .cloned()
                .map(Change::PutImage)
                .chain([Change::SetImageState {
                    image: ImageId(3),
                    from: ImageStateKind::Incomplete,
                    to: ImageState::Valid,
                }])
                .collect(),
        )
        .unwrap();
    let iids = |q: ImageQuery| -> Vec<u64> {
        store
            .images(&q)
            .unwrap()
            .into_iter()
            .map(|i| i.id.0)
            .collect()
    };
    assert_eq!(iids(ImageQuery::default()), vec![2, 4, 3, 1]);
    assert_eq!(
        iids(ImageQuery {
            plan: Some("db".into()),
            source: Some("/dev/a".into()),
            ..ImageQuery::default()
        }),
        vec![3, 1]
    );
    assert_eq!(
        iids(ImageQuery {
            plan: Some("db".into()),
            source: Some("/dev/a".into()),
            t0_at_or_before_ms: Some(2999),
            ..ImageQuery::default()
        }),
        vec![3]
    );
    assert_eq!(
        iids(ImageQuery {
            states: Some(vec![ImageStateKind::Valid]),
            ..ImageQuery::default()
        }),
        vec![3]
    );
    assert_eq!(
        iids(ImageQuery {
            job: Some(JobId(1)),
            backup_day: Some(day("20270101")),
            ..ImageQuery::default()
        }),
        vec![2, 1]
    );
    assert_eq!(store.images(&ImageQuery::default()).unwrap()[0], imgs[1]);
}

pub(super) fn store_09_a_hook_run_starts_once_and_ends_once(store: &dyn Store) {
    with_job(store);
    let key = |stage, task| HookRunKey {
        job: JobId(1),
        attempt: 1,
        stage,
        task,
    };
    let run = |k: HookRunKey| HookRunRecord {
        key: k,
        argv: vec!["notify".to_string(), "start".to_string()],
        started: at(1),
        ended: None,
        result: None,
        stdout_tail: Vec::new(),
        stderr_tail: Vec::new(),
    };
    let order = [
        key(HookStage::PlanPre, None),
        key(HookStage::TaskPre, Some(0)),
        key(HookStage::AfterCut, Some(0)),
        key(HookStage::Finally, Some(0)),
        key(HookStage::Finally, None),
    ];
    for k in order {
        store.commit(vec![Change::PutHookRun(run(k))]).unwrap();
    }
    // Never started twice for one attempt (HOOK-10).
    let (_, what) = conflict_at(store.commit(vec![Change::PutHookRun(run(order[1]))]));
    assert!(
        what.contains("task_pre") && what.contains("already started"),
        "{what}"
    );
    // Another attempt may run it.
    let mut again = run(order[1]);
    again.key.attempt = 2;
    store.commit(vec![Change::PutHookRun(again)]).unwrap();
    let end = |k| Change::EndHookRun {
        key: k,
        ended: at(2),
        result: HookResult::Exited(101),
        stdout_tail: b"out".to_vec(),
        stderr_tail: b"err".to_vec(),
    };
    store.commit(vec![end(order[1])]).unwrap();
    conflict_at(store.commit(vec![end(order[1])]));
    conflict_at(store.commit(vec![end(key(HookStage::PlanPost, None))]));
    let runs = store.hook_runs(JobId(1)).unwrap();
    let keys: Vec<HookRunKey> = runs.iter().map(|r| r.key).collect();
    let mut expected = order.to_vec();
    expected.push(HookRunKey {
        attempt: 2,
        ..order[1]
    });
    assert_eq!(keys, expected);
    assert_eq!(runs[1].result, Some(HookResult::Exited(101)));
    assert_eq!(runs[1].ended, Some(at(2)));
    assert_eq!(runs[1].stderr_tail, b"err");
    assert_eq!(runs[0].result, None);
}

pub(super) fn store_10_ids_are_handed_out_once(store: &dyn Store) {
    let a: Vec<u64> = (0..3)
        .map(|_| store.allocate(IdKind::Job).unwrap())
        .collect();
    assert_eq!(a, vec![1, 2, 3]);
    assert_eq!(store.allocate(IdKind::Image).unwrap(), 1);
    assert_eq!(store.allocate(IdKind::Job).unwrap(), 4);
    // A failed list does not give its ids back.
    let id = store.allocate(IdKind::Intent).unwrap();
    conflict_at(store.commit(vec![Change::PutIntent(intent(id, 99))]));
    assert_eq!(store.allocate(IdKind::Intent).unwrap(), id + 1);
}

pub(super) fn store_19_many_ids_at_once_are_handed_out_once(store: &dyn Store) {
    assert_eq!(store.allocate(IdKind::Job).unwrap(), 1);
    assert_eq!(store.allocate_many(IdKind::Job, 3).unwrap(), vec![2, 3, 4]);
    assert!(store.allocate_many(IdKind::Job, 0).unwrap().is_empty());
    assert_eq!(store.allocate(IdKind::Job).unwrap(), 5);
    assert_eq!(store.allocate_many(IdKind::Event, 2).unwrap(), vec![1, 2]);
}

pub(super) fn store_21_reserved_ids_are_handed_out_by_the_list_that_names_them(store: &dyn Store) {
    // Reading the next id hands nothing out.
    assert_eq!(store.next_id(IdKind::Job).unwrap(), 1);
    assert_eq!(store.next_id(IdKind::Job).unwrap(), 1);
    let reserve = |first: u64, n: u64| Change::ReserveIds {
        kind: IdKind::Job,
        first,
        n,
    };
    store.commit(vec![reserve(1, 3)]).unwrap();
    assert_eq!(store.next_id(IdKind::Job).unwrap(), 4);
    // The counter goes on after them, also for `allocate`; other kinds are apart.
    assert_eq!(store.allocate(IdKind::Job).unwrap(), 4);
    assert_eq!(store.next_id(IdKind::Image).unwrap(), 1);
    // Ids already handed out are not reserved again: the list conflicts at that change.
    let (change, what) = conflict_at(store.commit(vec![reserve(4, 2)]));
    assert_eq!(change, 0);
    assert!(what.contains("already handed out"), "{what}");
    let (change, _) = conflict_at(store.commit(vec![
        Change::PutSchedule {
            schedule: schedule("daily"),
            replace: false,
        },
        reserve(2, 1),
    ]));
    assert_eq!(change, 1);
    assert!(store.schedules().unwrap().is_empty());
    // A list that fails after its reservation hands out nothing: the same ids come next.
    let (change, _) = conflict_at(store.commit(vec![
        reserve(5, 2),
        Change::PutIntent(intent(store.allocate(IdKind::Intent).unwrap(), 99)),
    ]));
    assert_eq!(change, 1);
    assert_eq!(store.next_id(IdKind::Job).unwrap(), 5);
    // A reservation and the rows that use it are one list: the job exists exactly when its
    // id was handed out.
    calendar(store);
    let j = job(5, 1, at(0), "db", "20270115");
    store
        .commit(vec![
            reserve(5, 1),
            Change::InsertJob {
                occurrence: started(&j),
                job: j,
            },
        ])
        .unwrap();
    assert!(store.job(JobId(5)).unwrap().is_some());
    assert_eq!(store.allocate(IdKind::Job).unwrap(), 6);
    // Nothing to reserve always applies; a reservation from id 0 is malformed.
    store.commit(vec![reserve(7, 0)]).unwrap();
    assert_eq!(store.next_id(IdKind::Job).unwrap(), 7);
    assert!(matches!(
        store.commit(vec![reserve(0, 1)]),
        Err(StoreError::Invalid { change: 0, .. })
    ));
    // Past a gap, ids not yet handed out may be reserved; the ones skipped are never handed out.
    store.commit(vec![reserve(9, 2)]).unwrap();
    assert_eq!(store.allocate(IdKind::Job).unwrap(), 11);
}

pub(super) fn store_20_calendar_changes_move_the_generation_on(store: &dyn Store) {
    let g0 = store.calendar_generation().unwrap();
    assert_eq!(g0, 0);
    // One step per committed list, however many calendar changes it holds.
    store
        .commit(vec![
            Change::PutSchedule {
                schedule: schedule("daily"),
                replace: false,
            },
            Change::PutEvent {
                event: event(1, "db", Some(at(0))),
                replace: false,
            },
        ])
        .unwrap();
    assert_eq!(store.calendar_generation().unwrap(), 1);
    store
        .commit(vec![Change::AdvanceEvent {
            event: EventId(1),
            from: Some(at(0)),
            to: Some(at(60)),
        }])
        .unwrap();
    assert_eq!(store.calendar_generation().unwrap(), 2);
    // A list that fails leaves it as it was.
    conflict_at(store.commit(vec![Change::AdvanceEvent {
        event: EventId(1),
        from: Some(at(0)),
        to: Some(at(120)),
    }]));
    assert_eq!(store.calendar_generation().unwrap(), 2);
    // A job and its occurrence are calendar changes; a job's transition is not.
    let j = job(1, 1, at(60), "db", "20270101");
    store
        .commit(vec![Change::InsertJob {
            job: j.clone(),
            occurrence: started(&j),
        }])
        .unwrap();
    assert_eq!(store.calendar_generation().unwrap(), 3);
    store
        .commit(vec![transition(
            j.id,
            JobStateKind::Queued,
            1,
            JobState::Canceled {
                reason: JobReason::Newday,
            },
        )])
        .unwrap();
    assert_eq!(store.calendar_generation().unwrap(), 3);
    store
        .commit(vec![Change::SetEnabled {
            what: Toggle::Event(EventId(1)),
            enabled: false,
        }])
        .unwrap();
    assert_eq!(store.calendar_generation().unwrap(), 4);
    // Trimming that removes occurrences moves it on; trimming nothing does not.
    store.trim_history(day("20270102")).unwrap();
    assert_eq!(store.calendar_generation().unwrap(), 5);
    store.trim_history(day("20270102")).unwrap();
    assert_eq!(store.calendar_generation().unwrap(), 5);
}

pub(super) fn store_14_tasks_change_only_from_their_exact_status(store: &dyn Store) {
    with_job(store);
    let task = |index| TaskRecord {
        job: JobId(1),
        index,
        activity: "data".to_string(),
        region: None,
        sources: vec![format!("/dev/vg0/db-{index}")],
        targets: vec![format!("/backup/db/{index}.img")],
        status: TaskStatus::Pending,
        reason: None,
        message: None,
    };
    store
        .commit(vec![Change::PutTask(task(1)), Change::PutTask(task(0))])
        .unwrap();
    conflict_at(store.commit(vec![Change::PutTask(task(0))]));
    let mut orphan = task(0);
    orphan.job = JobId(5);
    conflict_at(store.commit(vec![Change::PutTask(orphan)]));
    let update = |from, to| Change::UpdateTask {
        job: JobId(1),
        index: 0,
        from,
        to,
        reason: None,
        message: None,
    };
    store
        .commit(vec![update(
            TaskStatus::Pending,
            TaskStatus::Running(TaskStep::Quiesce),
        )])
        .unwrap();
    // Running at another step is not the status the caller saw.
    let (_, what) = conflict_at(store.commit(vec![update(
        TaskStatus::Running(TaskStep::Cut),
        TaskStatus::Running(TaskStep::Thaw),
    )]));
    assert!(what.contains("Quiesce"), "{what}");
    store
        .commit(vec![Change::UpdateTask {
            job: JobId(1),
            index: 0,
            from: TaskStatus::Running(TaskStep::Quiesce),
            to: TaskStatus::Canceled,
            reason: Some(JobReason::QuiesceTimedOut),
            message: Some("not quiesced after 210 s".to_string()),
        }])
        .unwrap();
    let tasks = store.tasks(JobId(1)).unwrap();
    assert_eq!(
        tasks.iter().map(|t| t.index).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert_eq!(tasks[0].status, TaskStatus::Canceled);
    assert_eq!(tasks[0].reason, Some(JobReason::QuiesceTimedOut));
    assert_eq!(tasks[1], task(1));
    conflict_at(store.commit(vec![Change::UpdateTask {
        job: JobId(1),
        index: 7,
        from: TaskStatus::Pending,
        to: TaskStatus::Ok,
        reason: None,
        message: None,
    }]));
}

pub(super) fn store_15_events_need_their_schedule_and_a_unique_name(store: &dyn Store) {
    // No schedule yet.
    let (_, what) = conflict_at(store.commit(vec![Change::PutEvent {
        event: event(1, "db", None),
        replace: false,
    }]));
    assert!(what.contains("daily"), "{what}");
    calendar(store);
    conflict_at(store.commit(vec![Change::PutSchedule {
        schedule: schedule("daily"),
        replace: false,
    }]));
    conflict_at(store.commit(vec![Change::PutSchedule {
        schedule: schedule("weekly"),
        replace: true,
    }]));
    let mut edited = schedule("daily");
    edited.expr = "cron 0 21 * * *".to_string();
    store
        .commit(vec![Change::PutSchedule {
            schedule: edited.clone(),
            replace: true,
        }])
        .unwrap();
    // Same name as e1.
    let mut twin = event(2, "db", None);
    twin.name = event(1, "db", None).name;
    let (_, what) = conflict_at(store.commit(vec![Change::PutEvent {
        event: twin,
        replace: false,
    }]));
    assert!(what.contains("e1"), "{what}");
    conflict_at(store.commit(vec![Change::PutEvent {
        event: event(1, "db", None),
        replace: false,
    }]));
    conflict_at(store.commit(vec![Change::PutEvent {
        event: event(3, "db", None),
        replace: true,
    }]));
    let mut moved = event(1, "db", Some(at(5)));
    moved.priority = Priority::new(9).unwrap();
    store
        .commit(vec![
            Change::PutEvent {
                event: moved.clone(),
                replace: true,
            },
            Change::SetEnabled {
                what: Toggle::Schedule("daily".to_string()),
                enabled: false,
            },
            Change::SetEnabled {
                what: Toggle::Event(EventId(1)),
                enabled: false,
            },
        ])
        .unwrap();
    conflict_at(store.commit(vec![Change::SetEnabled {
        what: Toggle::Event(EventId(4)),
        enabled: true,
    }]));
    conflict_at(store.commit(vec![Change::SetEnabled {
        what: Toggle::Schedule("weekly".to_string()),
        enabled: true,
    }]));
    edited.enabled = false;
    moved.enabled = false;
    assert_eq!(store.schedules().unwrap(), vec![edited]);
    assert_eq!(store.events().unwrap(), vec![moved]);
}

pub(super) fn store_16_records_read_back_as_written(store: &dyn Store) {
    calendar(store);
    let mut j = job(1, 1, at(0), "db", "20270101");
    j.kind = JobKind::Restore {
        image: ImageId(3),
        dest: "/dev/vg0/db-a".to_string(),
    };
    j.created = at(0)
        .checked_add(SignedDuration::from_micros(1500))
        .unwrap();
    store
        .commit(vec![Change::InsertJob {
            job: j.clone(),
            occurrence: started(&j),
        }])
        .unwrap();
    let back = store.job(JobId(1)).unwrap().unwrap();
    // The instant is kept to the millisecond.
    assert_eq!(
        back.created,
        at(0).checked_add(SignedDuration::from_millis(1)).unwrap()
    );
    j.created = back.created;
    assert_eq!(back, j);
    let done = JobState::Done {
        status: JobStatus::Failed,
        reason: Some(JobReason::DaemonRestarted(Phase::Task {
            index: 2,
            step: TaskStep::AfterCut,
        })),
    };
    store
        .commit(vec![transition(
            JobId(1),
            JobStateKind::Queued,
            1,
            done.clone(),
        )])
        .unwrap();
    let back = store.job(JobId(1)).unwrap().unwrap();
    assert_eq!(back.state, done);
    assert_eq!(back.state.status_code(), Some(2));
    let mut img = image(1, 1, "db", "/dev/a", 5, "20270101");
    img.mode = CopyMode::NoCopy;
    store.commit(vec![Change::PutImage(img.clone())]).unwrap();
    assert_eq!(store.image(ImageId(1)).unwrap(), Some(img));
}

pub(super) fn store_17_trim_history_forgets_only_what_nothing_needs(store: &dyn Store) {
    calendar(store);
    let ended = |id: u64, d: &str| {
        let mut j = job(id, 1, at(id as i64 * 60), "db", d);
        j.state = JobState::Done {
            status: JobStatus::Success,
            reason: None,
        };
        j
    };
    let jobs = [
        ended(1, "20270101"),                 // forgotten
        ended(2, "20270101"),                 // kept: an image names it
        ended(3, "20270101"),                 // kept: an open intent
        job(4, 1, at(240), "db", "20270101"), // kept: queued
        ended(5, "20270102"),                 // kept: the day is not trimmed
    ];
    let mut changes: Vec<Change> = jobs
        .iter()
        .map(|j| Change::InsertJob {
            job: j.clone(),
            occurrence: started(j),
        })
        .collect();
    changes.extend([
        Change::PutImage(image(1, 2, "db", "/dev/a", 1, "20270101")),
        Change::PutIntent(intent(1, 3)),
        Change::PutIntent(intent(2, 1)),
        Change::Resolve {
            intent: IntentId(2),
            outcome: IntentOutcome::Done,
            at: at(9),
        },
        Change::PutHookRun(HookRunRecord {
            key: HookRunKey {
                job: JobId(1),
                attempt: 1,
                stage: HookStage::PlanPre,
                task: None,
            },
            argv: vec!["true".to_string()],
            started: at(1),
            ended: None,
            result: None,
            stdout_tail: Vec::new(),
            stderr_tail: Vec::new(),
        }),
        Change::RecordOccurrence(OccurrenceRow {
            event: EventId(1),
            due: at(30),
            backup_day: day("20270101"),
            outcome: OccurrenceOutcome::Missed,
        }),
        Change::RecordOccurrence(OccurrenceRow {
            event: EventId(1),
            due: at(90_000),
            backup_day: day("20270102"),
            outcome: OccurrenceOutcome::Missed,
        }),
    ]);
    store.commit(changes).unwrap();
    let trimmed = store.trim_history(day("20270102")).unwrap();
    assert_eq!(
        trimmed,
        Trimmed {
            jobs: 1,
            occurrences: 2
        }
    );
    let ids: Vec<u64> = store
        .jobs(&JobQuery::default())
        .unwrap()
        .iter()
        .map(|j| j.id.0)
        .collect();
    assert_eq!(ids, vec![2, 3, 4, 5]);
    assert!(store.hook_runs(JobId(1)).unwrap().is_empty());
    assert_eq!(store.open_intents().unwrap(), vec![intent(1, 3)]);
    let occ: Vec<OccurrenceOutcome> = store
        .occurrences(&OccurrenceQuery::default())
        .unwrap()
        .into_iter()
        .map(|o| o.outcome)
        .collect();
    assert_eq!(
        occ,
        vec![
            OccurrenceOutcome::Started(JobId(2)),
            OccurrenceOutcome::Started(JobId(3)),
            OccurrenceOutcome::Started(JobId(4)),
            OccurrenceOutcome::Started(JobId(5)),
            OccurrenceOutcome::Missed,
        ]
    );
    // The forgotten job's occurrence is gone, so nothing names it; trimming again forgets nothing.
    assert_eq!(
        store.trim_history(day("20270102")).unwrap(),
        Trimmed::default()
    );
}

pub(super) fn store_18_schedules_and_events_are_removed_only_when_unused(store: &dyn Store) {
    calendar(store);
    // e1 uses "daily".
    let (_, what) = conflict_at(store.commit(vec![Change::RemoveSchedule {
        name: "daily".to_string(),
    }]));
    assert!(what.contains("ev-db-1"), "{what}");
    conflict_at(store.commit(vec![Change::RemoveSchedule {
        name: "weekly".to_string(),
    }]));
    conflict_at(store.commit(vec![Change::RemoveEvent { event: EventId(9) }]));
    // An event with a job in the history stays; one with only non-job occurrences goes, with
    // them.
    let mut e2 = event(2, "web", Some(at(0)));
    e2.name = "web".to_string();
    let j = job(1, 1, at(0), "db", "20270101");
    store
        .commit(vec![
            Change::PutEvent {
                event: e2,
                replace: false,
            },
            Change::InsertJob {
                occurrence: started(&j),
                job: j,
            },
            Change::RecordOccurrence(OccurrenceRow {
                event: EventId(2),
                due: at(0),
                backup_day: day("20270101"),
                outcome: OccurrenceOutcome::Missed,
            }),
        ])
        .unwrap();
    let (_, what) = conflict_at(store.commit(vec![Change::RemoveEvent { event: EventId(1) }]));
    assert!(what.contains("j1"), "{what}");
    store
        .commit(vec![Change::RemoveEvent { event: EventId(2) }])
        .unwrap();
    assert_eq!(store.events().unwrap().len(), 1);
    let left = store.occurrences(&OccurrenceQuery::default()).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].event, EventId(1));
    // NEWDAY is never removed.
    let mut newday = event(3, "x", None);
    newday.name = "NEWDAY".to_string();
    newday.kind = EventKind::Newday;
    store
        .commit(vec![Change::PutEvent {
            event: newday,
            replace: false,
        }])
        .unwrap();
    let (_, what) = conflict_at(store.commit(vec![Change::RemoveEvent { event: EventId(3) }]));
    assert!(what.contains("NEWDAY"), "{what}");
    // A schedule nobody uses goes.
    store
        .commit(vec![Change::PutSchedule {
            schedule: schedule("spare"),
            replace: false,
        }])
        .unwrap();
    store
        .commit(vec![Change::RemoveSchedule {
            name: "spare".to_string(),
        }])
        .unwrap();
    assert_eq!(store.schedules().unwrap(), vec![schedule("daily")]);
    // The events due by an instant: e1 (next due at(0)); NEWDAY has none.
    let due: Vec<EventId> = store
        .events_due_by(at(0))
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(due, vec![EventId(1)]);
    assert!(store.events_due_by(at(-1)).unwrap().is_empty());
}

macro_rules! contract_suite {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;

            fn with_store(f: impl FnOnce(&dyn Store)) {
                let (store, _dir): (Box<dyn Store>, Option<tempfile::TempDir>) = $make;
                f(&*store);
            }

            #[test]
            fn store_01_transition_only_from_the_named_state() {
                with_store(super::store_01_transition_only_from_the_named_state);
            }
            #[test]
            fn store_02_conflict_names_the_change_and_applies_nothing() {
                with_store(super::store_02_conflict_names_the_change_and_applies_nothing);
            }
            #[test]
            fn store_03_an_occurrence_is_recorded_once() {
                with_store(super::store_03_an_occurrence_is_recorded_once);
            }
            #[test]
            fn store_04_advance_event_only_from_its_next_due() {
                with_store(super::store_04_advance_event_only_from_its_next_due);
            }
            #[test]
            fn store_05_open_intents_are_listed_until_resolved() {
                with_store(super::store_05_open_intents_are_listed_until_resolved);
            }
            #[test]
            fn store_06_leases_are_listed_until_dropped() {
                with_store(super::store_06_leases_are_listed_until_dropped);
            }
            #[test]
            fn store_07_image_states_change_only_from_the_named_state() {
                with_store(super::store_07_image_states_change_only_from_the_named_state);
            }
            #[test]
            fn store_08_queries_filter_and_order() {
                with_store(super::store_08_queries_filter_and_order);
            }
            #[test]
            fn store_09_a_hook_run_starts_once_and_ends_once() {
                with_store(super::store_09_a_hook_run_starts_once_and_ends_once);
            }
            #[test]
            fn store_10_ids_are_handed_out_once() {
                with_store(super::store_10_ids_are_handed_out_once);
            }
            #[test]
            fn store_14_tasks_change_only_from_their_exact_status() {
                with_store(super::store_14_tasks_change_only_from_their_exact_status);
            }
            #[test]
            fn store_15_events_need_their_schedule_and_a_unique_name() {
                with_store(super::store_15_events_need_their_schedule_and_a_unique_name);
            }
            #[test]
            fn store_17_trim_history_forgets_only_what_nothing_needs() {
                with_store(super::store_17_trim_history_forgets_only_what_nothing_needs);
            }
            #[test]
            fn store_18_schedules_and_events_are_removed_only_when_unused() {
                with_store(super::store_18_schedules_and_events_are_removed_only_when_unused);
            }
            #[test]
            fn store_19_many_ids_at_once_are_handed_out_once() {
                with_store(super::store_19_many_ids_at_once_are_handed_out_once);
            }
            #[test]
            fn store_20_calendar_changes_move_the_generation_on() {
                with_store(super::store_20_calendar_changes_move_the_generation_on);
            }
            #[test]
            fn store_21_reserved_ids_are_handed_out_by_the_list_that_names_them() {
                with_store(super::store_21_reserved_ids_are_handed_out_by_the_list_that_names_them);
            }
            #[test]
            fn store_16_records_read_back_as_written() {
                with_store(super::store_16_records_read_back_as_written);
            }
        }
    };
}

contract_suite!(sqlite, {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("orchestration.sqlite")).unwrap();
    (Box::new(store), Some(dir))
});

contract_suite!(mem, (Box::new(MemStore::new()), None));
