//! Identities and units as types, so an index is never passed where a count is meant.

use std::fmt;

/// Identifier of a session inside one activity table (never reused within that table).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

impl std::str::FromStr for SessionId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix('s').unwrap_or(s);
        digits.parse().map(SessionId)
    }
}

/// Identity of a volume: 16 bytes that stay the same while the volume is the same volume.
///
/// For files this is derived from the device and inode numbers; in-memory volumes pick one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(pub [u8; 16]);

impl VolumeId {
    /// Build an id from two 64-bit halves (device and inode for files).
    #[must_use]
    pub fn from_parts(hi: u64, lo: u64) -> Self {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&hi.to_le_bytes());
        b[8..].copy_from_slice(&lo.to_le_bytes());
        VolumeId(b)
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Generation of a volume: bumped by a backend when the same identity holds new contents
/// (for example after a re-format or a replacement that kept the serial number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// Index of a grain in a session's grain space (the session's extents laid end to end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct GrainIndex(pub u64);

impl GrainIndex {
    /// The first grain.
    pub const ZERO: GrainIndex = GrainIndex(0);

    /// The index as a number.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The grain `n` grains after this one.
    #[must_use]
    pub const fn plus(self, n: GrainCount) -> GrainIndex {
        GrainIndex(self.0.saturating_add(n.0))
    }

    /// How many grains lie from this one up to (not including) `end`; zero when `end` is not
    /// after it.
    #[must_use]
    pub const fn until(self, end: GrainIndex) -> GrainCount {
        GrainCount(end.0.saturating_sub(self.0))
    }
}

impl fmt::Display for GrainIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "grain#{}", self.0)
    }
}

/// A number of grains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct GrainCount(pub u64);

impl GrainCount {
    /// No grains.
    pub const ZERO: GrainCount = GrainCount(0);

    /// The count as a number.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The bytes of this many grains of `grain` bytes each (saturating).
    #[must_use]
    pub const fn bytes(self, grain: GrainSize) -> u64 {
        self.0.saturating_mul(grain.0 as u64)
    }
}

impl std::ops::Add for GrainCount {
    type Output = GrainCount;
    fn add(self, o: GrainCount) -> GrainCount {
        GrainCount(self.0.saturating_add(o.0))
    }
}

impl std::ops::AddAssign for GrainCount {
    fn add_assign(&mut self, o: GrainCount) {
        *self = *self + o;
    }
}

impl std::iter::Sum for GrainCount {
    fn sum<I: Iterator<Item = GrainCount>>(iter: I) -> GrainCount {
        iter.fold(GrainCount::ZERO, |a, b| a + b)
    }
}

impl fmt::Display for GrainCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} grains", self.0)
    }
}

/// Sequence number of a journal block; monotonic for the life of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// The sequence number as a number.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq{}", self.0)
    }
}

/// The grain size of a session: a power of two between [`crate::limits::GRAIN_MIN_BYTES`]
/// and [`crate::limits::GRAIN_MAX_BYTES`], valid by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrainSize(u32);

impl GrainSize {
    /// The default grain, 64 KiB.
    pub const DEFAULT: GrainSize = GrainSize(crate::limits::GRAIN_DEFAULT_BYTES);

    /// Validate a grain size in bytes.
    ///
    /// # Errors
    /// [`crate::Error::Invalid`] unless `bytes` is a power of two within the limits.
    pub fn new(bytes: u64) -> crate::Result<Self> {
        use crate::limits::{GRAIN_MAX_BYTES, GRAIN_MIN_BYTES};
        if !bytes.is_power_of_two()
            || bytes < u64::from(GRAIN_MIN_BYTES)
            || bytes > u64::from(GRAIN_MAX_BYTES)
        {
            return Err(crate::Error::invalid(
                "grain size",
                format!(
                    "{bytes} is not a power of two from {GRAIN_MIN_BYTES} to {GRAIN_MAX_BYTES}"
                ),
            ));
        }
        Ok(GrainSize(u32::try_from(bytes).map_err(|_| {
            crate::Error::invalid("grain size", "too large")
        })?))
    }

    /// Rebuild from a log2 value read from disk.
    ///
    /// # Errors
    /// [`crate::Error::Invalid`] when the shift is outside the limits.
    pub fn from_shift(shift: u8) -> crate::Result<Self> {
        if shift >= 32 {
            return Err(crate::Error::invalid("grain shift", format!("{shift}")));
        }
        Self::new(1u64 << shift)
    }

    /// Size in bytes.
    #[must_use]
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// log2 of the size.
    #[must_use]
    pub fn shift(self) -> u8 {
        // A u32 power of two has at most 31 trailing zeros, so this never truncates.
        u8::try_from(self.0.trailing_zeros()).unwrap_or(31)
    }
}

impl fmt::Display for GrainSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", crate::units::format_size(self.bytes()))
    }
}
