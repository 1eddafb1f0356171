//! The one place the table's memory map is created. This module may hold `unsafe`.

use std::fs::File;

use memmap2::{MmapMut, MmapOptions};

/// A shared, writable mapping of a whole table file.
#[derive(Debug)]
pub struct MappedFile {
    map: MmapMut,
}

impl MappedFile {
    /// Map `len` bytes of `file` shared and writable.
    ///
    /// # Errors
    /// The operating system's error.
    pub fn map(file: &File, len: u64) -> std::io::Result<Self> {
        let len = usize::try_from(len)
            .map_err(|_| std::io::Error::other("table larger than address space"))?;
        // SAFETY: the file is locked with an exclusive flock for as long as the owning
        // `MmapStorage` lives (it keeps the `File` alive beside the map), so no cooperating
        // process truncates or writes it while mapped. The file was fully allocated with
        // fallocate at creation and its length is never changed afterwards, so every page of
        // the mapping is backed and stores cannot raise SIGBUS for lack of space. The map is
        // only accessed through `&[u8]`/`&mut [u8]` borrows guarded by a mutex.
        let map = unsafe { MmapOptions::new().len(len).map_mut(file)? };
        Ok(MappedFile { map })
    }

    /// The mapped bytes.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The mapped bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// `msync(MS_SYNC)` over the whole mapping: the durability point.
    ///
    /// # Errors
    /// The operating system's error.
    pub fn sync(&self) -> std::io::Result<()> {
        self.map.flush()
    }
}
