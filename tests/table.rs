//! Activity table format and error variants.
//!
//! Goal: every on-disk structure round-trips, every damaged or misplaced byte is rejected with a
//! typed error (or repaired from its redundant copy), and each engine error variant is produced
//! by the input it names. Method: direct encode/decode calls, byte surgery on an in-memory
//! table, and engine calls with bad arguments.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::sync::Arc;

use timezero::fault::internals::codec::Writer;
use timezero::fault::internals::format::{
    decode_block, encode_block, superblock_offset, BlockHeader, CopyMode, Entry, ExtentSpec,
    Layout, Reason, ReasonCode, SessionDesc, SessionState, Superblock, VolumeRef,
};
use timezero::fault::internals::Table;
use timezero::Corruption;
use timezero::Error;
use timezero::{Engine, EngineOptions, SessionSpec};
use timezero::{Generation, GrainSize, SessionId, VolumeId};
use timezero::{MemStorage, TableStorage};
use timezero::{MemVolume, Volume, VolumeInfo};

fn desc() -> SessionDesc {
    let v = |n: u8| VolumeRef {
        id: VolumeId([n; 16]),
        size: 1 << 20,
        sector_size: 512,
        generation: Generation(3),
        locator: format!("/dev/v{n}"),
    };
    SessionDesc {
        id: SessionId(7),
        mode: CopyMode::NoCopy,
        grain: GrainSize::new(65536).unwrap(),
        source: v(1),
        target: v(2),
        extents: vec![ExtentSpec {
            source_offset: 65536,
            target_offset: 0,
            len: 131072,
        }],
        created_unix_ms: 123,
        group: None,
        incremental: false,
    }
}

#[test]
fn entries_round_trip() {
    let all = vec![
        Entry::Establish(desc()),
        Entry::SetBits {
            session: SessionId(7),
            start: 3,
            count: 9,
        },
        Entry::SetState {
            session: SessionId(7),
            state: SessionState::Terminated,
            reason: Some(Reason::new(ReasonCode::IdentityMismatch, "x")),
        },
        Entry::SetState {
            session: SessionId(7),
            state: SessionState::Completed,
            reason: None,
        },
        Entry::SetMode {
            session: SessionId(7),
            mode: CopyMode::Copy,
        },
        Entry::EndExtent {
            session: SessionId(7),
            extent: 0,
            reason: Reason::new(ReasonCode::VolumeShrunk, "y"),
        },
        Entry::Forget {
            session: SessionId(7),
        },
    ];
    let mut w = Writer::default();
    for e in &all {
        e.encode(&mut w);
    }
    assert_eq!(Entry::decode_all(&w.buf).unwrap(), all);
    // Every truncation is rejected, never a panic.
    for cut in 0..w.buf.len() {
        let r = Entry::decode_all(&w.buf[..cut]);
        if let Ok(v) = r {
            assert!(v.len() < all.len());
        }
    }
}

#[test]
fn hostile_descriptor_is_rejected() {
    let mut d = desc();
    d.extents[0].len = 1000; // not a grain multiple
    let mut w = Writer::default();
    Entry::Establish(d).encode(&mut w);
    assert!(matches!(
        Entry::decode_all(&w.buf),
        Err(Corruption::Field { .. })
    ));
    let mut w = Writer::default();
    w.u8(99);
    assert!(matches!(
        Entry::decode_all(&w.buf),
        Err(Corruption::Field {
            field: "entry_kind",
            ..
        })
    ));
}

#[test]
fn journal_block_binding_and_crc() {
    let id = [5u8; 16];
    let h = BlockHeader {
        seq: 10,
        commit_seq: 9,
        block_count: 2,
        block_index: 1,
        payload_len: 3,
    };
    let b = encode_block(&id, &h, &[1, 2, 3]);
    let (got, p) = decode_block(&b, &id, Some(10)).unwrap();
    assert_eq!(got, h);
    assert_eq!(p, &[1, 2, 3]);
    assert!(matches!(
        decode_block(&b, &id, Some(11)),
        Err(Corruption::Misplaced { .. })
    ));
    assert!(matches!(
        decode_block(&b, &[6u8; 16], Some(10)),
        Err(Corruption::Misplaced { .. })
    ));
    for bit in 0..(512 * 8) {
        let mut c = b;
        c[bit / 8] ^= 1 << (bit % 8);
        assert!(
            decode_block(&c, &id, Some(10)).is_err(),
            "flip of bit {bit} not detected"
        );
    }
}

#[test]
fn superblock_crc_and_area() {
    let sb = Superblock {
        table_id: [1; 16],
        generation: 5,
        area: 2,
        layout: Layout {
            journal_bytes: 128 * 1024,
            checkpoint_bytes: 256 * 1024,
            log_bytes: 256 * 1024,
        },
        ckpt_seq: 4,
        ckpt_len: 64,
        ckpt_crc: 1,
        created_unix_ms: 0,
    };
    let b = sb.encode();
    // Valid in either slot: a superblock is bound to its generation, not to its place.
    assert_eq!(Superblock::decode(&b).unwrap(), sb);
    let mut c = b.clone();
    c[40] ^= 4;
    match Superblock::decode(&c) {
        Err(Corruption::Checksum {
            expected, found, ..
        }) => assert_ne!(expected, found),
        other => panic!("{other:?}"),
    }
}

fn table_with_session() -> (Arc<MemStorage>, Vec<Arc<MemVolume>>, SessionId) {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let s = Arc::new(MemVolume::with_data("s", &common::pattern(1, 1 << 20)));
    let t = Arc::new(MemVolume::new("t", 1 << 20));
    let a = e.attach(s.clone() as Arc<dyn Volume>);
    let b = e.attach(t.clone() as Arc<dyn Volume>);
    let id = e.establish(&SessionSpec::whole(a, b)).unwrap();
    e.write(a, 0, &[9u8; 70000]).unwrap();
    (storage, vec![s, t], id)
}

#[test]
fn damaged_superblock_falls_back_to_the_other_copy() {
    let (storage, vols, id) = table_with_session();
    let bytes = storage.snapshot();
    let slot_at = |slot: u32| superblock_offset(slot, bytes.len() as u64) as usize;
    for copy in 0..2u32 {
        let mut b = bytes.clone();
        b[slot_at(copy) + 20] ^= 0x10;
        let st = Arc::new(MemStorage::from_bytes("t", b));
        let e = common::reopen(&st, &vols);
        assert_eq!(
            e.session(id).unwrap().copied(),
            timezero::GrainCount(2),
            "copy {copy}"
        );
    }
    // Both damaged: a typed error.
    let mut b = bytes.clone();
    b[slot_at(0) + 20] ^= 1;
    b[slot_at(1) + 20] ^= 1;
    let st: Arc<dyn TableStorage> = Arc::new(MemStorage::from_bytes("t", b));
    match Table::open(st) {
        Err(Error::Corrupt { .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn damaged_journal_block_is_read_from_its_mirror() {
    let (storage, vols, id) = table_with_session();
    let opts = common::small_table();
    let layout = opts.layout().unwrap();
    let mut b = storage.snapshot();
    // Damage every block of journal copy A: replay must use copy B.
    let a0 = layout.journal(0) as usize;
    for i in (a0..a0 + layout.journal_bytes as usize).step_by(512) {
        b[i + 100] ^= 0xff;
    }
    let st = Arc::new(MemStorage::from_bytes("t", b));
    let e = common::reopen(&st, &vols);
    assert_eq!(e.session(id).unwrap().copied(), timezero::GrainCount(2));
    assert_eq!(e.session(id).unwrap().status().state, SessionState::Active);
}

#[derive(Debug)]
struct FailingFlush(MemVolume);
impl Volume for FailingFlush {
    fn info(&self) -> VolumeInfo {
        self.0.info()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> timezero::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> timezero::Result<()> {
        self.0.write_at(offset, buf)
    }
    fn flush(&self) -> timezero::Result<()> {
        Err(Error::io(
            "fdatasync",
            "failing",
            0,
            std::io::Error::from_raw_os_error(5),
        ))
    }
}

#[test]
fn every_error_variant_from_its_input() {
    // No copy log: a first write's source write waits for the target's flush, which fails
    // below.
    let opts = timezero::TableOptions {
        log_bytes: 0,
        ..common::small_table()
    };
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let s = e.attach(Arc::new(MemVolume::new("s", 1 << 20)));
    let t = e.attach(Arc::new(MemVolume::new("t", 1 << 20)));
    let small = e.attach(Arc::new(MemVolume::new("small", 1 << 19)));
    let spec = |extents: Vec<ExtentSpec>, tgt| SessionSpec {
        extents,
        ..SessionSpec::whole(s, tgt)
    };
    let ext = |so, to, len| ExtentSpec {
        source_offset: so,
        target_offset: to,
        len,
    };
    assert!(matches!(
        e.establish(&spec(vec![ext(100, 0, 65536)], t)),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        e.establish(&spec(vec![ext(1 << 20, 0, 65536)], t)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        e.establish(&spec(vec![], small)),
        Err(Error::TargetTooSmall { .. })
    ));
    assert!(matches!(
        e.establish(&spec(vec![ext(0, 0, 65536), ext(0, 65536, 65536)], t)),
        Err(Error::ExtentsOverlap { side: "source", .. })
    ));
    assert!(matches!(
        e.establish(&spec(vec![ext(0, 0, 131072)], s)),
        Err(Error::Overlap { .. })
    ));
    let a = e.establish(&spec(vec![ext(0, 0, 131072)], t)).unwrap();
    assert!(
        matches!(e.establish(&spec(vec![ext(262144, 65536, 65536)], t)), Err(Error::TargetInUse { other, .. }) if other == a)
    );
    // The target of one session cannot be the source of another.
    assert!(matches!(
        e.establish(&SessionSpec {
            extents: vec![ext(0, 0, 65536)],
            ..SessionSpec::whole(t, small)
        }),
        Err(Error::Overlap { .. })
    ));
    assert!(matches!(
        e.withdraw(SessionId(99)),
        Err(Error::UnknownSession(SessionId(99)))
    ));
    assert!(matches!(
        e.establish(&SessionSpec::whole(VolumeId([9; 16]), t)),
        Err(Error::UnknownVolume(_))
    ));
    assert!(matches!(GrainSize::new(3000), Err(Error::Invalid { .. })));
    let mut buf = [0u8; 10];
    assert!(matches!(
        e.read_image(a, 131070, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
    e.withdraw(a).unwrap();
    assert!(matches!(
        e.read_image(a, 0, &mut buf),
        Err(Error::NotActive { .. })
    ));
    // A failed target flush fails the source write and latches the target.
    let f = e.attach(Arc::new(FailingFlush(MemVolume::new("f", 1 << 20))));
    let b = e.establish(&SessionSpec::whole(s, f)).unwrap();
    assert!(matches!(
        e.write(s, 0, &[1u8; 10]),
        Err(Error::Io {
            op: "fdatasync",
            ..
        })
    ));
    // Latched with the first error: its kind and operation are kept.
    assert!(matches!(
        e.write(s, 0, &[1u8; 10]),
        Err(Error::PoisonedIo {
            op: "fdatasync",
            ..
        })
    ));
    let mut img = vec![0u8; 10];
    e.read_image(b, 0, &mut img).unwrap();
    assert_eq!(img, vec![0u8; 10], "the source write was not released");
    // Extent-level termination: shrink the target, reopen.
    let _ = storage;
}

#[test]
fn reconcile_terminates_on_identity_and_ends_shrunk_extents() {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let s = Arc::new(MemVolume::with_data("s", &common::pattern(5, 1 << 20)));
    let t = Arc::new(MemVolume::new("t", 1 << 20));
    let u = Arc::new(MemVolume::new("u", 1 << 20));
    let a = e.attach(s.clone() as Arc<dyn Volume>);
    let b = e.attach(t.clone() as Arc<dyn Volume>);
    let c = e.attach(u.clone() as Arc<dyn Volume>);
    let ext = |so, to, len| ExtentSpec {
        source_offset: so,
        target_offset: to,
        len,
    };
    let s1 = e
        .establish(&SessionSpec {
            extents: vec![ext(0, 0, 65536), ext(786432, 786432, 65536)],
            ..SessionSpec::whole(a, b)
        })
        .unwrap();
    let s2 = e
        .establish(&SessionSpec {
            extents: vec![ext(65536, 0, 65536)],
            ..SessionSpec::whole(a, c)
        })
        .unwrap();
    drop(e);
    // The target of s1 shrinks (second extent no longer fits); u is replaced by another device.
    t.resize(1 << 19);
    u.set_id(VolumeId([0xee; 16]));
    let e = common::reopen(&storage, &[s.clone(), t.clone(), u.clone()]);
    let st1 = e.session(s1).unwrap().status();
    assert_eq!(st1.state, SessionState::Active);
    assert!(st1.ended[0].is_none());
    assert_eq!(
        st1.ended[1].as_ref().unwrap().code,
        ReasonCode::VolumeShrunk
    );
    let st2 = e.session(s2).unwrap().status();
    assert_eq!(st2.state, SessionState::Terminated);
    assert_eq!(st2.reason.unwrap().code, ReasonCode::IdentityMismatch);
    let mut buf = vec![0u8; 65536];
    e.read_image(s1, 0, &mut buf).unwrap();
    assert!(matches!(
        e.read_image(s1, 65536, &mut buf),
        Err(Error::ExtentTerminated { .. })
    ));
    // Idempotent: reopening again decides the same.
    drop(e);
    let e = common::reopen(&storage, &[s, t, u]);
    assert_eq!(
        e.session(s2).unwrap().status().state,
        SessionState::Terminated
    );
    assert!(e.session(s1).unwrap().status().ended[1].is_some());
    // The restart policy terminates every incomplete session.
    drop(e);
    let st: Arc<dyn TableStorage> = storage.clone();
    let e = Engine::open(
        st,
        &timezero::MapResolver::default(),
        EngineOptions {
            restart: timezero::RestartPolicy::TerminateIncomplete,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        e.session(s1).unwrap().status().reason.unwrap().code,
        ReasonCode::RestartPolicy
    );
}

#[test]
fn many_commits_wrap_the_journal_through_checkpoints() {
    let (storage, vols, id) = table_with_session();
    let e = common::reopen(&storage, &vols);
    let a = vols[0].info().id;
    // 1 MiB / 64 KiB = 16 grains; each write copies one: then withdraw/re-establish many times.
    let mut last = id;
    for round in 0..60 {
        for g in 0..16u64 {
            e.write(a, g * 65536, &[round as u8; 10]).unwrap();
        }
        e.withdraw(last).unwrap();
        last = e
            .establish(&SessionSpec::whole(a, vols[1].info().id))
            .unwrap();
    }
    assert!(
        e.table()
            .stats
            .checkpoints
            .load(std::sync::atomic::Ordering::Relaxed)
            > 2
    );
    let t0 = vols[0].snapshot();
    drop(e);
    let e = common::reopen(&storage, &vols);
    assert_eq!(common::image(&e, last), t0);
}

#[test]
fn table_full_is_a_typed_error_and_ended_sessions_make_room() {
    // A 64 KiB checkpoint area holds bitmaps for about 500k grains in all.
    let opts = timezero::TableOptions {
        journal_bytes: 128 * 1024,
        checkpoint_bytes: 64 * 1024,
        log_bytes: 0,
    };
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let s = e.attach(Arc::new(MemVolume::new("s", 1 << 20)));
    let t = e.attach(Arc::new(MemVolume::new("t", 1 << 20)));
    // A huge sparse-looking source is not needed: a 4 KiB grain over many extents of a small
    // volume is enough to exceed the area with several sessions' descriptors and bitmaps.
    let ext = |i: u64| ExtentSpec {
        source_offset: i * 4096,
        target_offset: i * 4096,
        len: 4096,
    };
    let spec = SessionSpec {
        extents: (0..64).map(ext).collect(),
        grain: GrainSize::new(4096).unwrap(),
        ..SessionSpec::whole(s, t)
    };
    let first = e.establish(&spec).unwrap();
    // Another session with the same extents on another target would not overlap the first's
    // target; use fresh targets until the table is full.
    let mut n = 1;
    let err = loop {
        let tn = e.attach(Arc::new(MemVolume::new(&format!("t{n}"), 1 << 20)));
        match e.establish(&SessionSpec {
            target: tn,
            ..spec.clone()
        }) {
            Ok(_) => n += 1,
            Err(err) => break err,
        }
        assert!(n < 1000, "table never filled");
    };
    assert!(matches!(err, Error::TableFull { .. }), "{err}");
    // Ending one session makes room: it is forgotten to fit the next.
    e.withdraw(first).unwrap();
    let tn = e.attach(Arc::new(MemVolume::new("again", 1 << 20)));
    e.establish(&SessionSpec {
        target: tn,
        ..spec.clone()
    })
    .unwrap();
    assert!(
        e.session(first).is_err(),
        "the withdrawn session was forgotten to make room"
    );
}

#[test]
fn a_missing_volume_suspends_the_session() {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let vols = [
        Arc::new(MemVolume::with_data("s", &common::pattern(1, 1 << 20))),
        Arc::new(MemVolume::new("t", 1 << 20)),
    ];
    let a = e.attach(vols[0].clone() as Arc<dyn Volume>);
    let b = e.attach(vols[1].clone() as Arc<dyn Volume>);
    let id = e.establish(&SessionSpec::whole(a, b)).unwrap();
    e.write(a, 0, &[9u8; 70000]).unwrap();
    // Closed cleanly: every target is durable, nothing is left to verify at the next open
    // (after a crash, a checked copy whose target is missing ends the session instead: see
    // tests/checked.rs).
    e.close().unwrap();
    // Reopen with only the source: the target cannot be found.
    let e = common::reopen(&storage, &vols[..1]);
    let st = e.session(id).unwrap().status();
    assert_eq!(st.state, SessionState::Suspended);
    assert_eq!(st.reason.unwrap().code, ReasonCode::TargetUnavailable);
    // A reset that finds the volume gone does the same for a live session.
    drop(e);
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let a = e.attach(vols[0].clone() as Arc<dyn Volume>);
    let t = Arc::new(MemVolume::new("t2", 1 << 20));
    let b = e.attach(t.clone() as Arc<dyn Volume>);
    let id = e.establish(&SessionSpec::whole(a, b)).unwrap();
    let ds = e.reset(b, None).unwrap();
    assert_eq!(ds.len(), 1);
    let st = e.session(id).unwrap().status();
    assert_eq!(st.state, SessionState::Suspended);
    assert_eq!(st.reason.unwrap().code, ReasonCode::TargetUnavailable);
}

#[test]
fn shrinking_away_every_extent_terminates_the_session() {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let s = Arc::new(MemVolume::with_data("s", &common::pattern(8, 1 << 20)));
    let t = Arc::new(MemVolume::new("t", 1 << 20));
    let a = e.attach(s.clone() as Arc<dyn Volume>);
    let b = e.attach(t.clone() as Arc<dyn Volume>);
    let ext = ExtentSpec {
        source_offset: 917_504,
        target_offset: 0,
        len: 131_072,
    };
    let id = e
        .establish(&SessionSpec {
            extents: vec![ext],
            ..SessionSpec::whole(a, b)
        })
        .unwrap();
    s.resize(1 << 19);
    let ds = e.reset(a, Some(s.clone() as Arc<dyn Volume>)).unwrap();
    assert_eq!(ds.len(), 1);
    let st = e.session(id).unwrap().status();
    assert_eq!(st.state, SessionState::Terminated);
    assert_eq!(st.reason.unwrap().code, ReasonCode::VolumeShrunk);
}

/// `read_back` on a real table file (through `O_DIRECT` where the file system allows it) returns
/// exactly what `read` returns, at unaligned offsets and lengths and at the end of a file whose
/// size is not a multiple of 4 KiB; out-of-range requests are refused.
#[test]
fn file_table_read_back_matches_read() {
    use timezero::MmapStorage;
    let dir = tempfile::tempdir_in(std::env::var("TMPDIR").unwrap_or("/var/tmp".into()))
        .unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let path = dir.path().join("t.tzt");
    let len = 3 * 4096 + 1536;
    let s = MmapStorage::create(&path, len).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 511) as u8).collect();
    s.write(0, &data).unwrap();
    s.sync().unwrap();
    for (off, n) in [
        (0u64, 4096usize),
        (100, 1),
        (4000, 200),
        (512, 8192),
        (len - 700, 700),
    ] {
        let mut a = vec![0u8; n];
        let mut b = vec![1u8; n];
        s.read(off, &mut a).unwrap();
        s.read_back(off, &mut b).unwrap();
        assert_eq!(a, b, "offset {off} length {n}");
        assert_eq!(&a[..], &data[off as usize..off as usize + n]);
    }
    let mut b = vec![0u8; 2];
    assert!(s.read_back(len - 1, &mut b).is_err());
}

/// The layout keeps apart what one misplaced write must never reach together: no write of the
/// largest size the table issues, at any 512-byte-aligned offset, touches more than one of the
/// two superblock slots and the three checkpoint areas (the seed-99 enumerator run found a
/// checkpoint write sent to offset 0 covering both slots when they were adjacent).
#[test]
fn one_write_reaches_at_most_one_superblock_or_checkpoint_area() {
    use timezero::fault::internals::format::TABLE_WRITE_MAX_BYTES;
    for (journal_bytes, checkpoint_bytes, log_bytes) in [
        (128 << 10, 64 << 10, 0),
        (128 << 10, 64 << 10, 64 << 10),
        (8 << 20, 8 << 20, 16 << 20),
    ] {
        let l = Layout {
            journal_bytes,
            checkpoint_bytes,
            log_bytes,
        };
        let mut regions = vec![(l.superblock(0), 4096u64), (l.superblock(1), 4096)];
        regions.extend((0..3).map(|a| (l.checkpoint(a), checkpoint_bytes)));
        assert_eq!(l.superblock(1) + 4096, l.file_bytes());
        let w = TABLE_WRITE_MAX_BYTES as u64;
        let mut o = 0;
        while o < l.file_bytes() {
            let hit = regions
                .iter()
                .filter(|(start, len)| o < start + len && *start < o + w)
                .count();
            assert!(hit <= 1, "a write at {o} reaches {hit} structures");
            o += 512;
        }
    }
}
