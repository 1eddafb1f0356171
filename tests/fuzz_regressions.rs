//! Regressions for table images that once made `Engine::open` misbehave (see the fuzz
//! targets in `fuzz/`).

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

use std::sync::Arc;

use timezero::fault::fuzzing;
use timezero::fault::internals::format::{
    encode_checkpoint, CopyMode, ExtentSpec, Layout, SessionDesc, SessionImage, SessionState,
    Superblock, VolumeRef,
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

fn open(img: Vec<u8>) -> timezero::Result<Engine> {
    let s: Arc<dyn TableStorage> = Arc::new(MemStorage::from_bytes("t", img));
    Engine::open(s, &MapResolver::default(), EngineOptions::default())
}

/// An ended session with an empty bitmap but extents of petabytes: its bitmap must not be
/// allocated before the table's bitmap budget is checked.
#[test]
fn huge_ended_session_in_checkpoint_is_refused_not_allocated() {
    let desc = SessionDesc {
        id: SessionId(5),
        mode: CopyMode::Copy,
        grain: GrainSize::new(4096).unwrap(),
        source: vref("a"),
        target: vref("b"),
        extents: vec![ExtentSpec {
            source_offset: 0,
            target_offset: 0,
            len: 1 << 60,
        }],
        created_unix_ms: 0,
        group: None,
        incremental: false,
    };
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
    };
    let r = open(table_with_checkpoint(&[img], 6));
    assert!(r.is_err(), "a checkpoint over the bitmap budget opened");
}
