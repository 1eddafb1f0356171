//! Regressions for table images that once made `Engine::open` misbehave (see the fuzz
//! targets in `fuzz/`).

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

use std::sync::Arc;

use timezero::fault::fuzzing;
use timezero::fault::internals::format::{
    decode_checkpoint, encode_checkpoint, CopyMode, ExtentSpec, Layout, SessionDesc, SessionImage,
    SessionState, Superblock, VolumeRef,
};
use timezero::{Engine, EngineOptions, MapResolver};
use timezero::{GrainSize, SessionId};
use timezero::{MemStorage, TableStorage};
use timezero::{MemVolume, Volume};

/// A table whose newest checkpoint (one generation past the template's) holds `sessions`.
fn table_with_checkpoint(sessions: &[SessionImage], next_session: u64) -> Vec<u8> {
    let mut t = fuzzing::template_table();
    let end = t.len();
    let sb1 = Superblock::decode(&t[end - 4096..]).unwrap();
    let l = Layout {
        journal_bytes: 128 * 1024,
        checkpoint_bytes: 64 * 1024,
        log_bytes: 0,
    };
    let generation = sb1.generation + 1;
    let ck = encode_checkpoint(
        &sb1.table_id,
        0,
        generation,
        1 << 40,
        next_session,
        sessions,
    );
    let c0 = l.checkpoint(0) as usize;
    t[c0..c0 + ck.len()].copy_from_slice(&ck);
    let sb = Superblock {
        generation,
        area: 0,
        ckpt_seq: 1 << 40,
        ckpt_len: ck.len() as u64,
        ckpt_crc: crc32fast::hash(&ck),
        ..sb1
    };
    t[..4096].copy_from_slice(&sb.encode());
    t
}

fn vref(name: &str) -> VolumeRef {
    VolumeRef::from(&MemVolume::new(name, 4096).info())
}

/// A session `id` of one extent of `len` bytes from volume `a` to `b`, 4 KiB grains.
fn whole_desc(id: u64, mode: CopyMode, len: u64) -> SessionDesc {
    SessionDesc {
        id: SessionId(id),
        mode,
        grain: GrainSize::new(4096).unwrap(),
        source: vref("a"),
        target: vref("b"),
        extents: vec![ExtentSpec {
            source_offset: 0,
            target_offset: 0,
            len,
        }],
        created_unix_ms: 0,
        group: None,
        incremental: false,
    }
}

fn open(img: Vec<u8>) -> timezero::Result<Engine> {
    let s: Arc<dyn TableStorage> = Arc::new(MemStorage::from_bytes("t", img));
    Engine::open(s, &MapResolver::default(), EngineOptions::default())
}

/// An ended session with an empty bitmap but extents of petabytes: its bitmap must not be
/// allocated before the table's bitmap budget is checked.
#[test]
fn huge_ended_session_in_checkpoint_is_refused_not_allocated() {
    let desc = whole_desc(5, CopyMode::Copy, 1 << 60);
    let img = SessionImage {
        desc,
        state: SessionState::Withdrawn,
        mode: CopyMode::Copy,
        reason: None,
        ended_extents: Vec::new(),
        bitmap: Vec::new(),
        t0_unix_ms: 0,
        changed: Vec::new(),
        pending: Vec::new(),
        unverified: Vec::new(),
        unverified_log: Vec::new(),
    };
    let r = open(table_with_checkpoint(&[img], 6));
    assert!(r.is_err(), "a checkpoint over the bitmap budget opened");
}

/// The checkpoint of an active one-grain-per-4-KiB session over 64 KiB volumes, with `unverified`.
fn active_image(unverified: Vec<(u64, u32)>) -> SessionImage {
    let desc = whole_desc(1, CopyMode::NoCopy, 64 * 1024);
    SessionImage {
        desc,
        state: SessionState::Active,
        mode: CopyMode::NoCopy,
        reason: None,
        ended_extents: Vec::new(),
        bitmap: vec![0b10, 0],
        t0_unix_ms: 0,
        changed: Vec::new(),
        pending: Vec::new(),
        unverified,
        unverified_log: Vec::new(),
    }
}

/// Decode `ck` as the checkpoint of a superblock that vouches for exactly these bytes.
fn decode(ck: &[u8]) -> Result<timezero::fault::internals::format::Checkpoint, String> {
    let t = fuzzing::template_table();
    let sb1 = Superblock::decode(&t[t.len() - 4096..]).unwrap();
    let sb = Superblock {
        generation: 9,
        area: 0,
        ckpt_seq: 77,
        ckpt_len: ck.len() as u64,
        ckpt_crc: crc32fast::hash(ck),
        ..sb1
    };
    decode_checkpoint(ck, &sb).map_err(|e| e.to_string())
}

fn encode(img: &SessionImage) -> Vec<u8> {
    let t = fuzzing::template_table();
    let sb1 = Superblock::decode(&t[t.len() - 4096..]).unwrap();
    encode_checkpoint(&sb1.table_id, 0, 9, 77, 2, std::slice::from_ref(img))
}

/// Grains whose proof waits for the volumes survive a checkpoint: written and read back.
#[test]
fn checkpoint_keeps_grains_whose_proof_was_deferred() {
    let img = active_image(vec![(1, 0xdead_beef), (7, 3)]);
    let ck = decode(&encode(&img)).unwrap();
    assert_eq!(ck.sessions, vec![img]);
}

/// A version-6 checkpoint (no list of deferred grains) and a version-7 one (no list of the
/// deferred grains the copy log keeps) still open: the missing lists are empty.
#[test]
fn a_version_6_or_7_checkpoint_reads_with_no_deferred_grains() {
    let img = active_image(Vec::new());
    for (version, cut) in [(6u32, 8usize), (7, 4)] {
        let mut ck = encode(&img);
        // Versions 7 and 8 each appended one count (zero) to the session's record, the last
        // bytes here.
        assert_eq!(&ck[ck.len() - 8..], &[0u8; 8]);
        ck.truncate(ck.len() - cut);
        ck[8..12].copy_from_slice(&version.to_le_bytes());
        let payload = u64::from_le_bytes(ck[48..56].try_into().unwrap()) - cut as u64;
        ck[48..56].copy_from_slice(&payload.to_le_bytes());
        let got = decode(&ck).unwrap();
        assert_eq!(got.sessions, vec![img.clone()], "version {version}");
    }
}

/// Deferred grains whose bytes the copy log keeps survive a checkpoint with their log offsets;
/// one that is not a deferred grain, or out of order, is damage.
#[test]
fn checkpoint_keeps_the_log_offsets_of_deferred_grains() {
    let mut img = active_image(vec![(1, 0xdead_beef), (7, 3)]);
    img.unverified_log = vec![(1, 4096), (7, 0)];
    let ck = decode(&encode(&img)).unwrap();
    assert_eq!(ck.sessions, vec![img.clone()]);
    for bad in [vec![(2, 0)], vec![(7, 0), (1, 0)], vec![(1, 0), (1, 8)]] {
        img.unverified_log = bad.clone();
        let r = decode(&encode(&img));
        assert!(r.is_err(), "{bad:?} decoded: {r:?}");
        assert!(r.unwrap_err().contains("unverified_log"), "{bad:?}");
    }
}

/// A deferred grain past the session's grains, or listed out of order, is damage.
#[test]
fn checkpoint_with_a_bad_deferred_grain_is_refused() {
    for bad in [vec![(16, 0)], vec![(3, 0), (3, 1)], vec![(5, 0), (2, 0)]] {
        let r = decode(&encode(&active_image(bad.clone())));
        assert!(r.is_err(), "{bad:?} decoded: {r:?}");
        assert!(r.unwrap_err().contains("unverified"), "{bad:?}");
    }
}
