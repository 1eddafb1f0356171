//! The one place the table's memory map is created. This module may hold `unsafe`.

use std::fs::File;

use memmap2::{Mmap, MmapOptions};

/// A shared, read-only mapping of a whole table file. Writes go through the file descriptor
/// (see `MmapStorage::write`); the mapping shows them because both use the same page cache.
#[derive(Debug)]
pub struct MappedFile {
    map: Mmap,
}

impl MappedFile {
    /// Map `len` bytes of `file` shared, read-only.
    ///
    /// # Errors
    /// The operating system's error.
    pub fn map(file: &File, len: u64) -> std::io::Result<Self> {
        let len = usize::try_from(len)
            .map_err(|_| std::io::Error::other("table larger than address space"))?;
        // SAFETY: the file is locked with an exclusive flock for as long as the owning
        // `MmapStorage` lives (it keeps the `File` alive beside the map; a table opened
        // read-only, without the lock, is never mapped but read with pread), so no cooperating
        // process truncates or writes it while mapped. The file was fully allocated with
        // fallocate at creation and its length is never changed afterwards, so every page of
        // the mapping lies within the file and is backed (no SIGBUS past its end). The map is
        // only read through `&[u8]` borrows guarded by a mutex; it is never written through.
        let map = unsafe { MmapOptions::new().len(len).map(file)? };
        Ok(MappedFile { map })
    }

    /// The mapped bytes.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}
