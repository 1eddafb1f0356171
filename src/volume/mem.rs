//! An in-memory volume for tests, simulations and the model checker.

use parking_lot::RwLock;

use super::{check_range, Volume, VolumeInfo};
use crate::ids::{Generation, VolumeId};
use crate::Result;

/// A volume held in memory. Every write is immediately "durable"; identity, size and
/// generation can be changed to simulate replacement, resize and re-format.
#[derive(Debug)]
pub struct MemVolume {
    name: String,
    state: RwLock<MemState>,
}

#[derive(Debug)]
struct MemState {
    data: Vec<u8>,
    id: VolumeId,
    generation: Generation,
}

impl MemVolume {
    /// A zero-filled volume of `size` bytes named `name` (its locator is `mem:NAME`).
    #[must_use]
    pub fn new(name: &str, size: usize) -> Self {
        let mut id = [0u8; 16];
        let h = crc32fast::hash(name.as_bytes()).to_le_bytes();
        id[..4].copy_from_slice(&h);
        id[4..4 + name.len().min(12)].copy_from_slice(&name.as_bytes()[..name.len().min(12)]);
        MemVolume {
            name: name.to_string(),
            state: RwLock::new(MemState {
                data: vec![0; size],
                id: VolumeId(id),
                generation: Generation(0),
            }),
        }
    }

    /// A volume holding a copy of `data`.
    #[must_use]
    pub fn with_data(name: &str, data: &[u8]) -> Self {
        let v = Self::new(name, data.len());
        v.state.write().data.copy_from_slice(data);
        v
    }

    /// A copy of the whole contents.
    #[must_use]
    pub fn snapshot(&self) -> Vec<u8> {
        self.state.read().data.clone()
    }

    /// Change the size (grow with zeros or shrink), as a resize would.
    pub fn resize(&self, size: usize) {
        self.state.write().data.resize(size, 0);
    }

    /// Change the identity, as a replacement by another device would.
    pub fn set_id(&self, id: VolumeId) {
        self.state.write().id = id;
    }

    /// Change the generation, as a re-format would.
    pub fn set_generation(&self, generation: Generation) {
        self.state.write().generation = generation;
    }
}

impl Volume for MemVolume {
    fn info(&self) -> VolumeInfo {
        let s = self.state.read();
        VolumeInfo {
            id: s.id,
            size: s.data.len() as u64,
            sector_size: 512,
            generation: s.generation,
            locator: format!("mem:{}", self.name),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let s = self.state.read();
        check_range(offset, buf.len() as u64, s.data.len() as u64, "volume")?;
        let o =
            usize::try_from(offset).map_err(|_| crate::Error::invalid("offset", "too large"))?;
        buf.copy_from_slice(&s.data[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut s = self.state.write();
        check_range(offset, buf.len() as u64, s.data.len() as u64, "volume")?;
        let o =
            usize::try_from(offset).map_err(|_| crate::Error::invalid("offset", "too large"))?;
        s.data[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}
