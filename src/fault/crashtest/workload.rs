//! The workload catalogue: scripted steps, and workloads generated from seven parameterized
//! templates.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::VOLUME_BYTES;
use crate::activity::format::{CopyMode, ExtentSpec};

/// One scripted step. Sessions are named by their index in establish order.
#[derive(Debug, Clone)]
pub enum Op {
    /// Establish a session from volume `src` to volume `tgt`.
    Establish {
        /// Source volume index.
        src: usize,
        /// Target volume index.
        tgt: usize,
        /// Extents.
        extents: Vec<ExtentSpec>,
        /// Grain bytes.
        grain: u64,
        /// Mode.
        mode: CopyMode,
        /// Record changes (copy mode only).
        incremental: bool,
    },
    /// `Engine::establish_group`: one session per pair, at one T0, all or none.
    EstablishGroup {
        /// The group's name.
        name: String,
        /// (source volume index, target volume index, extents) per pair.
        pairs: Vec<(usize, usize, Vec<ExtentSpec>)>,
        /// Grain bytes.
        grain: u64,
        /// Mode.
        mode: CopyMode,
        /// Record changes (copy mode only).
        incremental: bool,
        /// The establish must fail on this pair (from 1) before any I/O, establishing nothing.
        fails_at: Option<usize>,
    },
    /// `Engine::withdraw_group`.
    WithdrawGroup {
        /// The group's name.
        name: String,
    },
    /// `Engine::write` of seeded bytes to a source volume.
    Write {
        /// Volume index.
        vol: usize,
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Seed of the bytes.
        fill: u64,
    },
    /// `Engine::flush` of a volume.
    Flush {
        /// Volume index.
        vol: usize,
    },
    /// `Engine::write_image` (a target write).
    WriteImage {
        /// Session index.
        sess: usize,
        /// Image offset.
        off: u64,
        /// Length.
        len: u64,
        /// Seed of the bytes.
        fill: u64,
    },
    /// `Engine::copy_batch`.
    CopyBatch {
        /// Session index.
        sess: usize,
        /// First grain to look at.
        from: u64,
        /// Most grains.
        max: u64,
    },
    /// `Engine::copy_all` (completes the session).
    CopyAll {
        /// Session index.
        sess: usize,
    },
    /// `Engine::refresh`: a new T0 for an incremental session.
    Refresh {
        /// Session index.
        sess: usize,
    },
    /// `Engine::reverse`: the session's source holds its image again.
    Reverse {
        /// Session index.
        sess: usize,
    },
    /// `Engine::restore_batch`.
    RestoreBatch {
        /// Session index.
        sess: usize,
        /// First grain to look at.
        from: u64,
        /// Most grains.
        max: u64,
    },
    /// `Engine::restore_all`.
    RestoreAll {
        /// Session index.
        sess: usize,
    },
    /// `Engine::withdraw`.
    Withdraw {
        /// Session index.
        sess: usize,
    },
    /// `Engine::convert_to_copy`.
    Convert {
        /// Session index.
        sess: usize,
    },
    /// Drop the engine and recover it from the same (uncrashed) devices.
    Reopen,
    /// Drop the engine and recover it with volume `vol` missing (absent from the resolver):
    /// every live session using it must be suspended, and its image reads and the writes
    /// that would need copy-before-write for it must be refused.
    ReopenWithout {
        /// Volume index.
        vol: usize,
    },
    /// `Engine::reset` of volume `vol` reporting it gone: the same checks as `ReopenWithout`.
    ResetGone {
        /// Volume index.
        vol: usize,
    },
    /// `Engine::reset` of volume `vol` reporting it back as it was.
    ResetBack {
        /// Volume index.
        vol: usize,
    },
    /// `Engine::resume` of a session with every volume available again.
    Resume {
        /// Session index.
        sess: usize,
    },
}

/// A named script.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Template and seed.
    pub name: String,
    /// Seed of the volume contents and of the workload's choices.
    pub seed: u64,
    /// Steps.
    pub ops: Vec<Op>,
    /// Run the engine in write-back mode ([`EngineOptions::write_back`](crate::EngineOptions)):
    /// source writes are held until the volume's next flush.
    pub write_back: bool,
    /// Run the engine with serial copy-before-write
    /// ([`EngineOptions::checked_copies`](crate::EngineOptions) off).
    pub serial_copies: bool,
    /// Give the table a copy log (the engine's default; `+nolog` in the name when not): two
    /// workloads in four run without one, so that with the alternation of the checked path's
    /// two arrangements (by workload parity) every combination runs.
    pub copy_log: bool,
}

/// `len` seeded bytes.
pub(super) fn fill(seed: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; usize::try_from(len).unwrap_or(0)];
    SmallRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

fn ext(s: u64, t: u64, l: u64) -> ExtentSpec {
    ExtentSpec {
        source_offset: s,
        target_offset: t,
        len: l,
    }
}

/// The templates' names; workload `i` follows template `i % 7`.
const TEMPLATES: [&str; 7] = [
    "basic",
    "overlap",
    "target",
    "copy",
    "lifecycle",
    "reopen",
    "churn",
];

/// The catalogue: `n` workloads from seven parameterized templates.
#[must_use]
pub fn catalogue(n: usize, seed: u64) -> Vec<Workload> {
    catalogue_with(n, seed, false)
}

/// The catalogue, with every other round of the templates in write-back mode when
/// `write_back` (the ops are the same either way).
#[must_use]
pub fn catalogue_with(n: usize, seed: u64, write_back: bool) -> Vec<Workload> {
    (0..n)
        .map(|i| {
            let mut w = generate(i, seed);
            if !write_back && w.write_back {
                w.write_back = false;
                w.name = w.name.replacen("+wb", "", 1);
            }
            w
        })
        .collect()
}

/// Workload `i` of the catalogue of `seed`.
fn generate(i: usize, seed: u64) -> Workload {
    let ws = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i as u64);
    let mut g = Gen::new(ws);
    let t = i % 7;
    let ops = match t {
        0 => g.basic(),
        1 => g.overlap(),
        2 => g.target(),
        3 => g.copy(),
        4 => g.lifecycle(),
        6 => g.churn(),
        _ => g.reopen(),
    };
    // Every other round of the templates runs in write-back mode, so each template runs both
    // ways (the choice takes nothing from the generator: the ops are as they were without it).
    let write_back = (i / TEMPLATES.len()) % 2 == 1;
    let copy_log = i % 4 < 2;
    Workload {
        name: format!(
            "{}#{i}{}{}",
            TEMPLATES[t],
            if write_back { "+wb" } else { "" },
            if copy_log { "" } else { "+nolog" }
        ),
        seed: ws,
        ops,
        write_back,
        serial_copies: false,
        copy_log,
    }
}

/// The seeded choices of one workload: the generator, then the grain and mode of its
/// whole-volume sessions (drawn first, whatever the template).
struct Gen {
    r: SmallRng,
    grain: u64,
    mode: CopyMode,
    /// Whether this workload's whole-volume copy sessions and groups record changes (taken
    /// from the workload's seed, not from the generator, so every other choice stays as it
    /// was before incremental sessions existed).
    incremental: bool,
}

impl Gen {
    fn new(ws: u64) -> Gen {
        let mut r = SmallRng::seed_from_u64(ws);
        let grain = if r.random_bool(0.5) { 4096 } else { 8192 };
        let mode = if r.random_bool(0.5) {
            CopyMode::Copy
        } else {
            CopyMode::NoCopy
        };
        let incremental = mode == CopyMode::Copy && ws.rotate_right(17) & 1 == 1;
        Gen {
            r,
            grain,
            mode,
            incremental,
        }
    }

    /// A write of 1..=24 sectors of seeded bytes somewhere in volume 0.
    fn write(&mut self) -> Op {
        self.write_to(0)
    }

    /// A write of 1..=24 sectors of seeded bytes somewhere in volume `vol`.
    fn write_to(&mut self, vol: usize) -> Op {
        let r = &mut self.r;
        let len = r.random_range(1..=24u64) * 512;
        let off = r.random_range(0..=(VOLUME_BYTES - len) / 512) * 512;
        Op::Write {
            vol,
            off,
            len,
            fill: r.random(),
        }
    }

    /// A session over the whole of volume 0 onto volume `tgt`, at this workload's grain and
    /// mode.
    fn whole(&self, tgt: usize) -> Op {
        Op::Establish {
            src: 0,
            tgt,
            extents: vec![ext(0, 0, VOLUME_BYTES)],
            grain: self.grain,
            mode: self.mode,
            incremental: self.incremental,
        }
    }

    /// Source writes before and after T0, one flush; then a consistency group (appended, so
    /// the steps before it and their I/O stay as they were).
    fn basic(&mut self) -> Vec<Op> {
        let mut ops = vec![self.write(), self.whole(1)];
        for _ in 0..self.r.random_range(3..6) {
            ops.push(self.write());
        }
        ops.push(Op::Flush { vol: 0 });
        ops.push(self.write());
        ops.push(self.write());
        ops.extend(self.group());
        ops
    }

    /// A consistency group of two sessions (sessions 1 and 2: volume 0's first half and volume
    /// 1's first half onto the two halves of volume 2) at one T0, writes to both sources, a
    /// group that fails on its second pair (its target is session 2's), and the group's
    /// withdrawal in one commit.
    fn group(&mut self) -> Vec<Op> {
        let half = VOLUME_BYTES / 2;
        let mut ops = vec![
            Op::Withdraw { sess: 0 },
            Op::EstablishGroup {
                name: "g".to_string(),
                pairs: vec![
                    (0, 2, vec![ext(0, 0, half)]),
                    (1, 2, vec![ext(0, half, half)]),
                ],
                grain: self.grain,
                mode: self.mode,
                incremental: self.incremental,
                fails_at: None,
            },
        ];
        for k in 0..4 {
            ops.push(self.write_to(k % 2));
        }
        ops.push(Op::EstablishGroup {
            name: "h".to_string(),
            pairs: vec![
                (0, 1, vec![ext(half, half, half)]),
                (1, 2, vec![ext(half, half, half)]),
            ],
            grain: self.grain,
            mode: self.mode,
            incremental: self.incremental,
            fails_at: Some(2),
        });
        ops.push(self.write_to(1));
        ops.push(Op::WithdrawGroup {
            name: "g".to_string(),
        });
        ops.push(self.write());
        ops
    }

    /// Two sessions over overlapping ranges of one source, one of them partial and copying.
    fn overlap(&mut self) -> Vec<Op> {
        let mut ops = vec![self.whole(1), self.write(), self.write()];
        ops.push(Op::Establish {
            src: 0,
            tgt: 2,
            extents: vec![ext(16384, 0, 16384), ext(40960, 32768, 8192)],
            grain: 4096,
            mode: CopyMode::Copy,
            incremental: false,
        });
        for _ in 0..4 {
            ops.push(self.write());
        }
        ops.push(Op::Flush { vol: 0 });
        ops.push(Op::CopyBatch {
            sess: 1,
            from: 0,
            max: 2,
        });
        ops.push(self.write());
        ops.extend(self.reverse());
        ops
    }

    /// Session 0 (over all of volume 0) is reversed while session 1 protects part of the same
    /// source: grains moved back in part, writes that move theirs back first (one made durable,
    /// one not), and the rest moved back.
    fn reverse(&mut self) -> Vec<Op> {
        vec![
            Op::Flush { vol: 0 },
            Op::Reverse { sess: 0 },
            Op::RestoreBatch {
                sess: 0,
                from: self.r.random_range(0..8),
                max: 2,
            },
            self.write(),
            Op::Flush { vol: 0 },
            self.write(),
            Op::RestoreAll { sess: 0 },
            self.write(),
        ]
    }

    /// Image writes (to the target) between source writes, each made durable.
    fn target(&mut self) -> Vec<Op> {
        let mut ops = vec![self.whole(1), self.write()];
        for _ in 0..2 {
            let r = &mut self.r;
            let len = r.random_range(1..=12u64) * 512;
            let off = r.random_range(0..=(VOLUME_BYTES - len) / 512) * 512;
            ops.push(Op::WriteImage {
                sess: 0,
                off,
                len,
                fill: r.random(),
            });
            ops.push(Op::Flush { vol: 1 });
            ops.push(self.write());
            ops.push(self.write());
        }
        ops
    }

    /// Copy batches between source writes, then the copy to the end.
    fn copy(&mut self) -> Vec<Op> {
        let mut ops = vec![Op::Establish {
            src: 0,
            tgt: 1,
            extents: vec![ext(0, 0, VOLUME_BYTES)],
            grain: self.grain,
            mode: CopyMode::Copy,
            incremental: true,
        }];
        for _ in 0..3 {
            ops.push(Op::CopyBatch {
                sess: 0,
                from: self.r.random_range(0..8),
                max: self.r.random_range(1..4),
            });
            ops.push(self.write());
        }
        ops.push(Op::CopyAll { sess: 0 });
        ops.push(self.write());
        ops.extend(self.refresh());
        ops
    }

    /// Session 0 is incremental and completed: writes to its source and target, a refresh (a
    /// new T0), writes racing the new copy, the copy to the end, and a second refresh.
    fn refresh(&mut self) -> Vec<Op> {
        let mut ops = vec![self.write(), self.write_to(1), Op::Refresh { sess: 0 }];
        ops.push(self.write());
        ops.push(Op::CopyBatch {
            sess: 0,
            from: 0,
            max: 2,
        });
        ops.push(self.write());
        ops.push(Op::CopyAll { sess: 0 });
        ops.push(self.write());
        ops.push(Op::Refresh { sess: 0 });
        ops.push(self.write());
        ops
    }

    /// A no-copy session converted, copied in part, withdrawn; then another session.
    fn lifecycle(&mut self) -> Vec<Op> {
        let mut ops = vec![Op::Establish {
            src: 0,
            tgt: 1,
            extents: vec![ext(0, 0, VOLUME_BYTES)],
            grain: self.grain,
            mode: CopyMode::NoCopy,
            incremental: false,
        }];
        ops.push(self.write());
        ops.push(self.write());
        ops.push(Op::Convert { sess: 0 });
        ops.push(Op::CopyBatch {
            sess: 0,
            from: 0,
            max: 3,
        });
        ops.push(Op::Withdraw { sess: 0 });
        ops.push(self.whole(2));
        ops.push(self.write());
        ops.push(self.write());
        ops
    }

    /// Many commits: checkpoints, journal wrap-around, forgetting ended sessions.
    fn churn(&mut self) -> Vec<Op> {
        let mut ops = Vec::new();
        for k in 0..self.r.random_range(90..150usize) {
            ops.push(Op::Establish {
                src: 0,
                tgt: 1 + k % 2,
                extents: vec![ext(0, 0, VOLUME_BYTES)],
                grain: 4096,
                mode: CopyMode::NoCopy,
                incremental: false,
            });
            if k % 8 == 0 {
                ops.push(self.write());
            }
            ops.push(Op::Withdraw { sess: k });
        }
        ops.push(self.whole(1));
        ops.push(self.write());
        ops
    }

    /// Reopens between steps; then volumes missing at reopen or gone on a reset, suspended
    /// sessions and their resumption.
    fn reopen(&mut self) -> Vec<Op> {
        let mut ops = vec![self.whole(1), self.write(), Op::Reopen, self.write()];
        ops.push(Op::Establish {
            src: 0,
            tgt: 2,
            extents: vec![ext(8192, 16384, 32768)],
            grain: 8192,
            mode: self.mode,
            incremental: self.incremental && self.mode == CopyMode::Copy,
        });
        ops.push(Op::CopyBatch {
            sess: 1,
            from: 1,
            max: 2,
        });
        ops.push(self.write());
        ops.push(Op::Reopen);
        ops.push(Op::Withdraw { sess: 0 });
        ops.push(self.write());
        ops.push(Op::Reopen);
        // Suspended and resumed (appended, so the steps above and their I/O stay as they
        // were): session 1's target, then its source, missing at reopen or gone on a reset;
        // back through reopen, a reset and resume.
        ops.push(Op::ReopenWithout { vol: 2 });
        ops.push(Op::Reopen);
        ops.push(self.write());
        ops.push(Op::ResetGone { vol: 2 });
        ops.push(Op::Resume { sess: 1 });
        ops.push(self.write());
        ops.push(Op::ResetGone { vol: 2 });
        ops.push(Op::ResetBack { vol: 2 });
        ops.push(self.write());
        ops.push(Op::ReopenWithout { vol: 0 });
        ops.push(Op::Reopen);
        ops.push(self.write());
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_is_deterministic_and_cycles_the_templates() {
        let a = catalogue(14, 5);
        let b = catalogue(14, 5);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let nolog = if i % 4 < 2 { "" } else { "+nolog" };
            assert_eq!(x.name, format!("{}#{i}{nolog}", TEMPLATES[i % 7]));
            assert_eq!(x.copy_log, nolog.is_empty());
            assert_eq!(x.seed, y.seed);
            assert_eq!(format!("{:?}", x.ops), format!("{:?}", y.ops));
        }
        // Workload i of a catalogue does not depend on how many are generated.
        assert_eq!(format!("{:?}", catalogue(3, 5)[2]), format!("{:?}", a[2]));
        assert!(a[6].ops.len() > 90 * 2, "churn has many steps");
        assert!(
            a[0].ops
                .iter()
                .any(|o| matches!(o, Op::EstablishGroup { fails_at: None, .. })),
            "basic ends with a consistency group"
        );
    }
}
