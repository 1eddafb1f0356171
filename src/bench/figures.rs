//! The measured figures: what each one pairs (engine against its raw counterpart), where it sits
//! in the list, how many operations each round runs, and the results gathered over rounds.

use super::stats::{per_round_ratios, Ratio};
use super::{GRAIN, IO};

/// What a figure measures, which fixes its unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Writes: operations per second.
    Write,
    /// Reads: operations per second.
    Read,
    /// A whole copy: bytes per second.
    Copy,
    /// A duration in ms.
    Time,
}

/// One side (engine or raw) of a figure, over the rounds.
#[derive(Debug, Clone, Default)]
pub(super) struct Side {
    /// Per round: operations per second (I/O figures), bytes per second (copy) or ms (time).
    pub(super) per_round: Vec<f64>,
    /// Every operation's latency, all rounds.
    pub(super) lat_ns: Vec<u64>,
}

impl Side {
    /// Add one round's rate and latencies.
    pub(super) fn record(&mut self, (rate, lat): (f64, Vec<u64>)) {
        self.per_round.push(rate);
        self.lat_ns.extend(lat);
    }
}

/// One figure: an engine measurement and its raw counterpart, over the rounds.
#[derive(Debug, Clone)]
pub(super) struct Figure {
    /// The name printed and used as the JSON job name.
    pub(super) name: String,
    /// Writer count (write figures measured per writer count), 0 otherwise.
    pub(super) writers: usize,
    /// What is measured.
    pub(super) kind: Kind,
    /// Bytes per operation (I/O figures).
    pub(super) op_bytes: u64,
    /// How the per-round ratio is formed.
    pub(super) ratio: Ratio,
    /// What the raw side does.
    pub(super) raw_label: &'static str,
    /// The engine's side.
    pub(super) engine: Side,
    /// The raw side.
    pub(super) raw: Side,
}

impl Figure {
    fn new(
        name: impl Into<String>,
        kind: Kind,
        op_bytes: u64,
        ratio: Ratio,
        raw_label: &'static str,
    ) -> Self {
        Figure {
            name: name.into(),
            writers: 0,
            kind,
            op_bytes,
            ratio,
            raw_label,
            engine: Side::default(),
            raw: Side::default(),
        }
    }

    /// The engine/raw ratio of each round.
    pub(super) fn ratios(&self) -> Vec<f64> {
        per_round_ratios(self.ratio, &self.engine.per_round, &self.raw.per_round)
    }
}

/// Where each figure sits in the list built by [`figures`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    /// Number of writer counts.
    pub(super) n: usize,
}

impl Layout {
    /// Already-copied writes at the `k`-th writer count.
    pub(super) fn copied(self, k: usize) -> usize {
        k
    }
    /// First writes at the `k`-th writer count.
    pub(super) fn first(self, k: usize) -> usize {
        self.n + k
    }
    /// First writes against the physical floor.
    pub(super) fn floor(self) -> usize {
        2 * self.n
    }
    /// First writes against the floor of a rule-2 copy-before-write.
    pub(super) fn floor_rule2(self) -> usize {
        2 * self.n + 1
    }
    /// First writes against the floor of the copy log's on-disk writes.
    pub(super) fn floor_log(self) -> usize {
        2 * self.n + 2
    }
    /// Image reads of uncopied grains.
    pub(super) fn read_uncopied(self) -> usize {
        2 * self.n + 3
    }
    /// Image reads of copied grains.
    pub(super) fn read_copied(self) -> usize {
        2 * self.n + 4
    }
    /// The background copy.
    pub(super) fn copy(self) -> usize {
        2 * self.n + 5
    }
    /// Recovery of the table.
    pub(super) fn recovery(self) -> usize {
        2 * self.n + 6
    }
}

fn plural(w: usize) -> &'static str {
    if w == 1 {
        "writer"
    } else {
        "writers"
    }
}

/// Every figure of a run with these writer counts, in [`Layout`] order, with no results yet.
pub(super) fn figures(writers: &[usize]) -> Vec<Figure> {
    let mut v = Vec::new();
    for (what, raw) in [
        ("already-copied 4KiB write", "pwrite"),
        ("first write 4KiB + flush", "pwrite+fdatasync"),
    ] {
        for &w in writers {
            let mut f = Figure::new(
                format!("{what}, {w} {}", plural(w)),
                Kind::Write,
                IO as u64,
                Ratio::Cost,
                raw,
            );
            f.writers = w;
            v.push(f);
        }
    }
    v.extend([
        Figure::new(
            "first write 4KiB + flush, 1 writer, vs floor",
            Kind::Write,
            IO as u64,
            Ratio::Cost,
            "floor: rd64K+wr64K+sync+wr4K+sync",
        ),
        Figure::new(
            "first write 4KiB + flush, 1 writer, vs rule-2 floor",
            Kind::Write,
            IO as u64,
            Ratio::Cost,
            "floor: rd64K+wr64K+sync+wr512+sync+wr4K+sync",
        ),
        Figure::new(
            "first write 4KiB + flush, 1 writer, vs copy-log floor",
            Kind::Write,
            IO as u64,
            Ratio::Cost,
            "floor: rd64K+(wr64K+2x wr512)+sync+wr4K+sync",
        ),
        Figure::new(
            "image read 4KiB, uncopied grains",
            Kind::Read,
            IO as u64,
            Ratio::Cost,
            "pread of the source",
        ),
        Figure::new(
            "image read 4KiB, copied grains",
            Kind::Read,
            IO as u64,
            Ratio::Cost,
            "pread of the target",
        ),
        Figure::new(
            "background copy (Copier, 2 threads)",
            Kind::Copy,
            0,
            Ratio::Speed,
            "1MiB O_DIRECT read+write copy",
        ),
        Figure::new(
            "recovery (Engine::open_path)",
            Kind::Time,
            0,
            Ratio::None,
            "-",
        ),
    ]);
    v
}

/// Operation counts for a volume of `size` bytes.
pub(super) struct Counts {
    /// Operations per round of the figures whose operations take microseconds.
    pub(super) fast_ops: usize,
    /// First writes at one writer (also the floor); grains `0..first_1`.
    pub(super) first_1: usize,
    /// First writes per figure at more than one writer; each figure gets its own grains after
    /// `first_1`.
    pub(super) first_many: usize,
}

/// Operation counts for volumes of `size` bytes and these writer counts.
pub(super) fn counts(size: u64, writers: &[usize]) -> Counts {
    let grains = usize::try_from(size / GRAIN).unwrap_or(usize::MAX);
    let first_1 = (grains / 8).min(512);
    let many = writers.iter().filter(|w| **w != 1).count().max(1);
    Counts {
        fast_ops: 50_000,
        first_1,
        first_many: ((grains - first_1) / many).min(2048),
    }
}
