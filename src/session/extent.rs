//! Extent and grain arithmetic for one session.

use crate::model::SessionDesc;

/// A piece of one extent: image and volume coordinates of a contiguous byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Extent index.
    pub extent: usize,
    /// Offset in the image (extents laid end to end).
    pub image_offset: u64,
    /// Offset in the source volume.
    pub source_offset: u64,
    /// Offset in the target volume.
    pub target_offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Precomputed extent positions in image space.
#[derive(Debug, Clone)]
pub struct ExtentMap {
    /// (image_offset, source_offset, target_offset, len) per extent.
    ext: Vec<(u64, u64, u64, u64)>,
    shift: u8,
    image_len: u64,
}

impl ExtentMap {
    /// Build from a descriptor.
    #[must_use]
    pub fn new(d: &SessionDesc) -> Self {
        let mut img = 0u64;
        let mut ext = Vec::with_capacity(d.extents.len());
        for e in &d.extents {
            ext.push((img, e.source_offset, e.target_offset, e.len));
            img = img.saturating_add(e.len);
        }
        ExtentMap {
            ext,
            shift: d.grain.shift(),
            image_len: img,
        }
    }

    /// Length of the image in bytes.
    #[must_use]
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    /// Grain size in bytes.
    #[must_use]
    pub fn grain_bytes(&self) -> u64 {
        1u64 << self.shift
    }

    /// log2 of the grain size.
    #[must_use]
    pub fn shift(&self) -> u8 {
        self.shift
    }

    /// Pieces of the image range `off..off+len` (caller checked the range), in image order;
    /// allocates nothing.
    pub fn image_pieces(&self, off: u64, len: u64) -> impl Iterator<Item = Piece> + '_ {
        let end = off + len;
        self.ext
            .iter()
            .enumerate()
            .filter_map(move |(i, &(io, so, to, l))| {
                let s = off.max(io);
                let e = end.min(io + l);
                (s < e).then(|| Piece {
                    extent: i,
                    image_offset: s,
                    source_offset: so + (s - io),
                    target_offset: to + (s - io),
                    len: e - s,
                })
            })
    }

    /// The single piece of the image range `off..off+len` (caller checked the range) when the
    /// range lies within one grain of one extent, as for most small reads; `None` otherwise.
    #[inline]
    #[must_use]
    pub fn within_one_grain(&self, off: u64, len: u64) -> Option<Piece> {
        let last = off.checked_add(len)?.checked_sub(1)?;
        if off >> self.shift != last >> self.shift {
            return None;
        }
        self.ext
            .iter()
            .position(|&(io, _, _, l)| off >= io && last < io + l)
            .map(|i| {
                let (io, so, to, _) = self.ext[i];
                Piece {
                    extent: i,
                    image_offset: off,
                    source_offset: so + (off - io),
                    target_offset: to + (off - io),
                    len,
                }
            })
    }

    /// Pieces of the source-volume range `off..off+len` covered by the session.
    pub fn source_pieces(&self, off: u64, len: u64) -> impl Iterator<Item = Piece> + '_ {
        let end = off.saturating_add(len);
        self.ext
            .iter()
            .enumerate()
            .filter_map(move |(i, &(io, so, to, l))| {
                let s = off.max(so);
                let e = end.min(so + l);
                (s < e).then(|| Piece {
                    extent: i,
                    image_offset: io + (s - so),
                    source_offset: s,
                    target_offset: to + (s - so),
                    len: e - s,
                })
            })
    }

    /// Pieces of the target-volume range `off..off+len` covered by the session.
    pub fn target_pieces(&self, off: u64, len: u64) -> impl Iterator<Item = Piece> + '_ {
        let end = off.saturating_add(len);
        self.ext
            .iter()
            .enumerate()
            .filter_map(move |(i, &(io, so, to, l))| {
                let s = off.max(to);
                let e = end.min(to + l);
                (s < e).then(|| Piece {
                    extent: i,
                    image_offset: io + (s - to),
                    source_offset: so + (s - to),
                    target_offset: s,
                    len: e - s,
                })
            })
    }

    /// Grain range (first, end) covering the image bytes of a piece.
    #[must_use]
    pub fn grains_of(&self, p: &Piece) -> (u64, u64) {
        let g0 = p.image_offset >> self.shift;
        let g1 = (p.image_offset + p.len).div_ceil(1u64 << self.shift);
        (g0, g1)
    }

    /// The piece for image grains `g0..g1` (which must lie within one extent).
    #[must_use]
    pub fn grain_piece(&self, g0: u64, g1: u64) -> Option<Piece> {
        let off = g0 << self.shift;
        let len = (g1 - g0) << self.shift;
        let mut it = self.image_pieces(off, len);
        match (it.next(), it.next()) {
            (Some(p), None) if p.len == len => Some(p),
            _ => None,
        }
    }

    /// Extent index holding image grain `g`, with the end grain of that extent.
    #[must_use]
    pub fn extent_of_grain(&self, g: u64) -> Option<(usize, u64)> {
        let off = g << self.shift;
        self.ext
            .iter()
            .position(|&(io, _, _, l)| off >= io && off < io + l)
            .map(|i| (i, (self.ext[i].0 + self.ext[i].3) >> self.shift))
    }
}
