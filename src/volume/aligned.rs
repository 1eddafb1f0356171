//! Aligned bounce buffers for `O_DIRECT` transfers, shared by the file and io_uring backends.

/// Alignment used for `O_DIRECT` transfers (offset, length and buffer address).
pub(crate) const DIRECT_ALIGN_BYTES: usize = 4096;

/// A heap buffer whose usable part starts at a `DIRECT_ALIGN_BYTES` boundary (found with
/// `align_offset` inside an over-allocated `Vec`, so no unsafe allocation is needed).
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed, aligned buffer of `len` bytes.
    pub(crate) fn new(len: usize) -> Self {
        let raw = vec![0u8; len + DIRECT_ALIGN_BYTES];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN_BYTES);
        AlignedBuf { raw, start, len }
    }
    /// Make the buffer `len` bytes long, reusing its allocation when it is large enough (the
    /// contents are unspecified afterwards).
    pub(crate) fn resize(&mut self, len: usize) {
        if self.raw.len() - self.start >= len {
            self.len = len;
        } else {
            *self = AlignedBuf::new(len);
        }
    }
    /// The aligned bytes.
    pub(crate) fn get(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
    /// The aligned bytes, writable.
    pub(crate) fn get_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Round down to the alignment.
pub(crate) fn align_down(x: u64) -> u64 {
    x - x % DIRECT_ALIGN_BYTES as u64
}

/// Round up to the alignment.
pub(crate) fn align_up(x: u64) -> u64 {
    align_down(x + DIRECT_ALIGN_BYTES as u64 - 1)
}
