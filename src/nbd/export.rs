//! What the server serves: the [`NbdExport`] and [`ExportRegistry`] traits, a fixed
//! [`StaticRegistry`], and a [`VolumeExport`] adapter over any [`Volume`].

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::volume::Volume;
use crate::Result;

/// Largest zero buffer [`VolumeExport`] allocates to zero or trim a range.
pub const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// One exported block device.
///
/// Implementations are called from several threads at once (several requests of one
/// connection, and several connections). Errors are reported to the client as NBD error
/// values (see [`super::proto::errno_for`]); ranges have already been checked against
/// [`NbdExport::size`] and [`NbdExport::min_block`] when a method is called.
pub trait NbdExport: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Whether writes, trims and zeroing are refused (`EPERM`).
    fn read_only(&self) -> bool;

    /// Human-readable description sent with `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> String;

    /// Read exactly `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// Any [`crate::Error`]; the client sees the mapped error value.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Write all of `data` at `offset`; with `fua`, make it durable before returning.
    ///
    /// # Errors
    /// Any [`crate::Error`].
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;

    /// Make every write that has completed (on any connection) durable.
    ///
    /// # Errors
    /// Any [`crate::Error`].
    fn flush(&self) -> Result<()>;

    /// Hint that `len` bytes at `offset` are no longer needed; contents afterwards are
    /// unspecified until rewritten.
    ///
    /// # Errors
    /// Any [`crate::Error`].
    fn trim(&self, offset: u64, len: u64) -> Result<()>;

    /// Make `len` bytes at `offset` read as zeroes; with `fua`, durably.
    ///
    /// # Errors
    /// Any [`crate::Error`].
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()>;

    /// Required alignment of offsets and lengths (a power of two up to 64 KiB).
    fn min_block(&self) -> u32 {
        1
    }

    /// Preferred I/O size (a power of two).
    fn preferred_block(&self) -> u32 {
        4096
    }

    /// Whether [`NbdExport::flush`] and FUA cover writes made through every connection, so the
    /// server may advertise `NBD_FLAG_CAN_MULTI_CONN`.
    fn multi_conn(&self) -> bool {
        true
    }
}

/// The set of exports a server offers.
pub trait ExportRegistry: Send + Sync {
    /// Names of all exports, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<String>;

    /// The export named `name`, if any.
    fn get(&self, name: &str) -> Option<Arc<dyn NbdExport>>;

    /// Name of the export a client gets when it asks for the empty name.
    fn default_name(&self) -> Option<String>;
}

/// A fixed map from names to exports.
#[derive(Default, Clone)]
pub struct StaticRegistry {
    exports: BTreeMap<String, Arc<dyn NbdExport>>,
    default: Option<String>,
}

impl StaticRegistry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) an export. The first export added becomes the default export unless
    /// [`StaticRegistry::set_default`] chose another.
    pub fn insert(&mut self, name: impl Into<String>, export: Arc<dyn NbdExport>) -> &mut Self {
        let name = name.into();
        if self.default.is_none() {
            self.default = Some(name.clone());
        }
        self.exports.insert(name, export);
        self
    }

    /// Builder form of [`StaticRegistry::insert`].
    #[must_use]
    pub fn with(mut self, name: impl Into<String>, export: Arc<dyn NbdExport>) -> Self {
        self.insert(name, export);
        self
    }

    /// Choose the default export (`None`: the empty name selects nothing).
    pub fn set_default(&mut self, name: Option<String>) -> &mut Self {
        self.default = name;
        self
    }
}

impl std::fmt::Debug for StaticRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticRegistry")
            .field("exports", &self.exports.keys().collect::<Vec<_>>())
            .field("default", &self.default)
            .finish()
    }
}

impl ExportRegistry for StaticRegistry {
    fn list(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }

    fn get(&self, name: &str) -> Option<Arc<dyn NbdExport>> {
        self.exports.get(name).cloned()
    }

    fn default_name(&self) -> Option<String> {
        self.default
            .clone()
            .filter(|d| self.exports.contains_key(d))
    }
}

/// Serves a [`Volume`] as an NBD export.
///
/// Trim and write-zeroes both write zeroes (in chunks of at most [`ZERO_CHUNK_BYTES`]), so a
/// trimmed range reads back as zeroes; FUA is a write followed by [`Volume::flush`].
#[derive(Debug, Clone)]
pub struct VolumeExport {
    volume: Arc<dyn Volume>,
    read_only: bool,
    description: Option<String>,
}

impl VolumeExport {
    /// A writable export of `volume`, described by its locator.
    #[must_use]
    pub fn new(volume: Arc<dyn Volume>) -> Self {
        VolumeExport {
            volume,
            read_only: false,
            description: None,
        }
    }

    /// Make the export read-only (or writable again).
    #[must_use]
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Replace the description.
    #[must_use]
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// The underlying volume.
    #[must_use]
    pub fn volume(&self) -> &Arc<dyn Volume> {
        &self.volume
    }

    fn check_writable(&self, op: &'static str, offset: u64) -> Result<()> {
        if self.read_only {
            let e = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
            return Err(crate::Error::io(op, self.volume.info().locator, offset, e));
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("write zeroes", offset)?;
        if len == 0 {
            return Ok(());
        }
        crate::volume::check_range(offset, len, self.volume.size(), "nbd export")?;
        let chunk = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(ZERO_CHUNK_BYTES);
        let zeroes = vec![0u8; chunk];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).unwrap_or(usize::MAX).min(chunk);
            self.volume.write_at(offset + done, &zeroes[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

impl NbdExport for VolumeExport {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn description(&self) -> String {
        self.description
            .clone()
            .unwrap_or_else(|| self.volume.info().locator)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.volume.read_at(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable("write", offset)?;
        self.volume.write_at(offset, data)?;
        if fua {
            self.volume.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.volume.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.zero_range(offset, len)?;
        if fua {
            self.volume.flush()?;
        }
        Ok(())
    }

    fn min_block(&self) -> u32 {
        1
    }
}
