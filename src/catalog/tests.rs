//! Catalog and restore tests, named after CAT-01..CAT-10 (docs/orchestration.md, section 2).
//!
//! The real engine runs on `MemStorage` with `MemVolume`s, or on files in a temporary directory
//! where a file matters (verify, retention's deletes); the store is `MemStore`, and
//! `SqliteStore` where rows must survive a reopen. The clock is manual; nothing sleeps. Restores
//! are compared byte for byte with the image's T0 content.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::store::{
    BackupDay, Change, EventId, EventKind, EventRow, ImageRecord, ImageState, ImageStateKind,
    JobId, JobKind, JobRecord, JobState, MemStore, OccurrenceOutcome, OccurrenceRow, Priority,
    ScheduleRow, SqliteStore, Store, WaitReason,
};
use crate::{
    CopyMode, Engine, EngineOptions, ExtentSpec, Generation, GrainCount, GrainIndex, GrainSize,
    MapResolver, MemStorage, MemVolume, Outcome, Reason, ReasonCode, SessionId, SessionSpec,
    SessionState, TableOptions, VolumeId,
};

const MIB: u64 = 1 << 20;
const GRAIN: u64 = 64 << 10;

fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_second(1_800_000_000).unwrap())
}

fn day(s: &str) -> BackupDay {
    s.parse().unwrap()
}

/// Bytes that differ at every offset and with `seed`.
fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
        .collect()
}

/// Schedule, event and a backup job `job` of `plan`, so image rows can name it.
fn put_job(store: &dyn Store, job: u64, plan: &str, clock: &ManualClock) {
    let now = clock.now();
    if store.schedules().unwrap().is_empty() {
        store
            .commit(vec![
                Change::PutSchedule {
                    schedule: ScheduleRow {
                        name: "daily".to_string(),
                        expr: "cron 0 20 * * *".to_string(),
                        zone: "UTC".to_string(),
                        enabled: true,
                    },
                    replace: false,
                },
                Change::PutEvent {
                    event: EventRow {
                        id: EventId(1),
                        name: "nightly".to_string(),
                        schedule: "daily".to_string(),
                        kind: EventKind::Plan {
                            plan: plan.to_string(),
                        },
                        priority: Priority::new(5).unwrap(),
                        blocking: false,
                        enabled: true,
                        next_due: None,
                    },
                    replace: false,
                },
            ])
            .unwrap();
    }
    let due = Timestamp::from_second(1_800_000_000 + job as i64 * 60).unwrap();
    let j = JobRecord {
        id: JobId(job),
        kind: JobKind::Backup {
            plan: plan.to_string(),
        },
        event: EventId(1),
        due_at: due,
        backup_day: day("20270101"),
        priority: Priority::new(5).unwrap(),
        attempt: 1,
        state: JobState::Queued {
            waiting_on: WaitReason::Broker,
        },
        owner: None,
        plan_text: None,
        plan_sha256: None,
        progress: None,
        created: now,
        started: None,
        ended: None,
        stop_requested: None,
    };
    store
        .commit(vec![Change::InsertJob {
            occurrence: OccurrenceRow {
                event: EventId(1),
                due,
                backup_day: j.backup_day,
                outcome: OccurrenceOutcome::Started(j.id),
            },
            job: j,
        }])
        .unwrap();
}

fn mem_engine() -> (Engine, Arc<MemStorage>) {
    let layout = TableOptions::default().layout().unwrap();
    let storage = Arc::new(MemStorage::new("table", layout.file_bytes()));
    (
        Engine::create(storage.clone(), EngineOptions::default()).unwrap(),
        storage,
    )
}

/// Two extents of a 4 MiB source: its first MiB at target 0, its last two MiB at target 1 MiB.
fn two_extents() -> Vec<ExtentSpec> {
    vec![
        ExtentSpec {
            source_offset: 0,
            target_offset: 0,
            len: MIB,
        },
        ExtentSpec {
            source_offset: 2 * MIB,
            target_offset: MIB,
            len: 2 * MIB,
        },
    ]
}

/// The image bytes of `extents` over `data` (extents end to end).
fn image_of(data: &[u8], extents: &[ExtentSpec]) -> Vec<u8> {
    extents
        .iter()
        .flat_map(|e| data[e.source_offset as usize..(e.source_offset + e.len) as usize].to_vec())
        .collect()
}

struct Backup {
    image: ImageId,
    session: SessionId,
}

/// Cut a session of `source` onto `target`, record it, and (copy) copy it to the end, then
/// validate it with its checksums; a nocopy image is validated at the cut.
#[allow(clippy::too_many_arguments)]
fn backup(
    store: &dyn Store,
    engine: &Engine,
    volumes: &dyn Volumes,
    table: &Path,
    (job, plan, backup_day): (u64, &str, &str),
    source: VolumeId,
    target: VolumeId,
    extents: Vec<ExtentSpec>,
    mode: CopyMode,
) -> Backup {
    let session = engine
        .establish(&SessionSpec {
            source,
            target,
            extents,
            grain: GrainSize::new(GRAIN).unwrap(),
            mode,
            incremental: false,
        })
        .unwrap();
    let desc = engine.session(session).unwrap().desc.clone();
    let cut = Cut {
        job: JobId(job),
        task: 0,
        plan,
        backup_day: day(backup_day),
        table,
    };
    let image = record_cut(store, &cut, &desc).unwrap();
    let checksums = match mode {
        CopyMode::Copy => {
            engine.copy_all(session, GrainCount(16)).unwrap();
            let row = store.image(image).unwrap().unwrap();
            let reader = ImageReader::open(&row, volumes, Some(engine)).unwrap();
            Some(images::checksums(&reader, image_bytes(&row)).unwrap())
        }
        CopyMode::NoCopy => None,
    };
    validate(store, &engine.status(), image, checksums).unwrap();
    Backup { image, session }
}

fn state(store: &dyn Store, image: ImageId) -> ImageState {
    store.image(image).unwrap().unwrap().state
}

/// A memory fixture: engine, volumes, store and one job.
struct Mem {
    engine: Engine,
    storage: Arc<MemStorage>,
    volumes: MemVolumes,
    store: MemStore,
    clock: ManualClock,
}

impl Mem {
    fn new() -> Mem {
        let (engine, storage) = mem_engine();
        let m = Mem {
            engine,
            storage,
            volumes: MemVolumes::default(),
            store: MemStore::new(),
            clock: clock(),
        };
        put_job(&m.store, 1, "db", &m.clock);
        m
    }

    fn volume(&self, v: MemVolume) -> (Arc<MemVolume>, VolumeId) {
        let v = Arc::new(v);
        self.volumes.add(v.clone());
        let id = self.engine.attach(v.clone());
        (v, id)
    }

    fn backup(
        &self,
        plan_day: (&str, &str),
        source: VolumeId,
        target: VolumeId,
        extents: Vec<ExtentSpec>,
        mode: CopyMode,
    ) -> Backup {
        backup(
            &self.store,
            &self.engine,
            &self.volumes,
            Path::new("mem-table"),
            (1, plan_day.0, plan_day.1),
            source,
            target,
            extents,
            mode,
        )
    }
}

#[test]
fn cat_01_cut_row_is_incomplete_until_completed_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orchestration.sqlite");
    let c = clock();
    let store = SqliteStore::open(&db).unwrap();
    put_job(&store, 1, "db", &c);
    let (engine, _) = mem_engine();
    let src_data = pattern(4 * MIB, 1);
    let src = engine.attach(Arc::new(MemVolume::with_data("src", &src_data)));
    let tgt_vol = Arc::new(MemVolume::new("tgt", 3 * MIB as usize));
    let tgt = engine.attach(tgt_vol.clone());
    let volumes = MemVolumes::default();
    volumes.add(tgt_vol);
    let session = engine
        .establish(&SessionSpec {
            extents: two_extents(),
            grain: GrainSize::new(GRAIN).unwrap(),
            ..SessionSpec::whole(src, tgt)
        })
        .unwrap();
    let desc = engine.session(session).unwrap().desc.clone();
    let table = PathBuf::from("/var/lib/timezero/db.tzt");
    let cut = Cut {
        job: JobId(1),
        task: 0,
        plan: "db",
        backup_day: day("20270101"),
        table: &table,
    };
    let id = record_cut(&store, &cut, &desc).unwrap();
    let row = store.image(id).unwrap().unwrap();
    assert_eq!(row.state, ImageState::Incomplete);
    assert_eq!(row.t0_unix_ms, engine.status()[0].created_unix_ms);
    assert_eq!(
        (row.mode, row.grain.bytes(), &row.extents),
        (CopyMode::Copy, GRAIN, &two_extents())
    );
    assert_eq!((&row.source, &row.target), (&desc.source, &desc.target));
    assert_eq!(row.session, session);

    // Incomplete: never restorable; not valid before the copy completed.
    assert!(matches!(
        restore::choose(&store, &Pick::Image(id)),
        Err(CatalogError::State {
            needed: "valid",
            ..
        })
    ));
    assert!(matches!(
        validate(&store, &engine.status(), id, None),
        Err(CatalogError::Session { .. })
    ));
    engine.copy_all(session, GrainCount(8)).unwrap();
    let reader = ImageReader::open(&row, &volumes, Some(&engine)).unwrap();
    let sums = images::checksums(&reader, image_bytes(&row)).unwrap();
    assert_eq!(sums.sums.len(), 3);
    validate(&store, &engine.status(), id, Some(sums.clone())).unwrap();
    // Committing again (recovery of the catalog step) is harmless.
    validate(&store, &engine.status(), id, Some(sums.clone())).unwrap();
    assert_eq!(state(&store, id), ImageState::Valid);

    // The table forgets the ended session; the row keeps everything a restore needs.
    engine.forget(session).unwrap();
    assert!(engine.status().is_empty());
    drop(store);
    let store = SqliteStore::open(&db).unwrap();
    let row = restore::choose(&store, &Pick::Image(id)).unwrap();
    assert_eq!((&row.source, &row.target), (&desc.source, &desc.target));
    assert_eq!(row.checksums, Some(sums));
    assert_eq!(row.extents, two_extents());

    // A nocopy image is valid at its cut.
    put_job(&store, 2, "db", &c);
    let tgt2 = engine.attach(Arc::new(MemVolume::new("tgt2", 4 * MIB as usize)));
    let nocopy = backup(
        &store,
        &engine,
        &volumes,
        &table,
        (2, "db", "20270101"),
        src,
        tgt2,
        Vec::new(),
        CopyMode::NoCopy,
    );
    assert_eq!(state(&store, nocopy.image), ImageState::Valid);
}

#[test]
fn cat_02_ls_lists_valid_images_and_show_adds_the_details() {
    let m = Mem::new();
    let (_, src) = m.volume(MemVolume::with_data("src", &pattern(4 * MIB, 2)));
    let (_, t1) = m.volume(MemVolume::new("t1", 3 * MIB as usize));
    let (_, t2) = m.volume(MemVolume::new("t2", 4 * MIB as usize));
    let a = m.backup(("db", "20270101"), src, t1, two_extents(), CopyMode::Copy);
    // An image cut but never completed.
    let s = m.engine.establish(&SessionSpec::whole(src, t2)).unwrap();
    let desc = m.engine.session(s).unwrap().desc.clone();
    let incomplete = record_cut(
        &m.store,
        &Cut {
            job: JobId(1),
            task: 1,
            plan: "db",
            backup_day: day("20270102"),
            table: Path::new("mem-table"),
        },
        &desc,
    )
    .unwrap();

    let ls = list(&m.store, &CatalogQuery::default()).unwrap();
    assert_eq!(ls.len(), 1);
    assert_eq!(
        (ls[0].id, ls[0].mode, ls[0].bytes, ls[0].state),
        (a.image, "copy", 3 * MIB, ImageStateKind::Valid)
    );
    assert_eq!(ls[0].backup_day, day("20270101"));
    assert_eq!(ls[0].source, "mem:src");
    let all = list(
        &m.store,
        &CatalogQuery {
            all: true,
            ..CatalogQuery::default()
        },
    )
    .unwrap();
    assert_eq!(
        all.iter().map(|l| l.id).collect::<Vec<_>>(),
        [a.image, incomplete]
    );
    let q = |plan: Option<&str>, source: Option<&str>, d: Option<&str>| CatalogQuery {
        plan: plan.map(str::to_string),
        source: source.map(str::to_string),
        day: d.map(day),
        all: true,
    };
    assert_eq!(list(&m.store, &q(Some("web"), None, None)).unwrap(), []);
    assert_eq!(
        list(&m.store, &q(None, Some("mem:other"), None)).unwrap(),
        []
    );
    assert_eq!(
        list(&m.store, &q(Some("db"), Some("mem:src"), Some("20270102")))
            .unwrap()
            .iter()
            .map(|l| l.id)
            .collect::<Vec<_>>(),
        [incomplete]
    );

    let shown = show(&m.store, a.image).unwrap();
    assert_eq!(shown.bytes, 3 * MIB);
    assert_eq!(shown.record.session, a.session);
    assert_eq!(shown.record.target.locator, "mem:t1");
    assert_eq!(shown.record.checksums.as_ref().unwrap().sums.len(), 3);
    let json = serde_json::to_value(&shown).unwrap();
    assert_eq!(json["bytes"], 3 * MIB);
    assert_eq!(
        json["extents"][1],
        serde_json::json!([2 * MIB, MIB, 2 * MIB])
    );
    assert_eq!(json["state"]["state"], "valid");
    assert!(matches!(
        show(&m.store, ImageId(99)),
        Err(CatalogError::UnknownImage(ImageId(99)))
    ));
}

/// A file-backed engine in a temporary directory.
struct Files {
    dir: tempfile::TempDir,
    engine: Engine,
    table: PathBuf,
    volumes: FileVolumes,
    store: MemStore,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("t.tzt");
        let engine = Engine::create_path(&table, EngineOptions::default()).unwrap();
        let store = MemStore::new();
        put_job(&store, 1, "db", &clock());
        Files {
            dir,
            engine,
            table,
            volumes: FileVolumes::default(),
            store,
        }
    }

    fn file(&self, name: &str, data: &[u8]) -> (PathBuf, VolumeId) {
        let p = self.dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let id = self.engine.attach_path(&p).unwrap();
        (p, id)
    }

    fn backup(
        &self,
        backup_day: &str,
        source: VolumeId,
        target: VolumeId,
        extents: Vec<ExtentSpec>,
        mode: CopyMode,
    ) -> Backup {
        backup(
            &self.store,
            &self.engine,
            &self.volumes,
            &self.table,
            (1, "db", backup_day),
            source,
            target,
            extents,
            mode,
        )
    }
}

#[test]
fn cat_03_verify_finds_the_mib_changed_in_the_target_file() {
    let f = Files::new();
    let (_, src) = f.file("src", &pattern(4 * MIB, 3));
    let (tgt_path, tgt) = f.file("tgt", &vec![0u8; 3 * MIB as usize]);
    let b = f.backup("20270101", src, tgt, two_extents(), CopyMode::Copy);
    let report = verify(&f.store, b.image, &f.volumes, Some(&f.engine)).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.blocks, report.first_mismatch_mib), (3, None));

    // One byte flipped in place, outside timezero: image MiB 2 is target MiB 2.
    let mut bytes = std::fs::read(&tgt_path).unwrap();
    let at = (2 * MIB + 12_345) as usize;
    bytes[at] ^= 0x40;
    std::fs::write(&tgt_path, &bytes).unwrap();
    let report = verify(&f.store, b.image, &f.volumes, Some(&f.engine)).unwrap();
    assert_eq!((report.mismatches, report.first_mismatch_mib), (1, Some(2)));
    assert!(!report.ok());

    // An image without checksums cannot be verified.
    let (_, t2) = f.file("t2", &vec![0u8; 4 * MIB as usize]);
    let nocopy = f.backup("20270101", src, t2, Vec::new(), CopyMode::NoCopy);
    assert!(matches!(
        verify(&f.store, nocopy.image, &f.volumes, Some(&f.engine)),
        Err(CatalogError::Checksums { .. })
    ));
}

#[test]
fn cat_03_checksums_are_crc32c_and_rows_with_crc32_still_verify() {
    use crate::store::{ChecksumAlgorithm, ImageChecksums};
    let f = Files::new();
    let data = pattern(4 * MIB, 5);
    let (_, src) = f.file("src", &data);
    let (_, tgt) = f.file("tgt", &vec![0u8; 4 * MIB as usize]);
    let b = f.backup("20270101", src, tgt, Vec::new(), CopyMode::Copy);
    let stored = f.store.image(b.image).unwrap().unwrap().checksums.unwrap();
    assert_eq!(stored.algorithm, ChecksumAlgorithm::Crc32c);
    let want: Vec<u32> = data.chunks(MIB as usize).map(crc32c::crc32c).collect();
    assert_eq!(stored.sums, want);

    // A row written with CRC32 (before CRC32C) is verified with CRC32.
    let (old_path, old_tgt) = f.file("old", &vec![0u8; 4 * MIB as usize]);
    let session = f
        .engine
        .establish(&SessionSpec {
            source: src,
            target: old_tgt,
            extents: Vec::new(),
            grain: GrainSize::new(GRAIN).unwrap(),
            mode: CopyMode::Copy,
            incremental: false,
        })
        .unwrap();
    let desc = f.engine.session(session).unwrap().desc.clone();
    let cut = Cut {
        job: JobId(1),
        task: 1,
        plan: "db",
        backup_day: day("20270101"),
        table: Path::new("t"),
    };
    let old = record_cut(&f.store, &cut, &desc).unwrap();
    f.engine.copy_all(session, GrainCount(16)).unwrap();
    let crc32 = ImageChecksums {
        algorithm: ChecksumAlgorithm::Crc32,
        block_bytes: MIB,
        image_bytes: 4 * MIB,
        sums: data.chunks(MIB as usize).map(crc32fast::hash).collect(),
    };
    validate(&f.store, &f.engine.status(), old, Some(crc32)).unwrap();
    let report = verify(&f.store, old, &f.volumes, Some(&f.engine)).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.algorithm, ChecksumAlgorithm::Crc32);
    let mut bytes = std::fs::read(&old_path).unwrap();
    bytes[(3 * MIB + 7) as usize] ^= 1;
    std::fs::write(&old_path, &bytes).unwrap();
    let report = verify(&f.store, old, &f.volumes, Some(&f.engine)).unwrap();
    assert_eq!((report.mismatches, report.first_mismatch_mib), (1, Some(3)));
    // The CRC32C image next to it is untouched.
    assert!(verify(&f.store, b.image, &f.volumes, Some(&f.engine))
        .unwrap()
        .ok());
}

#[test]
fn cat_04_reconcile_marks_changed_targets_and_ended_nocopy_sessions_lost() {
    let m = Mem::new();
    let data = pattern(4 * MIB, 4);
    let (_, src) = m.volume(MemVolume::with_data("src", &data));
    let (_, ta) = m.volume(MemVolume::new("ta", 4 * MIB as usize));
    let (_, tb) = m.volume(MemVolume::new("tb", 4 * MIB as usize));
    let (tc_vol, tc) = m.volume(MemVolume::new("tc", 4 * MIB as usize));
    let (td_vol, td) = m.volume(MemVolume::new("td", 4 * MIB as usize));
    let (_, te) = m.volume(MemVolume::new("te", 4 * MIB as usize));
    let (_, tf) = m.volume(MemVolume::new("tf", 4 * MIB as usize));
    let kept = m.backup(("db", "20270101"), src, ta, Vec::new(), CopyMode::Copy);
    let vanished = m.backup(("db", "20270101"), src, tb, Vec::new(), CopyMode::Copy);
    let rewritten = m.backup(("db", "20270101"), src, tc, Vec::new(), CopyMode::Copy);
    let resized = m.backup(("db", "20270101"), src, td, Vec::new(), CopyMode::Copy);
    let terminated = m.backup(("db", "20270101"), src, te, Vec::new(), CopyMode::NoCopy);
    let live = m.backup(("db", "20270101"), src, tf, Vec::new(), CopyMode::NoCopy);

    assert!(m.volumes.remove("mem:tb").unwrap());
    tc_vol.set_generation(Generation(7));
    td_vol.resize(2 * MIB as usize);
    let why = Reason::new(ReasonCode::VolumeMissing, "mem:te is gone");
    m.engine.terminate(terminated.session, why.clone()).unwrap();

    let report = reconcile(&m.store, &m.engine, Path::new("mem-table"), &[], &m.volumes).unwrap();
    assert_eq!(report.done.len(), 4, "{report:?}");
    assert_eq!(state(&m.store, kept.image), ImageState::Valid);
    assert_eq!(state(&m.store, live.image), ImageState::Valid);
    let lost = |i: ImageId| match state(&m.store, i) {
        ImageState::Lost { why, engine } => (why, engine),
        s => panic!("image {i} is {s:?}"),
    };
    assert!(lost(vanished.image).0.contains("is gone"));
    assert!(lost(rewritten.image).0.contains("generation 0 is now 7"));
    assert!(lost(resized.image).0.contains("changed size"));
    let (text, engine_reason) = lost(terminated.image);
    assert!(text.contains("terminated"), "{text}");
    assert_eq!(engine_reason, Some(why));

    // Nothing more to do the second time.
    let again = reconcile(&m.store, &m.engine, Path::new("mem-table"), &[], &m.volumes).unwrap();
    assert!(again.done.is_empty());
}

#[test]
fn cat_04_reconcile_after_reopen_takes_the_engines_decision() {
    let m = Mem::new();
    let (src_vol, src) = m.volume(MemVolume::with_data("src", &pattern(4 * MIB, 5)));
    let (tgt_vol, tgt) = m.volume(MemVolume::new("tgt", 4 * MIB as usize));
    let b = m.backup(("db", "20270101"), src, tgt, Vec::new(), CopyMode::NoCopy);
    let Mem {
        engine,
        storage,
        store,
        volumes,
        ..
    } = m;
    drop(engine); // kill -9: no close
                  // The target comes back as another device.
    tgt_vol.set_id(VolumeId::from_parts(9, 9));
    let mut r = MapResolver::default();
    r.add(src_vol);
    r.add(tgt_vol);
    let engine = Engine::open(storage, &r, EngineOptions::default()).unwrap();
    let decision = engine
        .decisions
        .iter()
        .find(|d| d.session == b.session)
        .unwrap();
    let Outcome::Terminated(reason) = &decision.outcome else {
        panic!("{decision:?}");
    };
    let reason = reason.clone();
    reconcile(
        &store,
        &engine,
        Path::new("mem-table"),
        &engine.decisions,
        &volumes,
    )
    .unwrap();
    match state(&store, b.image) {
        ImageState::Lost { engine, .. } => assert_eq!(engine, Some(reason)),
        s => panic!("{s:?}"),
    }
}

#[test]
fn cat_04_a_suspended_nocopy_session_keeps_its_image_valid() {
    let m = Mem::new();
    let (src_vol, src) = m.volume(MemVolume::with_data("src", &pattern(4 * MIB, 6)));
    let (tgt_vol, tgt) = m.volume(MemVolume::new("tgt", 4 * MIB as usize));
    let b = m.backup(("db", "20270101"), src, tgt, Vec::new(), CopyMode::NoCopy);
    let Mem {
        engine,
        storage,
        store,
        volumes,
        ..
    } = m;
    drop(engine); // kill -9: no close
                  // Reopened while the target is away: the session is suspended, not ended.
    let mut r = MapResolver::default();
    r.add(src_vol.clone());
    let engine = Engine::open(storage.clone(), &r, EngineOptions::default()).unwrap();
    assert!(engine
        .decisions
        .iter()
        .any(|d| d.session == b.session && matches!(d.outcome, Outcome::Suspended(_))));
    let report = reconcile(
        &store,
        &engine,
        Path::new("mem-table"),
        &engine.decisions,
        &volumes,
    )
    .unwrap();
    assert!(report.done.is_empty(), "{report:?}");
    assert_eq!(state(&store, b.image), ImageState::Valid);
    // The target is back: the session resumes with its T0 and the image is still valid.
    drop(engine);
    r.add(tgt_vol);
    let engine = Engine::open(storage, &r, EngineOptions::default()).unwrap();
    assert_eq!(
        engine
            .status()
            .iter()
            .find(|s| s.id == b.session)
            .unwrap()
            .state,
        SessionState::Active
    );
    reconcile(
        &store,
        &engine,
        Path::new("mem-table"),
        &engine.decisions,
        &volumes,
    )
    .unwrap();
    assert_eq!(state(&store, b.image), ImageState::Valid);
}

fn row(id: u64, t0: u64, d: &str, source: &str) -> ImageRecord {
    let v = |loc: &str| crate::VolumeRef {
        id: VolumeId::from_parts(id, 1),
        size: MIB,
        sector_size: 512,
        generation: Generation(0),
        locator: loc.to_string(),
    };
    ImageRecord {
        id: ImageId(id),
        job: JobId(1),
        task: 0,
        plan: "db".to_string(),
        backup_day: day(d),
        table: PathBuf::from("mem-table"),
        session: SessionId(id),
        t0_unix_ms: t0,
        mode: CopyMode::Copy,
        grain: GrainSize::new(GRAIN).unwrap(),
        source: v(source),
        target: v(&format!("mem:i{id}")),
        extents: vec![ExtentSpec {
            source_offset: 0,
            target_offset: 0,
            len: MIB,
        }],
        state: ImageState::Valid,
        checksums: None,
    }
}

#[test]
fn cat_05_retention_keeps_what_its_rules_name() {
    // Two images a day from Mon 2027-01-04 to Sun 2027-02-14 (six weeks), one source; the
    // other source's images are a group of their own.
    let mut rows = Vec::new();
    let mut d = jiff::civil::date(2027, 1, 4);
    let mut id = 1;
    while d <= jiff::civil::date(2027, 2, 14) {
        let text = format!("{:04}{:02}{:02}", d.year(), d.month(), d.day());
        for _ in 0..2 {
            rows.push(row(id, id * 1000, &text, "mem:src"));
            id += 1;
        }
        d = d.tomorrow().unwrap();
    }
    let newest = id - 1; // 84: the second image of 2027-02-14
    rows.push(row(500, 1, "20270101", "mem:other"));
    // Not Valid: never chosen, never counted.
    let mut lost = row(600, 999_999, "20270215", "mem:src");
    lost.state = ImageState::Lost {
        why: "gone".to_string(),
        engine: None,
    };
    rows.push(lost);

    let keep = Keep {
        last: 3,
        daily: 2,
        weekly: 2,
        monthly: 2,
    };
    let d = choose_expired(&rows, &keep).unwrap();
    let kept: Vec<(u64, Vec<KeepRule>)> = d.keep.iter().map(|(i, r)| (i.0, r.clone())).collect();
    use KeepRule::*;
    assert_eq!(
        kept,
        vec![
            // The other source: a group of its own (groups come by plan, then source).
            (500, vec![Last, Daily, Weekly, Monthly]),
            // 2027-02-14 (Sunday, ISO week 6, February): the day's newest.
            (newest, vec![Last, Daily, Weekly, Monthly]),
            (newest - 1, vec![Last]),
            // 2027-02-13: the day's newest is the third newest.
            (newest - 2, vec![Last, Daily]),
            // ISO week 5 ends on Sunday 2027-02-07: its newest.
            (70, vec![Weekly]),
            // January's newest: 2027-01-31 (second image).
            (56, vec![Monthly]),
        ]
    );
    assert_eq!(d.expire.len(), 84 - 5);
    assert!(!d.expire.contains(&ImageId(600)));

    assert!(matches!(
        choose_expired(&rows, &Keep::default()),
        Err(CatalogError::Invalid { .. })
    ));
}

#[test]
fn cat_05_expiry_marks_first_and_reconcile_finishes_a_half_done_one() {
    let f = Files::new();
    let data = pattern(4 * MIB, 6);
    let (src_path, src) = f.file("src", &data);
    let mut copies = Vec::new();
    for (n, d) in ["20270101", "20270102", "20270103"].iter().enumerate() {
        let (p, t) = f.file(&format!("img{n}"), &vec![0u8; 4 * MIB as usize]);
        copies.push((p, f.backup(d, src, t, Vec::new(), CopyMode::Copy)));
    }
    let (_, nt) = f.file("nocopy", &vec![0u8; 4 * MIB as usize]);
    let nocopy = f.backup("20270101", src, nt, Vec::new(), CopyMode::NoCopy);

    let rows = f
        .store
        .images(&crate::store::ImageQuery::default())
        .unwrap();
    let copy_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.mode == CopyMode::Copy)
        .cloned()
        .collect();
    let decision = choose_expired(
        &copy_rows,
        &Keep {
            last: 1,
            ..Keep::default()
        },
    )
    .unwrap();
    let mut expired = decision.expire.clone();
    expired.sort();
    assert_eq!(expired, [copies[0].1.image, copies[1].1.image]);

    // Step one only, as if killed before step two.
    mark_expired(&f.store, &expired).unwrap();
    assert!(copies.iter().all(|(p, _)| p.exists()));
    assert_eq!(state(&f.store, expired[0]), ImageState::Expired);
    // Expired images are not restorable.
    assert!(restore::choose(&f.store, &Pick::Image(expired[0])).is_err());

    // The second expired image's path now holds a new file that a Valid image uses: it must
    // survive (another file, and a Valid row names it).
    let fresh = f.dir.path().join("fresh");
    std::fs::write(&fresh, vec![0u8; 4 * MIB as usize]).unwrap();
    std::fs::rename(&fresh, &copies[1].0).unwrap();
    let reused = f.engine.attach_path(&copies[1].0).unwrap();
    put_job(&f.store, 2, "db", &clock());
    let newer = backup(
        &f.store,
        &f.engine,
        &f.volumes,
        &f.table,
        (2, "db", "20270104"),
        src,
        reused,
        Vec::new(),
        CopyMode::Copy,
    );

    let locator = |i: ImageId| f.store.image(i).unwrap().unwrap().target.locator;
    let report = reconcile(&f.store, &f.engine, &f.table, &[], &f.volumes).unwrap();
    assert_eq!(
        report.done,
        [ReconcileAction::RemoveTarget {
            image: expired[0],
            locator: locator(expired[0])
        }]
    );
    assert!(!copies[0].0.exists());
    assert!(copies[1].0.exists() && copies[2].0.exists());
    assert_eq!(state(&f.store, newer.image), ImageState::Valid);
    assert_eq!(
        finish_expiry(&f.store, Some(&f.engine), &f.volumes, expired[1]).unwrap(),
        Finished::LeftAlone(format!(
            "{} is no longer the target of {} (another file is there)",
            locator(expired[1]),
            expired[1]
        ))
    );
    // A Valid image's file is never removed by an expiry.
    assert!(matches!(
        finish_expiry(&f.store, Some(&f.engine), &f.volumes, copies[2].1.image),
        Err(CatalogError::State { .. })
    ));

    // A nocopy image: marked, then its session withdrawn by reconcile.
    mark_expired(&f.store, &[nocopy.image]).unwrap();
    assert!(f
        .engine
        .status()
        .iter()
        .any(|s| s.id == nocopy.session && s.state == SessionState::Active));
    let report = reconcile(&f.store, &f.engine, &f.table, &[], &f.volumes).unwrap();
    assert_eq!(
        report.done,
        [ReconcileAction::Withdraw {
            image: nocopy.image,
            session: nocopy.session
        }]
    );
    let s = f.engine.status();
    let s = s.iter().find(|s| s.id == nocopy.session).unwrap();
    assert_eq!(s.state, SessionState::Withdrawn);
    // The whole expiry in one call: removed at once.
    let all = expire(&f.store, Some(&f.engine), &f.volumes, &[copies[2].1.image]).unwrap();
    assert_eq!(all, [(copies[2].1.image, Finished::Removed)]);
    assert!(!copies[2].0.exists());
    assert!(src_path.exists());
}

#[test]
fn cat_06_restore_picks_the_newest_valid_image_at_or_before_t_and_narrows_extents() {
    let store = MemStore::new();
    put_job(&store, 1, "db", &clock());
    let put = |r: ImageRecord, st: ImageState| {
        let id = r.id;
        store
            .commit(vec![Change::PutImage(ImageRecord {
                state: ImageState::Incomplete,
                ..r
            })])
            .unwrap();
        if st != ImageState::Incomplete {
            store
                .commit(vec![Change::SetImageState {
                    image: id,
                    from: ImageStateKind::Incomplete,
                    to: st,
                }])
                .unwrap();
        }
    };
    put(row(1, 1000, "20270101", "mem:src"), ImageState::Valid);
    put(row(2, 2000, "20270102", "mem:src"), ImageState::Valid);
    put(row(3, 2500, "20270102", "mem:src"), ImageState::Incomplete);
    put(row(4, 2600, "20270102", "mem:other"), ImageState::Valid);
    put(
        row(5, 2700, "20270102", "mem:src"),
        ImageState::Lost {
            why: "gone".to_string(),
            engine: None,
        },
    );
    let pick = |at| Pick::Newest {
        plan: "db".to_string(),
        source: "mem:src".to_string(),
        at_or_before_ms: at,
    };
    assert_eq!(
        restore::choose(&store, &pick(u64::MAX)).unwrap().id,
        ImageId(2)
    );
    assert_eq!(restore::choose(&store, &pick(1999)).unwrap().id, ImageId(1));
    assert_eq!(restore::choose(&store, &pick(1000)).unwrap().id, ImageId(1));
    assert!(matches!(
        restore::choose(&store, &pick(999)),
        Err(CatalogError::NoImage { .. })
    ));
    assert!(matches!(
        restore::choose(&store, &Pick::Image(ImageId(3))),
        Err(CatalogError::State {
            found: "incomplete",
            ..
        })
    ));

    // Narrowing: source offsets, cut to the image's extents.
    let mut img = row(9, 0, "20270101", "mem:src");
    img.extents = two_extents();
    assert_eq!(restore_pieces(&img, &[]).unwrap().len(), 2);
    let p = restore_pieces(&img, &[(MIB / 2, 2 * MIB)]).unwrap();
    assert_eq!(
        p,
        [
            RestorePiece {
                image_offset: MIB / 2,
                target_offset: MIB / 2,
                dest_offset: MIB / 2,
                len: MIB / 2
            },
            RestorePiece {
                image_offset: MIB,
                target_offset: MIB,
                dest_offset: 2 * MIB,
                len: MIB / 2
            },
        ]
    );
    for bad in [
        vec![(MIB + 4096, 4096)],
        vec![(0, 0)],
        vec![(0, MIB), (MIB / 2, MIB)],
    ] {
        assert!(
            matches!(restore_pieces(&img, &bad), Err(CatalogError::Extent { .. })),
            "{bad:?}"
        );
    }

    // A narrowed restore reads and writes only that range.
    let m = Mem::new();
    let data = pattern(4 * MIB, 7);
    let (_, src) = m.volume(MemVolume::with_data("src", &data));
    let (_, tgt) = m.volume(MemVolume::new("tgt", 3 * MIB as usize));
    let b = m.backup(("db", "20270101"), src, tgt, two_extents(), CopyMode::Copy);
    let (dest_vol, dest) = m.volume(MemVolume::new("dest", 4 * MIB as usize));
    let image = restore::choose(&m.store, &Pick::Image(b.image)).unwrap();
    let pieces = restore_pieces(&image, &[(2 * MIB + GRAIN, GRAIN)]).unwrap();
    let reader = ImageReader::open(&image, &m.volumes, Some(&m.engine)).unwrap();
    stream(
        &m.engine,
        &reader,
        dest,
        &pieces,
        0,
        &StreamOptions::default(),
        &mut |_| Ok(()),
    )
    .unwrap();
    let got = dest_vol.snapshot();
    let (a, z) = ((2 * MIB + GRAIN) as usize, (2 * MIB + 2 * GRAIN) as usize);
    assert_eq!(got[a..z], data[a..z]);
    assert!(got[..a].iter().chain(&got[z..]).all(|&x| x == 0));
}

#[test]
fn cat_07_copy_restore_reverses_the_extents_and_resumes_after_kill() {
    let m = Mem::new();
    let t0 = pattern(4 * MIB, 8);
    let (src_vol, src) = m.volume(MemVolume::with_data("src", &t0));
    let (tgt_vol, tgt) = m.volume(MemVolume::new("tgt", 3 * MIB as usize));
    let b = m.backup(("db", "20270101"), src, tgt, two_extents(), CopyMode::Copy);
    m.engine
        .write(src, 0, &vec![0xee; 4 * MIB as usize])
        .unwrap();
    let (dest_vol, dest) = m.volume(MemVolume::new("dest", 4 * MIB as usize));

    let plan = plan_restore(
        &m.store,
        &m.engine.status(),
        &Pick::Image(b.image),
        "mem:dest",
        &[],
    )
    .unwrap();
    assert_eq!(plan.method, RestoreMethod::CopySession);
    let (image, pieces) = (plan.image, plan.pieces);
    let r = start_copy_restore(&m.engine, &image, &pieces, tgt, dest).unwrap();
    let st = m.engine.status();
    let st = st.iter().find(|s| s.id == r).unwrap();
    assert_eq!(
        st.extents,
        [
            ExtentSpec {
                source_offset: 0,
                target_offset: 0,
                len: MIB
            },
            ExtentSpec {
                source_offset: MIB,
                target_offset: 2 * MIB,
                len: 2 * MIB
            },
        ]
    );
    // Part of the copy, then kill -9 (no close) and reopen the table.
    m.engine
        .copy_batch(r, GrainIndex::ZERO, GrainCount(8))
        .unwrap();
    let Mem {
        engine, storage, ..
    } = m;
    drop(engine);
    let mut res = MapResolver::default();
    for v in [src_vol, tgt_vol, dest_vol.clone()] {
        res.add(v);
    }
    let engine = Engine::open(storage, &res, EngineOptions::default()).unwrap();
    let d = engine.decisions.iter().find(|d| d.session == r).unwrap();
    assert!(matches!(d.outcome, Outcome::Resumed), "{d:?}");
    let copied = run_copy_restore(&engine, r).unwrap();
    assert_eq!(copied, GrainCount(3 * MIB / GRAIN - 8));
    let got = dest_vol.snapshot();
    let (one, two) = (MIB as usize, 2 * MIB as usize);
    assert_eq!(got[..one], t0[..one]);
    assert!(got[one..two].iter().all(|&x| x == 0));
    assert_eq!(got[two..], t0[two..]);
}

#[test]
fn cat_08_in_place_restore_streams_through_the_engine_and_keeps_other_sessions_t0() {
    let m = Mem::new();
    let a = pattern(4 * MIB, 9);
    let (src_vol, src) = m.volume(MemVolume::with_data("src", &a));
    let (_, tgt) = m.volume(MemVolume::new("tgt", 4 * MIB as usize));
    let b = m.backup(("db", "20270101"), src, tgt, Vec::new(), CopyMode::Copy);
    // The source moves on, and another session takes its own T0 of it.
    let later = pattern(4 * MIB, 10);
    m.engine.write(src, 0, &later).unwrap();
    let (_, other_tgt) = m.volume(MemVolume::new("other", 4 * MIB as usize));
    let other = m
        .engine
        .establish(&SessionSpec {
            mode: CopyMode::NoCopy,
            ..SessionSpec::whole(src, other_tgt)
        })
        .unwrap();

    let plan = plan_restore(
        &m.store,
        &m.engine.status(),
        &Pick::Image(b.image),
        "mem:src",
        &[],
    )
    .unwrap();
    assert_eq!(plan.method, RestoreMethod::Stream);
    let (image, pieces) = (plan.image, plan.pieces);
    let reader = ImageReader::open(&image, &m.volumes, Some(&m.engine)).unwrap();
    let opts = StreamOptions {
        buffers: 3,
        buffer_bytes: 256 << 10,
        checkpoint_bytes: MIB,
    };
    // Killed after the first checkpoint (its position is what the job record keeps).
    let mut saved = None;
    let err = stream(&m.engine, &reader, src, &pieces, 0, &opts, &mut |p| {
        saved = Some(p.job_progress());
        Err(CatalogError::Stopped {
            at: p.position,
            why: "killed".to_string(),
        })
    })
    .unwrap_err();
    assert!(matches!(err, CatalogError::Stopped { at, .. } if at == MIB));
    let saved = saved.unwrap();
    assert_eq!((saved.checkpoint, saved.bytes_total), (Some(MIB), 4 * MIB));
    let now = src_vol.snapshot();
    assert_eq!(now[..MIB as usize], a[..MIB as usize]);
    // Resumed from the checkpoint.
    let mut checkpoints = Vec::new();
    let report = stream(
        &m.engine,
        &reader,
        src,
        &pieces,
        saved.checkpoint.unwrap(),
        &opts,
        &mut |p| {
            checkpoints.push(p.position);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!((report.started_at, report.bytes), (MIB, 3 * MIB));
    assert_eq!(checkpoints, [2 * MIB, 3 * MIB]);
    assert_eq!(src_vol.snapshot(), a);
    // The other session still reads its T0.
    let mut img = vec![0u8; 4 * MIB as usize];
    m.engine.read_image(other, 0, &mut img).unwrap();
    assert_eq!(img, later);

    // A nocopy image is streamed from Engine::read_image.
    let (_, nt) = m.volume(MemVolume::new("nt", 4 * MIB as usize));
    let n = m.backup(("db", "20270101"), src, nt, Vec::new(), CopyMode::NoCopy);
    m.engine.write(src, MIB, &vec![1u8; MIB as usize]).unwrap();
    let (dest_vol, dest) = m.volume(MemVolume::new("dest", 4 * MIB as usize));
    let image = restore::choose(&m.store, &Pick::Image(n.image)).unwrap();
    assert_eq!(RestoreMethod::of(&image, false), RestoreMethod::Stream);
    let reader = ImageReader::open(&image, &m.volumes, Some(&m.engine)).unwrap();
    let pieces = restore_pieces(&image, &[]).unwrap();
    stream(&m.engine, &reader, dest, &pieces, 0, &opts, &mut |_| Ok(())).unwrap();
    assert_eq!(dest_vol.snapshot(), a);
}

#[test]
fn cat_09_the_stream_reuses_a_ring_of_buffers_and_counts_its_waits() {
    let d = StreamOptions::default();
    assert_eq!((d.buffers, d.buffer_bytes), (4, 16 << 20));
    assert_eq!(d.checkpoint_bytes, 256 << 20);
    // Buffers shrink to the bytes between two checkpoints, and to what is left to restore.
    assert_eq!(d.ring_buffer_bytes(1 << 40), 16 << 20);
    assert_eq!(d.ring_buffer_bytes(3 << 20), 3 << 20);
    let small = StreamOptions {
        checkpoint_bytes: MIB,
        ..d
    };
    assert_eq!(small.ring_buffer_bytes(1 << 40), MIB as usize);
    assert_eq!(small.ring_buffer_bytes(0), 1);
    let m = Mem::new();
    let data = pattern(4 * MIB, 11);
    let (_, src) = m.volume(MemVolume::with_data("src", &data));
    let (_, tgt) = m.volume(MemVolume::new("tgt", 3 * MIB as usize));
    let b = m.backup(("db", "20270101"), src, tgt, two_extents(), CopyMode::Copy);
    let (dest_vol, dest) = m.volume(MemVolume::new("dest", 4 * MIB as usize));
    let image = restore::choose(&m.store, &Pick::Image(b.image)).unwrap();
    let reader = ImageReader::open(&image, &m.volumes, Some(&m.engine)).unwrap();
    let pieces = restore_pieces(&image, &[]).unwrap();
    let opts = StreamOptions {
        buffers: 2,
        buffer_bytes: 64 << 10,
        checkpoint_bytes: 256 << 20,
    };
    let report = stream(&m.engine, &reader, dest, &pieces, 0, &opts, &mut |_| Ok(())).unwrap();
    // 48 buffers' worth through a ring of two: each buffer is used again and again.
    assert_eq!((report.chunks, report.bytes), (48, 3 * MIB));
    assert_eq!((report.buffers, report.buffers_returned), (2, 2));
    assert_eq!(report.buffer_bytes, 64 << 10);
    // Each chunk makes each side wait at most once.
    assert!(report.waits_for_empty <= report.chunks);
    assert!(report.waits_for_full <= report.chunks);
    assert_eq!(report.checkpoints, 0);
    let got = dest_vol.snapshot();
    assert_eq!(
        image_of(&got, &two_extents()),
        image_of(&data, &two_extents())
    );
    assert!(got[MIB as usize..2 * MIB as usize].iter().all(|&x| x == 0));
    for bad in [
        StreamOptions { buffers: 0, ..opts },
        StreamOptions {
            buffer_bytes: 0,
            ..opts
        },
        StreamOptions {
            checkpoint_bytes: 0,
            ..opts
        },
    ] {
        assert!(matches!(bad.validate(), Err(CatalogError::Invalid { .. })));
    }
}

#[test]
fn cat_10_a_restore_releases_what_it_held() {
    let m = Mem::new();
    let data = pattern(4 * MIB, 12);
    let (_, src) = m.volume(MemVolume::with_data("src", &data));
    let (tgt_vol, tgt) = m.volume(MemVolume::new("tgt", 4 * MIB as usize));
    let b = m.backup(("db", "20270101"), src, tgt, Vec::new(), CopyMode::Copy);
    let (dest_vol, dest) = m.volume(MemVolume::new("dest", 4 * MIB as usize));
    let image = restore::choose(&m.store, &Pick::Image(b.image)).unwrap();
    let pieces = restore_pieces(&image, &[]).unwrap();

    // A copy restore ends Completed: the destination is no longer held by it.
    let r = start_copy_restore(&m.engine, &image, &pieces, tgt, dest).unwrap();
    run_copy_restore(&m.engine, r).unwrap();
    assert_eq!(dest_vol.snapshot(), data);
    assert!(!m
        .engine
        .status()
        .iter()
        .any(|s| s.state.is_live() && (s.target == "mem:dest" || s.source == "mem:dest")));
    let (_, spare) = m.volume(MemVolume::new("spare", 4 * MIB as usize));
    let again = m
        .engine
        .establish(&SessionSpec::whole(spare, dest))
        .unwrap();
    m.engine.withdraw(again).unwrap();

    // A stream whose reader fails part way returns the error; its thread and buffers are gone,
    // and the next stream onto the same destination runs.
    tgt_vol.resize(2 * MIB as usize);
    let reader = ImageReader::open(&image, &m.volumes, Some(&m.engine)).unwrap();
    let opts = StreamOptions {
        buffers: 2,
        buffer_bytes: 256 << 10,
        checkpoint_bytes: MIB,
    };
    let err = stream(&m.engine, &reader, dest, &pieces, 0, &opts, &mut |_| Ok(())).unwrap_err();
    assert!(
        matches!(err, CatalogError::Volume { op: "read", .. }),
        "{err}"
    );
    tgt_vol.resize(4 * MIB as usize);
    let report = stream(&m.engine, &reader, dest, &pieces, 0, &opts, &mut |_| Ok(())).unwrap();
    assert_eq!(report.buffers_returned, 2);
}

#[test]
fn cat_05_reconcile_never_removes_a_file_a_valid_image_names() {
    // The same file (same identity) is the target of an expired image and of a valid one.
    let mut expired = row(1, 1000, "20270101", "mem:src");
    expired.state = ImageState::Expired;
    let mut valid = row(2, 2000, "20270102", "mem:src");
    valid.target = expired.target.clone();
    let info = crate::VolumeInfo {
        id: expired.target.id,
        size: expired.target.size,
        sector_size: 512,
        generation: expired.target.generation,
        locator: expired.target.locator.clone(),
    };
    let targets = std::collections::HashMap::from([(info.locator.clone(), Some(info))]);
    let view = EngineView {
        table: Path::new("mem-table"),
        status: &[],
        decisions: &[],
    };
    let both = [expired.clone(), valid];
    assert_eq!(reconcile_decide(&both, &view, &targets), []);
    // Alone, the expired image's file is removed.
    assert_eq!(
        reconcile_decide(&[expired.clone()], &view, &targets),
        [ReconcileAction::RemoveTarget {
            image: expired.id,
            locator: expired.target.locator.clone()
        }]
    );
    // Nothing at the locator: nothing to remove.
    let gone = std::collections::HashMap::from([(expired.target.locator.clone(), None)]);
    assert_eq!(reconcile_decide(&[expired], &view, &gone), []);
}

#[test]
fn cat_08_in_place_onto_the_images_own_source_is_a_reverse_restore_keeping_other_t0s() {
    let m = Mem::new();
    let a = pattern(4 * MIB, 21);
    let (src_vol, src) = m.volume(MemVolume::with_data("src", &a));
    let (_, tgt) = m.volume(MemVolume::new("tgt", 4 * MIB as usize));
    let b = m.backup(("db", "20270101"), src, tgt, Vec::new(), CopyMode::Copy);
    let image = restore::choose(&m.store, &Pick::Image(b.image)).unwrap();
    // Later data, and another session protecting the source from then on.
    let later = pattern(4 * MIB, 22);
    m.engine.write(src, 0, &later).unwrap();
    let (_, other_tgt) = m.volume(MemVolume::new("other", 4 * MIB as usize));
    let other = m
        .engine
        .establish(&SessionSpec {
            mode: CopyMode::NoCopy,
            ..SessionSpec::whole(src, other_tgt)
        })
        .unwrap();
    m.engine.write(src, MIB, &vec![7u8; MIB as usize]).unwrap();

    // Only onto the session's own source, and only for the whole image.
    let (_, elsewhere) = m.volume(MemVolume::new("elsewhere", 4 * MIB as usize));
    assert!(reverse_applies(&m.engine, &image, src, false));
    assert!(!reverse_applies(&m.engine, &image, src, true));
    assert!(!reverse_applies(&m.engine, &image, elsewhere, false));

    let (started, pending) = start_reverse_restore(&m.engine, &image).unwrap();
    // A completed session moves every grain back.
    assert_eq!((started, pending), (true, 4 * MIB));
    // Found under way when asked again (a run that died part way).
    assert_eq!(
        start_reverse_restore(&m.engine, &image).unwrap(),
        (false, 4 * MIB)
    );
    let mut seen = Vec::new();
    let moved = run_reverse_restore(&m.engine, b.session, MIB, &mut |p| {
        seen.push((p.moved, p.pending));
        Ok(())
    })
    .unwrap();
    assert_eq!(moved, 4 * MIB);
    assert_eq!(
        seen,
        [
            (MIB, 3 * MIB),
            (2 * MIB, 2 * MIB),
            (3 * MIB, MIB),
            (4 * MIB, 0)
        ]
    );
    assert_eq!(src_vol.snapshot(), a, "the source holds the image again");
    let mut img = vec![0u8; 4 * MIB as usize];
    m.engine.read_image(other, 0, &mut img).unwrap();
    assert_eq!(img, later, "the other session keeps its T0");

    // A session no longer in the table is not reversed.
    m.engine.forget(b.session).unwrap();
    assert!(!reverse_applies(&m.engine, &image, src, false));
}

#[test]
fn cat_08_a_destination_a_live_session_of_another_table_protects_is_refused() {
    let status = |source: &str, state: SessionState| {
        let (engine, _) = mem_engine();
        let s = engine.attach(Arc::new(MemVolume::new(source, MIB as usize)));
        let t = engine.attach(Arc::new(MemVolume::new("t", MIB as usize)));
        let id = engine.establish(&SessionSpec::whole(s, t)).unwrap();
        if state == SessionState::Withdrawn {
            engine.withdraw(id).unwrap();
        }
        let st = engine.status();
        assert_eq!(st[0].state, state);
        st
    };
    let others = vec![
        (PathBuf::from("/t/a.tzt"), status("x", SessionState::Active)),
        (
            PathBuf::from("/t/b.tzt"),
            status("dest", SessionState::Withdrawn),
        ),
    ];
    // Another table's session on another volume, or an ended one on dest: allowed.
    check_not_protected_elsewhere("mem:dest", &others).unwrap();
    let mut others = others;
    others.push((
        PathBuf::from("/t/c.tzt"),
        status("dest", SessionState::Active),
    ));
    let err = check_not_protected_elsewhere("mem:dest", &others).unwrap_err();
    match &err {
        CatalogError::ProtectedElsewhere {
            dest,
            table,
            session,
        } => {
            assert_eq!(dest, "mem:dest");
            assert_eq!(table, Path::new("/t/c.tzt"));
            assert_eq!(*session, others[2].1[0].id);
        }
        e => panic!("{e}"),
    }
    assert!(err.to_string().contains("of table /t/c.tzt"), "{err}");
}
