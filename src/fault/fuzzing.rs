//! Checking functions behind the cargo-fuzz targets in `fuzz/` and the corpus replay test
//! `tests/fuzz_corpus.rs` (crash-model "How to prove it", item 6).
//!
//! Every `check_*` function takes arbitrary bytes. It returns normally when the library behaved
//! (any typed `Err` is fine) and panics when it did not: a panic inside the library, or, for
//! [`check_op_script`], an image that differs from the reference model.
//!
//! [`check_nbd`] is written beside the NBD wire format (`src/nbd/fuzz.rs`) and re-exported
//! here with the others.

use std::sync::{Arc, OnceLock};

use super::sim::{Faults, SimWorld};
use crate::activity::format::{
    decode_block, decode_checkpoint, CopyMode, Entry, ExtentSpec, Layout, SessionState, Superblock,
    BLOCK_MAGIC, CHECKPOINT_HEADER_BYTES,
};
use crate::activity::{MemStorage, TableOptions, TableStorage};
use crate::engine::{Engine, EngineOptions, MapResolver, SessionSpec};
use crate::ids::{GrainCount, GrainIndex, GrainSize, SessionId, VolumeId};
use crate::limits::{JOURNAL_BLOCK_BYTES, SUPERBLOCK_BYTES};
use crate::volume::{MemVolume, Volume};

/// The check behind the `nbd_request` target lives beside the NBD code it exercises.
pub use crate::nbd::fuzz::check_nbd;

/// Table sizes used by the fuzz targets: the smallest valid layout.
#[must_use]
pub fn fuzz_table_options() -> TableOptions {
    TableOptions {
        journal_bytes: 128 * 1024,
        checkpoint_bytes: 64 * 1024,
        log_bytes: 0,
    }
}

fn layout() -> Layout {
    Layout {
        journal_bytes: 128 * 1024,
        checkpoint_bytes: 64 * 1024,
        log_bytes: 0,
    }
}

fn table_len() -> usize {
    usize::try_from(layout().file_bytes()).unwrap_or(0)
}

/// Little cursor over fuzz bytes; yields zeros once exhausted.
struct Bytes<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }
    fn u8(&mut self) -> u8 {
        let v = self.b.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        v
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn rest(&mut self) -> &[u8] {
        let r = self.b.get(self.pos..).unwrap_or(&[]);
        self.pos = self.b.len();
        r
    }
}

// ---------------------------------------------------------------------------------------------
// table_decode

/// Feed `data` to every table decoder: [`Superblock::decode`], [`decode_block`]
/// (with and without an expected sequence), [`Entry::decode_all`], and [`decode_checkpoint`]
/// with a superblock built to vouch for the bytes (CRC and length), so the checkpoint parser
/// itself is reached.
pub fn check_table_decode(data: &[u8]) {
    let _ = Superblock::decode(data);
    let mut sb_slot = vec![0u8; SUPERBLOCK_BYTES];
    let n = data.len().min(SUPERBLOCK_BYTES);
    sb_slot[..n].copy_from_slice(&data[..n]);
    let _ = Superblock::decode(&sb_slot);
    let table_id: [u8; 16] = data
        .get(8..24)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; 16]);
    for chunk in data.chunks(JOURNAL_BLOCK_BYTES) {
        let _ = decode_block(chunk, &table_id, None);
        let _ = decode_block(chunk, &table_id, Some(0));
    }
    let _ = Entry::decode_all(data);
    // A checkpoint header claims its own identity; build the superblock that agrees with it so
    // the parser gets past the binding checks too.
    if data.len() >= CHECKPOINT_HEADER_BYTES {
        let get_u64 = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap_or([0; 8]));
        let mut id = [0u8; 16];
        id.copy_from_slice(&data[16..32]);
        let sb = Superblock {
            table_id: id,
            generation: get_u64(32),
            area: u32::from_le_bytes(data[12..16].try_into().unwrap_or([0; 4])),
            layout: layout(),
            ckpt_seq: get_u64(40),
            ckpt_len: data.len() as u64,
            ckpt_crc: crc32fast::hash(data),
            created_unix_ms: 0,
        };
        if let Ok(c) = decode_checkpoint(data, &sb) {
            // Everything decoded must re-encode and decode to the same value.
            let again = crate::activity::format::encode_checkpoint(
                &sb.table_id,
                sb.area,
                sb.generation,
                c.seq,
                c.next_session,
                &c.sessions,
            );
            let sb2 = Superblock {
                ckpt_len: again.len() as u64,
                ckpt_crc: crc32fast::hash(&again),
                ..sb
            };
            let c2 = decode_checkpoint(&again, &sb2);
            assert!(c2.as_ref() == Ok(&c), "checkpoint does not round-trip");
        }
    }
    if let Ok(entries) = Entry::decode_all(data) {
        let mut w = crate::activity::codec::Writer::default();
        for e in &entries {
            e.encode(&mut w);
        }
        assert_eq!(
            Entry::decode_all(&w.buf).as_ref(),
            Ok(&entries),
            "journal entries do not round-trip"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// table_open

/// A valid table image in the fuzz layout holding two sessions (one active with some copied
/// grains and a journal tail, one withdrawn). Built once per process with the real engine;
/// its table id and timestamps come from the clock and the random generator.
#[must_use]
pub fn template_table() -> Vec<u8> {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(build_template).clone()
}

fn build_template() -> Vec<u8> {
    let storage = Arc::new(MemStorage::new("template", layout().file_bytes()));
    let s: Arc<dyn TableStorage> = storage.clone();
    let Ok(e) = Engine::create(
        s,
        EngineOptions {
            table: fuzz_table_options(),
            ..EngineOptions::default()
        },
    ) else {
        return vec![0; table_len()];
    };
    let vols: Vec<Arc<MemVolume>> = (0..3)
        .map(|i| Arc::new(MemVolume::with_data(&format!("f{i}"), &fill(i, 64 * 1024))))
        .collect();
    let ids: Vec<_> = vols
        .iter()
        .map(|v| e.attach(v.clone() as Arc<dyn Volume>))
        .collect();
    let g = GrainSize::new(4096).unwrap_or(GrainSize::DEFAULT);
    let a = e.establish(&SessionSpec {
        grain: g,
        ..SessionSpec::whole(ids[0], ids[1])
    });
    let b = e.establish(&SessionSpec {
        source: ids[2],
        target: ids[0],
        extents: vec![ExtentSpec {
            source_offset: 0,
            target_offset: 8192,
            len: 16384,
        }],
        grain: g,
        mode: CopyMode::NoCopy,
        incremental: false,
    });
    if let Ok(a) = a {
        let _ = e.write(ids[0], 100, &[7u8; 9000]);
        let _ = e.copy_batch(a, GrainIndex(0), GrainCount(3));
    }
    if let Ok(b) = b {
        let _ = e.withdraw(b);
    }
    drop(e);
    // Opening writes a checkpoint that holds both sessions; then one more journal commit.
    let s: Arc<dyn TableStorage> = storage.clone();
    if let Ok(e) = Engine::open(s, &MapResolver::default(), EngineOptions::default()) {
        for v in &vols {
            e.attach(v.clone() as Arc<dyn Volume>);
        }
        if let Ok(a) = a {
            let _ = e.copy_batch(a, GrainIndex(4), GrainCount(2));
        }
    }
    storage.snapshot()
}

/// Recompute every CRC a fuzzed table image carries: each journal block that has the block
/// magic, each superblock's checkpoint CRC (when its length is in range) and its own CRC.
/// Lets the fuzzer change fields behind the checksums.
pub fn reseal(img: &mut [u8]) {
    let l = layout();
    let jb = JOURNAL_BLOCK_BYTES;
    for copy in 0..2u32 {
        let start = usize::try_from(l.journal(copy)).unwrap_or(usize::MAX);
        for slot in 0..usize::try_from(l.journal_blocks()).unwrap_or(0) {
            let o = start + slot * jb;
            let Some(b) = img.get_mut(o..o + jb) else {
                continue;
            };
            if b[0..4] == BLOCK_MAGIC.to_le_bytes() {
                let crc = crc32fast::hash(&b[8..]);
                b[4..8].copy_from_slice(&crc.to_le_bytes());
            }
        }
    }
    for copy in 0..2u32 {
        let o = usize::try_from(l.superblock(copy)).unwrap_or(usize::MAX);
        let Some(sb) = img.get(o..o + SUPERBLOCK_BYTES) else {
            continue;
        };
        let ckpt_len = u64::from_le_bytes(sb[72..80].try_into().unwrap_or([0; 8]));
        let area = u32::from_le_bytes(sb[56..60].try_into().unwrap_or([0; 4]));
        let c0 = usize::try_from(l.checkpoint(area)).unwrap_or(usize::MAX);
        let crc = usize::try_from(ckpt_len)
            .ok()
            .and_then(|n| img.get(c0..c0.checked_add(n)?))
            .map(crc32fast::hash);
        let sb = &mut img[o..o + SUPERBLOCK_BYTES];
        if let Some(crc) = crc {
            sb[80..84].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32fast::hash(&sb[..124]);
        sb[124..128].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Build the table image a `table_open` input describes.
///
/// Byte 0 selects: bit 0 clear = the rest is a whole image (zero-padded or truncated to the
/// fuzz layout); bit 0 set = the rest is a list of patches `offset u32, len u8, bytes` applied
/// over [`template_table`]. Bit 1 set = [`reseal`] the result.
#[must_use]
pub fn table_image(data: &[u8]) -> Vec<u8> {
    let mut r = Bytes { b: data, pos: 0 };
    let mode = r.u8();
    let n = table_len();
    let mut img = if mode & 1 == 0 {
        let mut v = r.rest().to_vec();
        v.resize(n, 0);
        v
    } else {
        let mut v = template_table();
        while !r.done() {
            let off = r.u32() as usize % n;
            let len = usize::from(r.u8());
            for i in 0..len {
                let b = r.u8();
                if let Some(x) = v.get_mut(off + i) {
                    *x = b;
                }
            }
        }
        v
    };
    if mode & 2 != 0 {
        reseal(&mut img);
    }
    img
}

/// Open the table image [`table_image`] builds from `data` with [`Engine::open`] and an empty
/// [`MapResolver`]; must return `Ok` or a typed `Err`. An opened engine must answer `status`,
/// read every active image (volumes are missing, so that fails cleanly), and reopen.
pub fn check_table_open(data: &[u8]) {
    let img = table_image(data);
    let storage = Arc::new(MemStorage::from_bytes("fuzz", img));
    let s: Arc<dyn TableStorage> = storage.clone();
    let resolver = MapResolver::default();
    let Ok(e) = Engine::open(s, &resolver, EngineOptions::default()) else {
        return;
    };
    for st in e.status() {
        let mut b = [0u8; 512];
        let _ = e.read_image(st.id, 0, &mut b);
    }
    drop(e);
    // The open wrote a fresh checkpoint; a second open must accept what the first wrote.
    let s: Arc<dyn TableStorage> = storage;
    if let Err(err) = Engine::open(s, &resolver, EngineOptions::default()) {
        panic!("a table the engine opened and checkpointed does not reopen: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// op_script

/// Bytes of each simulated volume in [`check_op_script`].
pub const OP_VOLUME_BYTES: usize = 64 * 1024;
const OP_VOLUMES: usize = 3;

/// Deterministic pseudo-random bytes (xorshift64 seeded by `seed`); the fuzz checks and the
/// integration tests fill their volumes with it.
#[must_use]
pub fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// The reference model of one session (or of a failed establish that may still exist).
#[derive(Debug)]
struct RefSession {
    /// Engine id; `None` for a failed establish not (yet) seen in the engine.
    id: Option<SessionId>,
    src: usize,
    tgt: usize,
    extents: Vec<ExtentSpec>,
    /// Expected image bytes.
    image: Vec<u8>,
    /// Bytes whose value is undecided (a failed write landed there, or not).
    unknown: Vec<bool>,
}

impl RefSession {
    /// (image offset, volume offset, len) of the pieces of `[off, off + len)` of the target.
    fn target_pieces(&self, off: u64, len: u64) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut img = 0u64;
        for x in &self.extents {
            let s = x.target_offset.max(off);
            let e = (x.target_offset + x.len).min(off + len);
            if s < e {
                out.push((
                    (img + s - x.target_offset) as usize,
                    (s - off) as usize,
                    (e - s) as usize,
                ));
            }
            img += x.len;
        }
        out
    }
}

struct OpModel {
    sessions: Vec<RefSession>,
}

impl OpModel {
    /// The engine's id of the model session picked by `k` (modulo their number), if any.
    fn session_id(&self, k: usize) -> Option<SessionId> {
        self.sessions
            .get(k % self.sessions.len().max(1))
            .and_then(|s| s.id)
    }

    /// A write of `data` at `off` of volume `vol`: `Some(true)` succeeded, `Some(false)` failed.
    fn volume_write(&mut self, vol: usize, off: u64, data: &[u8], ok: bool) {
        for s in &mut self.sessions {
            if s.tgt != vol {
                continue;
            }
            for (i, d, n) in s.target_pieces(off, data.len() as u64) {
                if ok {
                    s.image[i..i + n].copy_from_slice(&data[d..d + n]);
                    s.unknown[i..i + n].fill(false);
                } else {
                    s.unknown[i..i + n].fill(true);
                }
            }
        }
    }
}

fn compare(what: &str, id: SessionId, off: usize, got: &[u8], s: &RefSession) {
    for (k, b) in got.iter().enumerate() {
        let i = off + k;
        assert!(
            s.unknown[i] || s.image[i] == *b,
            "{what}: image of session {} differs from the model at image byte {i} \
             (got {b:#04x}, want {:#04x})",
            id.0,
            s.image[i]
        );
    }
}

/// Match every session the engine says is active with the model (adopting failed establishes
/// that exist after all) and compare whole images.
fn check_all(e: &Engine, m: &mut OpModel, vol_locators: &[String]) {
    for st in e.status() {
        if st.state != SessionState::Active {
            continue;
        }
        let id = st.id;
        let idx = match m.sessions.iter().position(|s| s.id == Some(id)) {
            Some(i) => i,
            None => {
                let cand = m.sessions.iter().position(|s| {
                    s.id.is_none()
                        && vol_locators[s.src] == st.source
                        && vol_locators[s.tgt] == st.target
                        && s.extents == st.extents
                });
                let Some(i) = cand else {
                    panic!(
                        "the engine has an active session {} nobody established",
                        st.id
                    );
                };
                m.sessions[i].id = Some(id);
                i
            }
        };
        let s = &m.sessions[idx];
        let mut b = vec![0u8; s.image.len()];
        if e.read_image(id, 0, &mut b).is_ok() {
            compare("full read", id, 0, &b, s);
        }
    }
}

/// Run `data` as a script of engine operations on simulated devices with an I/O-error plan,
/// comparing images with a reference model.
///
/// Byte 0 is the fault mode (`% 4`: none, EIO once, EIO forever, one failing flush), byte 1 where
/// the fault strikes (counted in I/Os, or flushes, after the engine is created). Then each
/// operation is a byte `% 8` followed by its arguments: establish, volume write, image read,
/// target (image) write, copy batch, withdraw, reopen, check all. Engine errors are fine;
/// a panic or an image that differs from the model (outside bytes a failed write may have
/// changed) is not. Sessions are compared only while the engine says they are active.
pub fn check_op_script(data: &[u8]) {
    let mut r = Bytes { b: data, pos: 0 };
    let mode = r.u8() % 4;
    let at = u64::from(r.u8());
    let world = SimWorld::new(at);
    let table: Arc<dyn TableStorage> = Arc::new(world.add_table("table", vec![0; table_len()]));
    let vols: Vec<Arc<dyn Volume>> = (0..OP_VOLUMES)
        .map(|i| {
            Arc::new(world.add_volume(&format!("v{i}"), fill(i as u64 + 1, OP_VOLUME_BYTES)))
                as Arc<dyn Volume>
        })
        .collect();
    let locators: Vec<String> = vols.iter().map(|v| v.info().locator).collect();
    let resolver = {
        let mut res = MapResolver::default();
        for v in &vols {
            res.add(v.clone());
        }
        res
    };
    let options = EngineOptions {
        table: fuzz_table_options(),
        ..EngineOptions::default()
    };
    let Ok(mut e) = Engine::create(table.clone(), options.clone()) else {
        panic!("create failed without faults");
    };
    let mut ids: Vec<_> = vols.iter().map(|v| e.attach(v.clone())).collect();
    // The online ordering checker watches every source write the engine issues.
    world.enable_checker();
    let now = world.clock();
    world.set_faults(match mode {
        0 => Faults::default(),
        1 | 2 => Faults {
            eio_at: Some(now + at * 2),
            eio_forever: mode == 2,
            ..Faults::default()
        },
        _ => Faults {
            fail_sync_at: Some(world.flushes() + at / 8),
            ..Faults::default()
        },
    });
    let mut m = OpModel {
        sessions: Vec::new(),
    };
    let mut steps = 0;
    while !r.done() && steps < 64 {
        steps += 1;
        let op = r.u8() % 8;
        match op {
            0 => op_establish(&mut r, &e, &ids, &world, &mut m),
            1 => {
                let vol = usize::from(r.u8()) % OP_VOLUMES;
                let off = u64::from(r.u16()) % OP_VOLUME_BYTES as u64;
                let len = (u64::from(r.u16()) % 20_000 + 1).min(OP_VOLUME_BYTES as u64 - off);
                let data = fill(u64::from(r.u8()) + 100, len as usize);
                world.note_user_write(&locators[vol], off, len);
                let ok = e.write(ids[vol], off, &data).is_ok();
                m.volume_write(vol, off, &data, ok);
            }
            2 | 3 => op_image(&mut r, op == 3, &e, &world, &mut m),
            4 => {
                let k = usize::from(r.u8());
                let from = u64::from(r.u8() % 32);
                let max = u64::from(r.u8() % 8 + 1);
                if let Some(id) = m.session_id(k) {
                    let _ = e.copy_batch(id, GrainIndex(from), GrainCount(max));
                    let _ = e.complete_if_done(id);
                }
            }
            5 => {
                let k = usize::from(r.u8());
                if let Some(id) = m.session_id(k) {
                    let _ = e.withdraw(id);
                }
            }
            6 => {
                drop(e);
                let Some(x) = reopen(&table, &resolver, &options) else {
                    assert!(mode != 0, "reopen failed without faults");
                    return;
                };
                e = x;
                ids = vols.iter().map(|v| v.info().id).collect();
                for v in &vols {
                    if e.volume(v.info().id).is_err() {
                        e.attach(v.clone());
                    }
                }
                check_all(&e, &mut m, &locators);
            }
            _ => check_all(&e, &mut m, &locators),
        }
    }
    check_all(&e, &mut m, &locators);
    let v = world.violations();
    assert!(v.is_empty(), "ordering checker: {v:?}");
}

/// Script operation 0 of [`check_op_script`]: establish a session described by the next bytes
/// and, when the engine accepted it or its T0 image is known, add it to the model.
fn op_establish(
    r: &mut Bytes<'_>,
    e: &Engine,
    ids: &[VolumeId],
    world: &SimWorld,
    m: &mut OpModel,
) {
    let src = usize::from(r.u8()) % OP_VOLUMES;
    let tgt = usize::from(r.u8()) % OP_VOLUMES;
    let flags = r.u8();
    let g = 4096u64 << (flags & 1);
    let nocopy = flags & 2 != 0;
    let next = 1 + usize::from(flags >> 2 & 1);
    let extents: Vec<ExtentSpec> = (0..next)
        .map(|_| ExtentSpec {
            source_offset: u64::from(r.u8() % 16) * g,
            target_offset: u64::from(r.u8() % 16) * g,
            len: u64::from(r.u8() % 6 + 1) * g,
        })
        .collect();
    let spec = SessionSpec {
        source: ids[src],
        target: ids[tgt],
        extents: extents.clone(),
        grain: GrainSize::new(g).unwrap_or(GrainSize::DEFAULT),
        mode: if nocopy {
            CopyMode::NoCopy
        } else {
            CopyMode::Copy
        },
        incremental: false,
    };
    // T0 is what the source device holds now: failed writes may or may not have
    // landed, so the device, not a model, is the reference.
    let before = world.current_images()[1 + src].clone();
    let mut image = Vec::new();
    for x in &extents {
        let (s, l) = (x.source_offset as usize, x.len as usize);
        if s + l <= before.len() {
            image.extend_from_slice(&before[s..s + l]);
        }
    }
    let id = e.establish(&spec).ok();
    let covered = image.len() as u64 == extents.iter().map(|x| x.len).sum::<u64>();
    if id.is_some() || covered {
        let unknown = vec![false; image.len()];
        m.sessions.push(RefSession {
            id,
            src,
            tgt,
            extents,
            image,
            unknown,
        });
    }
}

/// Script operations 2 (image read, compared with the model while the session is active) and 3
/// (image write, recorded in the model) of [`check_op_script`].
fn op_image(r: &mut Bytes<'_>, write: bool, e: &Engine, world: &SimWorld, m: &mut OpModel) {
    let k = usize::from(r.u8());
    let off = u64::from(r.u16());
    let len = u64::from(r.u16()) % 20_000 + 1;
    let seed = r.u8();
    let nsess = m.sessions.len().max(1);
    let Some(s) = m.sessions.get_mut(k % nsess) else {
        return;
    };
    let Some(id) = s.id else { return };
    let il = s.image.len() as u64;
    let off = off % il;
    let len = len.min(il - off);
    let (o, n) = (off as usize, len as usize);
    if write {
        let data = fill(u64::from(seed) + 1000, n);
        if let Ok(sess) = e.session(id) {
            for p in sess.map.image_pieces(off, len) {
                world.note_user_write(&sess.desc.target.locator, p.target_offset, p.len);
            }
        }
        if e.write_image(id, off, &data).is_ok() {
            s.image[o..o + n].copy_from_slice(&data);
            s.unknown[o..o + n].fill(false);
        } else {
            s.unknown[o..o + n].fill(true);
        }
    } else {
        let active = e.session(id).is_ok_and(|x| x.is_active());
        let mut b = vec![0u8; n];
        if e.read_image(id, off, &mut b).is_ok() && active {
            compare("read", id, o, &b, s);
        }
    }
}

/// Open the engine again over the same table (two attempts), as script operation 6 of
/// [`check_op_script`] does.
fn reopen(
    table: &Arc<dyn TableStorage>,
    resolver: &MapResolver,
    options: &EngineOptions,
) -> Option<Engine> {
    for _ in 0..2 {
        if let Ok(x) = Engine::open(table.clone(), resolver, options.clone()) {
            return Some(x);
        }
    }
    None
}
