//! Explicit little-endian encoding with bounds checks: every read of on-disk bytes goes through
//! [`Reader`], which never panics and never allocates more than the bytes it was given.

use crate::error::Corruption;

/// Appends little-endian fields to a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// Append a byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Append a u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Append a u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Append a u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Append raw bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// Append a string with a u16 length prefix (callers bound the length first).
    pub fn str16(&mut self, s: &str) {
        let b = s.as_bytes();
        let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
        self.u16(n);
        self.buf.extend_from_slice(&b[..usize::from(n)]);
    }
}

/// Reads little-endian fields from a byte slice; every call checks the remaining length.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`, naming `what` in errors.
    #[must_use]
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }
    /// Bytes left.
    #[must_use]
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Take `n` raw bytes.
    ///
    /// # Errors
    /// [`Corruption::Truncated`] when fewer remain.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Corruption> {
        if self.remaining() < n {
            return Err(Corruption::Truncated { what: self.what });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    /// Read a byte.
    ///
    /// # Errors
    /// [`Corruption::Truncated`].
    pub fn u8(&mut self) -> Result<u8, Corruption> {
        Ok(self.take(1)?[0])
    }
    /// Read a u16.
    ///
    /// # Errors
    /// [`Corruption::Truncated`].
    pub fn u16(&mut self) -> Result<u16, Corruption> {
        let mut a = [0u8; 2];
        a.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(a))
    }
    /// Read a u32.
    ///
    /// # Errors
    /// [`Corruption::Truncated`].
    pub fn u32(&mut self) -> Result<u32, Corruption> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    /// Read a u64.
    ///
    /// # Errors
    /// [`Corruption::Truncated`].
    pub fn u64(&mut self) -> Result<u64, Corruption> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    /// Read 16 bytes.
    ///
    /// # Errors
    /// [`Corruption::Truncated`].
    pub fn b16(&mut self) -> Result<[u8; 16], Corruption> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(a)
    }
    /// Read a u16-prefixed UTF-8 string of at most `max` bytes.
    ///
    /// # Errors
    /// [`Corruption::Field`] when too long or not UTF-8; [`Corruption::Truncated`].
    pub fn str16(&mut self, max: usize, field: &'static str) -> Result<String, Corruption> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(Corruption::Field {
                what: self.what,
                field,
                value: n as u64,
            });
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| Corruption::Field {
            what: self.what,
            field,
            value: n as u64,
        })
    }
    /// Fail with a field error.
    #[must_use]
    pub fn bad(&self, field: &'static str, value: u64) -> Corruption {
        Corruption::Field {
            what: self.what,
            field,
            value,
        }
    }
}

/// Little-endian u32 at `off` of a fixed-size block known to be long enough.
#[must_use]
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// Little-endian u64 at `off` of a fixed-size block known to be long enough.
#[must_use]
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Little-endian u16 at `off` of a fixed-size block known to be long enough.
#[must_use]
pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Store a u16 at `off`.
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
/// Store a u32 at `off`.
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
/// Store a u64 at `off`.
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
