//! One round: every figure measured once, engine and raw sides interleaved; which side goes
//! first alternates from round to round.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::figures::{counts, Counts, Figure, Layout};
use super::files::{attach, io_err, open_rw, warm_page_cache, whole, Files};
use super::measure::{pair, pair_sliced, rand_off, raw_copy, run_ops};
use super::report::RunInfo;
use super::{engine_options, BenchOptions, GRAIN, JOURNAL_BYTES, RECORD};
use crate::activity::format::{CopyMode, Entry, SessionState};
use crate::engine::copier::{Copier, CopierOptions};
use crate::engine::{Engine, Image};
use crate::ids::{SessionId, VolumeId};
use crate::Result;

/// Measure every figure once (round `round`, 0-based) into `figs`; facts about the engine go
/// to `run`.
pub(super) fn one_round(
    opts: &BenchOptions,
    f: &Files,
    figs: &mut [Figure],
    round: usize,
    run: &mut RunInfo,
) -> Result<()> {
    let r = Round::new(opts, f, round);
    let (e, s) = r.recover(figs, run)?;
    // The image opened once, as the raw side opens its file once.
    let img = e.image(s.id)?;
    r.read_uncopied(figs, &img)?;
    r.first_writes(figs, &e, s.src)?;
    r.already_copied(figs, &e, s)?;
    r.read_copied(figs, &img)?;
    drop(img);
    e.withdraw(s.id)?;
    r.background_copy(figs, e, s, run)
}

/// The session a round measures: the source and target files attached to the engine.
#[derive(Debug, Clone, Copy)]
struct Session {
    src: VolumeId,
    tgt: VolumeId,
    id: SessionId,
}

/// What every measurement of a round shares.
struct Round<'a> {
    opts: &'a BenchOptions,
    f: &'a Files,
    size: u64,
    c: Counts,
    lay: Layout,
    /// Seed of the offsets of the image reads (and, altered, of the already-copied writes).
    salt: u64,
    /// Whether the raw side goes first in this round.
    raw_first: bool,
}

impl<'a> Round<'a> {
    fn new(opts: &'a BenchOptions, f: &'a Files, round: usize) -> Self {
        Round {
            opts,
            f,
            size: opts.size,
            c: counts(opts.size, &opts.writers),
            lay: Layout {
                n: opts.writers.len(),
            },
            salt: round as u64 * 7919,
            raw_first: round.is_multiple_of(2),
        }
    }

    /// (e) Recovery of the table, with this run's sessions over the files (timed); then a
    /// fresh no-copy session over the whole source, every older one withdrawn.
    fn recover(&self, figs: &mut [Figure], run: &mut RunInfo) -> Result<(Arc<Engine>, Session)> {
        let t0 = Instant::now();
        let e = Arc::new(Engine::open_path(&self.f.table, engine_options(self.opts))?);
        figs[self.lay.recovery()]
            .engine
            .per_round
            .push(t0.elapsed().as_secs_f64() * 1e3);
        let src = attach(&e, &self.f.src)?;
        let tgt = attach(&e, &self.f.tgt)?;
        for s in e.status() {
            if s.state == SessionState::Active {
                e.withdraw(s.id)?;
            }
        }
        let id = e.establish(&whole(src, tgt, CopyMode::NoCopy))?;
        run.backend = e.backend_name();
        Ok((e, Session { src, tgt, id }))
    }

    /// (c) Image reads of uncopied grains against preads of the source.
    fn read_uncopied(&self, figs: &mut [Figure], img: &Image<'_>) -> Result<()> {
        let (size, salt) = (self.size, self.salt);
        let path = &self.f.src;
        let src_file = File::open(path).map_err(|e| io_err("open", path, e))?;
        pair_sliced(
            self.raw_first,
            figs,
            self.lay.read_uncopied(),
            self.c.fast_ops,
            |i, b| img.read_at(rand_off(i, size, salt), b),
            |i, b| {
                src_file
                    .read_exact_at(b, rand_off(i, size, salt))
                    .map_err(|e| io_err("pread", path, e))
            },
        )
    }

    /// (b) First writes with durability at every writer count, against raw writes each made
    /// durable, and (one writer) against the physical floor, the rule-2 floor and the copy
    /// log's floor.
    fn first_writes(&self, figs: &mut [Figure], e: &Engine, src: VolumeId) -> Result<()> {
        let (c, lay, raw_first) = (&self.c, self.lay, self.raw_first);
        let raw_path = &self.f.raw;
        let raw = open_rw(raw_path)?;
        let raw_tgt = open_rw(&self.f.raw_tgt)?;
        let journal = open_rw(&self.f.raw_journal)?;
        let first = |base: usize| {
            move |i: usize, b: &mut [u8]| {
                let off = (base + i) as u64 * GRAIN;
                e.write(src, off, b)?;
                e.flush(src)
            }
        };
        let raw_sync = |base: usize| {
            let raw = &raw;
            move |i: usize, b: &mut [u8]| {
                let off = (base + i) as u64 * GRAIN;
                raw.write_all_at(b, off)
                    .and_then(|()| raw.sync_data())
                    .map_err(|e| io_err("pwrite+fdatasync", raw_path, e))
            }
        };
        let floor =
            |i: usize, b: &mut [u8]| floor_write(&raw, &raw_tgt, Floor::Physical, i, b, raw_path);
        // The floor of a rule-2 copy-before-write (crash model): the target's durability point,
        // then a record and the table's durability point, before the source write.
        let floor2 = |i: usize, b: &mut [u8]| {
            floor_write(&raw, &raw_tgt, Floor::Rule2(&journal), i, b, raw_path)
        };
        // The floor of the copy log's writes: the grain and its record's two mirror copies in
        // one file, one durability point, before the source write.
        let floor_log = |i: usize, b: &mut [u8]| {
            floor_write(&raw, &raw_tgt, Floor::Log(&journal), i, b, raw_path)
        };
        let e1 = run_ops(1, c.first_1, first(0));
        let (r1, fl, fl2, fll) = if raw_first {
            let fl = run_ops(1, c.first_1, floor)?;
            let fl2 = run_ops(1, c.first_1, floor2)?;
            let fll = run_ops(1, c.first_1, floor_log)?;
            (run_ops(1, c.first_1, raw_sync(0))?, fl, fl2, fll)
        } else {
            let r1 = run_ops(1, c.first_1, raw_sync(0))?;
            let fll = run_ops(1, c.first_1, floor_log)?;
            let fl2 = run_ops(1, c.first_1, floor2)?;
            (r1, run_ops(1, c.first_1, floor)?, fl2, fll)
        };
        let e1 = e1?;
        figs[lay.floor()].engine.record(e1.clone());
        figs[lay.floor()].raw.record(fl);
        figs[lay.floor_rule2()].engine.record(e1.clone());
        figs[lay.floor_rule2()].raw.record(fl2);
        figs[lay.floor_log()].engine.record(e1.clone());
        figs[lay.floor_log()].raw.record(fll);
        let mut base = c.first_1;
        for (k, &w) in self.opts.writers.iter().enumerate() {
            if w == 1 {
                figs[lay.first(k)].engine.record(e1.clone());
                figs[lay.first(k)].raw.record(r1.clone());
                continue;
            }
            pair(
                raw_first,
                figs,
                lay.first(k),
                || run_ops(w, c.first_many, first(base)),
                || run_ops(w, c.first_many, raw_sync(base)),
            )?;
            base += c.first_many;
        }
        Ok(())
    }

    /// (a) Every grain copied, session still active: the already-copied path at every writer
    /// count, against raw writes to the same file.
    fn already_copied(&self, figs: &mut [Figure], e: &Engine, s: Session) -> Result<()> {
        let (size, lay, raw_first, fast_ops) =
            (self.size, self.lay, self.raw_first, self.c.fast_ops);
        let grains = size / GRAIN;
        e.table().commit(vec![Entry::SetBits {
            session: s.id,
            start: 0,
            count: grains,
        }])?;
        let salt2 = self.salt ^ 0xabcd;
        // The raw side writes the same file, at the same offsets, through its own descriptor
        // (every grain is copied, so the image does not depend on the source any more): both
        // sides see the same inode, page cache and write-back state.
        let path = &self.f.src;
        let raw_src = open_rw(path)?;
        let eng_write = |i: usize, b: &mut [u8]| e.write(s.src, rand_off(i, size, salt2), b);
        let raw_write = |i: usize, b: &mut [u8]| {
            raw_src
                .write_all_at(b, rand_off(i, size, salt2))
                .map_err(|e| io_err("pwrite", path, e))
        };
        for (k, &threads) in self.opts.writers.iter().enumerate() {
            if threads == 1 {
                pair_sliced(
                    raw_first,
                    figs,
                    lay.copied(k),
                    fast_ops,
                    eng_write,
                    raw_write,
                )?;
                continue;
            }
            pair(
                raw_first,
                figs,
                lay.copied(k),
                || run_ops(threads, fast_ops, eng_write),
                || run_ops(threads, fast_ops, raw_write),
            )?;
        }
        Ok(())
    }

    /// (c) Image reads of copied grains against preads of the target.
    fn read_copied(&self, figs: &mut [Figure], img: &Image<'_>) -> Result<()> {
        let (size, salt) = (self.size, self.salt);
        let path = &self.f.tgt;
        // With `direct_copy`, the previous round's O_DIRECT copy dropped the target's cached
        // pages; load them again so that neither side reads the disk. Every grain is copied, so
        // the image lives in the target: the raw side reads the target file at the same offsets
        // (same inode, same cached pages), as the uncopied figure reads the source.
        if self.opts.direct_copy {
            warm_page_cache(path)?;
        }
        let tgt_file = File::open(path).map_err(|e| io_err("open", path, e))?;
        pair_sliced(
            self.raw_first,
            figs,
            self.lay.read_copied(),
            self.c.fast_ops,
            |i, b| img.read_at(rand_off(i, size, salt), b),
            |i, b| {
                tgt_file
                    .read_exact_at(b, rand_off(i, size, salt))
                    .map_err(|e| io_err("pread", path, e))
            },
        )
    }

    /// (d) Background copy vs a raw copy of the same size; with `direct_copy` the engine is
    /// reopened with O_DIRECT volumes so that both sides bypass the page cache.
    fn background_copy(
        &self,
        figs: &mut [Figure],
        e: Arc<Engine>,
        s: Session,
        run: &mut RunInfo,
    ) -> Result<()> {
        let (f, size) = (self.f, self.size);
        let (e, src, tgt) = if self.opts.direct_copy {
            drop(e);
            let mut eo = engine_options(self.opts);
            eo.file_options.direct = true;
            let e = Arc::new(Engine::open_path(&f.table, eo)?);
            let (src, tgt) = (attach(&e, &f.src)?, attach(&e, &f.tgt)?);
            (e, src, tgt)
        } else {
            (e, s.src, s.tgt)
        };
        run.copy_backend = e.backend_name();
        let mut direct = true;
        let mut offloaded = 0;
        let mut eng_copy = || -> Result<f64> {
            let cid = e.establish(&whole(src, tgt, CopyMode::Copy))?;
            let t0 = Instant::now();
            let cp = Copier::start(
                e.clone(),
                CopierOptions {
                    sessions: vec![cid],
                    ..CopierOptions::default()
                },
            )?;
            let p = cp.join()?;
            offloaded += p.bytes_offloaded;
            Ok(p.bytes_copied as f64 / t0.elapsed().as_secs_f64())
        };
        let (ev, rv) = if self.raw_first {
            let (r, d) = raw_copy(&f.src, &f.raw_copy, size)?;
            direct = d;
            (eng_copy()?, r)
        } else {
            let ev = eng_copy()?;
            let (r, d) = raw_copy(&f.src, &f.raw_copy, size)?;
            direct = direct && d;
            (ev, r)
        };
        figs[self.lay.copy()].engine.per_round.push(ev);
        figs[self.lay.copy()].raw.per_round.push(rv);
        run.direct &= direct;
        run.copy_offloaded += offloaded;
        Ok(())
    }
}

/// Which floor [`floor_write`] measures.
#[derive(Clone, Copy)]
enum Floor<'a> {
    /// The physical floor: the grain to the target, durable, then the source write, durable.
    Physical,
    /// The rule-2 floor: the physical floor with a 512-byte record made durable in the
    /// stand-in journal between the target's durability point and the source write.
    Rule2(&'a File),
    /// The copy log's floor: the grain and a 512-byte record written twice (as the table's
    /// journal mirrors every block) at three places of the stand-in journal, one durability
    /// point of that file, then the source write, durable. The grain is not written to the
    /// target: the engine writes it there too, but flushes it only when the log is retired.
    Log(&'a File),
}

/// One first write at a floor, grain `i`: read the grain's 64 KiB from `raw`, make it durable
/// as `kind` says, then write `b` over the grain and make it durable.
fn floor_write(
    raw: &File,
    raw_tgt: &File,
    kind: Floor<'_>,
    i: usize,
    b: &[u8],
    path: &Path,
) -> Result<()> {
    let off = i as u64 * GRAIN;
    let mut g = vec![0u8; GRAIN as usize];
    // Record slots: two mirror areas of a quarter of the stand-in journal each, then a log
    // ring in its second half (like the table: mirror copies far apart, the log after them).
    let quarter = JOURNAL_BYTES / 4;
    let rec = (i * RECORD) as u64 % quarter;
    raw.read_exact_at(&mut g, off)
        .and_then(|()| match kind {
            Floor::Physical => raw_tgt
                .write_all_at(&g, off)
                .and_then(|()| raw_tgt.sync_data()),
            Floor::Rule2(j) => raw_tgt
                .write_all_at(&g, off)
                .and_then(|()| raw_tgt.sync_data())
                .and_then(|()| j.write_all_at(&g[..RECORD], rec))
                .and_then(|()| j.sync_data()),
            Floor::Log(j) => {
                let slot = 2 * quarter + off % (2 * quarter);
                j.write_all_at(&g, slot)
                    .and_then(|()| j.write_all_at(&g[..RECORD], rec))
                    .and_then(|()| j.write_all_at(&g[..RECORD], quarter + rec))
                    .and_then(|()| j.sync_data())
            }
        })
        .and_then(|()| raw.write_all_at(b, off))
        .and_then(|()| raw.sync_data())
        .map_err(|e| io_err("floor", path, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]
    use super::*;

    fn file(dir: &Path, name: &str, len: u64, byte: u8) -> File {
        let p = dir.join(name);
        std::fs::write(&p, vec![byte; usize::try_from(len).unwrap()]).unwrap();
        open_rw(&p).unwrap()
    }

    /// Each floor makes durable what it stands for, and only that: the physical floor copies
    /// the grain to the target, the rule-2 floor adds a record, the copy-log floor puts the
    /// grain and two copies of a record in the stand-in table and leaves the target alone.
    #[test]
    fn floors_write_what_they_stand_for() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * GRAIN;
        let raw = file(dir.path(), "raw", size, 0);
        for (i, g) in (0..8u64).zip(1u8..) {
            raw.write_all_at(&vec![g; GRAIN as usize], i * GRAIN)
                .unwrap();
        }
        let tgt = file(dir.path(), "tgt", size, 0);
        let journal = file(dir.path(), "journal", JOURNAL_BYTES, 0);
        // `len` bytes of `f` at `off` all hold `byte`.
        let holds = |f: &File, off: u64, len: usize, byte: u8| {
            let mut b = vec![0u8; len];
            f.read_exact_at(&mut b, off).unwrap();
            b.iter().all(|x| *x == byte)
        };
        let (new, g) = (vec![0xEEu8; 4096], GRAIN as usize);
        let quarter = JOURNAL_BYTES / 4;
        let p = dir.path();

        floor_write(&raw, &tgt, Floor::Physical, 1, &new, p).unwrap();
        assert!(holds(&tgt, GRAIN, g, 2));
        assert!(holds(&raw, GRAIN, 4096, 0xEE));
        assert!(holds(&raw, GRAIN + 4096, g - 4096, 2));

        floor_write(&raw, &tgt, Floor::Rule2(&journal), 2, &new, p).unwrap();
        assert!(holds(&tgt, 2 * GRAIN, g, 3));
        let rec = (2 * RECORD) as u64;
        assert!(holds(&journal, rec, RECORD, 3));
        assert!(holds(&journal, quarter + rec, RECORD, 0));

        floor_write(&raw, &tgt, Floor::Log(&journal), 3, &new, p).unwrap();
        assert!(holds(&tgt, 3 * GRAIN, g, 0));
        let rec = (3 * RECORD) as u64;
        assert!(holds(&journal, rec, RECORD, 4));
        assert!(holds(&journal, quarter + rec, RECORD, 4));
        assert!(holds(&journal, 2 * quarter + 3 * GRAIN, g, 4));
        assert!(holds(&raw, 3 * GRAIN, 4096, 0xEE));
    }
}
