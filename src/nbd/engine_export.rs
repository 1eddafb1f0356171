//! Exports backed by the engine: one per source volume of the table's sessions (writes go
//! through copy-before-write) and one per session image (`s1`, `s2`, ...; read-only unless the
//! server allows image writes, which then have target-write semantics).
//!
//! Names: a volume export is named by the file name of its locator (`src0.img`); when two
//! attached volumes share a file name, the full locator is used instead. Session images are
//! named by session id (`s1`). The registry is live: sessions established while the server runs
//! appear at once.

use std::sync::Arc;

use super::export::{ExportRegistry, NbdExport, ZERO_CHUNK_BYTES};
use crate::engine::Engine;
use crate::ids::{SessionId, VolumeId};
use crate::model::SessionState;
use crate::Result;

/// The engine's volumes and session images as NBD exports.
#[derive(Debug)]
pub struct EngineRegistry {
    engine: Arc<Engine>,
    writable_images: bool,
}

impl EngineRegistry {
    /// Serve `engine`; session images accept writes only when `writable_images`.
    #[must_use]
    pub fn new(engine: Arc<Engine>, writable_images: bool) -> Self {
        EngineRegistry {
            engine,
            writable_images,
        }
    }

    /// (name, volume id) for every volume that is the source of a session in the table.
    fn volumes(&self) -> Vec<(String, VolumeId)> {
        let sources: Vec<VolumeId> = self
            .engine
            .table()
            .sessions()
            .iter()
            .map(|s| s.desc.source.id)
            .collect();
        let infos: Vec<_> = self
            .engine
            .attached()
            .into_iter()
            .filter(|i| sources.contains(&i.id))
            .collect();
        let base = |l: &str| l.rsplit('/').next().unwrap_or(l).to_string();
        infos
            .iter()
            .map(|i| {
                let b = base(&i.locator);
                let unique = infos.iter().filter(|j| base(&j.locator) == b).count() == 1;
                (if unique { b } else { i.locator.clone() }, i.id)
            })
            .collect()
    }
}

impl ExportRegistry for EngineRegistry {
    fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self.volumes().into_iter().map(|(n, _)| n).collect();
        for s in self.engine.table().sessions() {
            if matches!(
                s.status().state,
                SessionState::Active | SessionState::Completed
            ) {
                v.push(s.id().to_string());
            }
        }
        v
    }

    fn get(&self, name: &str) -> Option<Arc<dyn NbdExport>> {
        if let Some((_, id)) = self.volumes().into_iter().find(|(n, _)| n == name) {
            let size = self.engine.volume(id).ok()?.size();
            return Some(Arc::new(SourceExport {
                engine: self.engine.clone(),
                vol: id,
                size,
            }));
        }
        let id: SessionId = name.parse().ok()?;
        let s = self.engine.session(id).ok()?;
        if !matches!(
            s.status().state,
            SessionState::Active | SessionState::Completed
        ) {
            return None;
        }
        Some(Arc::new(ImageExport {
            engine: self.engine.clone(),
            session: id,
            size: s.map.image_len(),
            writable: self.writable_images && s.is_active(),
        }))
    }

    fn default_name(&self) -> Option<String> {
        None
    }
}

/// Write zeroes through `write` in bounded chunks.
fn zero_through(
    offset: u64,
    len: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK_BYTES.min(usize::try_from(len).unwrap_or(ZERO_CHUNK_BYTES))];
    let mut off = offset;
    while off < offset + len {
        let n = (zeros.len() as u64).min(offset + len - off);
        write(off, &zeros[..usize::try_from(n).unwrap_or(0)])?;
        off += n;
    }
    Ok(())
}

/// A source (or any attached) volume, written through copy-before-write.
#[derive(Debug)]
struct SourceExport {
    engine: Arc<Engine>,
    vol: VolumeId,
    size: u64,
}

impl NbdExport for SourceExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn description(&self) -> String {
        format!("timezero source volume {}", self.vol)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.engine.read(self.vol, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.engine.write(self.vol, offset, data)?;
        if fua {
            self.engine.flush(self.vol)?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.engine.flush(self.vol)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        // A trim changes what the source reads, so it is a (zero) write: old grains copy first.
        self.write_zeroes(offset, len, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        zero_through(offset, len, |o, z| self.engine.write(self.vol, o, z))?;
        if fua {
            self.engine.flush(self.vol)?;
        }
        Ok(())
    }
}

/// A session's T0 image.
#[derive(Debug)]
struct ImageExport {
    engine: Arc<Engine>,
    session: SessionId,
    size: u64,
    writable: bool,
}

impl ImageExport {
    fn flush_target(&self) -> Result<()> {
        let s = self.engine.session(self.session)?;
        self.engine.flush(s.desc.target.id)
    }
}

impl NbdExport for ImageExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        !self.writable
    }
    fn description(&self) -> String {
        format!("timezero T0 image of session {}", self.session)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.engine.read_image(self.session, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.engine.write_image(self.session, offset, data)?;
        if fua {
            self.flush_target()?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        if self.writable {
            self.flush_target()
        } else {
            Ok(())
        }
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        zero_through(offset, len, |o, z| {
            self.engine.write_image(self.session, o, z)
        })?;
        if fua {
            self.flush_target()?;
        }
        Ok(())
    }
}
