//! An in-memory volume for tests, simulations and the model checker.

use parking_lot::RwLock;

use super::{check_range, Volume, VolumeInfo};
use crate::ids::{Generation, VolumeId};
use crate::Result;

/// A volume held in memory. Every write is immediately "durable"; identity, size and
/// generation can be changed to simulate replacement, resize and re-format.
///
/// # Example
///
/// ```
/// use timezero::Generation;
/// use timezero::prelude::*;
///
/// # fn main() -> timezero::Result<()> {
/// let vol = MemVolume::with_data("disk", &[1u8; 8192]);
/// let info = vol.info();
/// assert_eq!((info.size, info.sector_size), (8192, 512));
/// assert_eq!(info.locator, "mem:disk");
/// assert_eq!(info.id, MemVolume::new("disk", 4096).info().id); // the id comes from the name
///
/// vol.write_at(512, &[2u8; 512])?;
/// let mut buf = [0u8; 1024];
/// vol.read_at(0, &mut buf)?;
/// assert_eq!((&buf[..512], &buf[512..]), (&[1u8; 512][..], &[2u8; 512][..]));
/// assert!(vol.read_at(8192 - 512, &mut buf).is_err()); // past the end
///
/// vol.set_generation(Generation(1)); // as a re-format would
/// assert_eq!(vol.info().generation, Generation(1));
/// assert_eq!(vol.snapshot().len(), 8192);
/// # Ok(())
/// # }
/// ```
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
        Self::from_vec(name, vec![0; size])
    }

    /// A volume that takes `data` as its contents (no copy).
    #[must_use]
    pub fn from_vec(name: &str, data: Vec<u8>) -> Self {
        let mut id = [0u8; 16];
        let h = crc32fast::hash(name.as_bytes()).to_le_bytes();
        id[..4].copy_from_slice(&h);
        id[4..4 + name.len().min(12)].copy_from_slice(&name.as_bytes()[..name.len().min(12)]);
        MemVolume {
            name: name.to_string(),
            state: RwLock::new(MemState {
                data,
                id: VolumeId(id),
                generation: Generation(0),
            }),
        }
    }

    /// A volume holding a copy of `data`.
    #[must_use]
    pub fn with_data(name: &str, data: &[u8]) -> Self {
        Self::from_vec(name, data.to_vec())
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

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let s = self.state.read();
        check_range(offset, buf.len() as u64, s.data.len() as u64, "volume")?;
        let o =
            usize::try_from(offset).map_err(|_| crate::Error::invalid("offset", "too large"))?;
        buf.copy_from_slice(&s.data[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
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
