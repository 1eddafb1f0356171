//! Looking at files before they are used: identities, data a volume visibly holds, and
//! creating a file so that it appears only when complete.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::Volume;
use crate::ids::VolumeId;
use crate::{Error, Result};

/// Bytes looked at for data at the start and at the end of each range by [`visible_data`].
pub const PROBE_BYTES: u64 = 1 << 20;

/// The identity (device and inode) of the file `path` names, following symbolic links: the
/// identity a [`super::FileVolume`] opened on it would have.
///
/// # Errors
/// [`Error::Io`] when the file cannot be inspected.
pub fn file_identity(path: &Path) -> Result<VolumeId> {
    let m =
        std::fs::metadata(path).map_err(|e| Error::io("stat", path.display().to_string(), 0, e))?;
    Ok(VolumeId::from_parts(m.dev(), m.ino()))
}

/// A file-system or partition-table signature at the start of a volume, by name.
fn signature(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(1080, &[0x53, 0xef]) {
        Some("an ext2/3/4 file system")
    } else if at(0, b"XFSB") {
        Some("an xfs file system")
    } else if at(0x1_0040, b"_BHRfS_M") {
        Some("a btrfs file system")
    } else if at(512, b"EFI PART") {
        Some("a GPT partition table")
    } else if at(510, &[0x55, 0xaa]) {
        Some("an MBR partition table")
    } else if at(0, b"TZTBLSB\0") {
        Some("a timezero activity table")
    } else {
        None
    }
}

/// What a volume visibly holds in the ranges `(offset, len)` a session would overwrite: a
/// file-system or partition-table signature at offset 0 (when a range starts there), or
/// non-zero bytes in the first or last [`PROBE_BYTES`] of a range. `None` when all of that
/// reads as zeros. A policy helper: the engine itself overwrites whatever it is told to.
///
/// # Errors
/// Read errors of the volume.
pub fn visible_data(vol: &dyn Volume, ranges: &[(u64, u64)]) -> Result<Option<String>> {
    let size = vol.size();
    let mut buf = vec![0u8; usize::try_from(PROBE_BYTES).unwrap_or(1 << 20)];
    for &(offset, len) in ranges {
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            continue;
        }
        let head = (end - offset).min(PROBE_BYTES);
        let tail_start = end.saturating_sub(PROBE_BYTES).max(offset);
        for (at, n) in [(offset, head), (tail_start, end - tail_start)] {
            let b = &mut buf[..usize::try_from(n).unwrap_or(0)];
            vol.read_at(at, b)?;
            if at == 0 {
                if let Some(sig) = signature(b) {
                    return Ok(Some(sig.to_string()));
                }
            }
            if let Some(i) = b.iter().position(|&x| x != 0) {
                return Ok(Some(format!("non-zero bytes at offset {}", at + i as u64)));
            }
        }
    }
    Ok(None)
}

/// A name in `path`'s directory for building `path` before it is complete.
fn temp_sibling(path: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// The directory holding `path` (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Make a directory's entries durable.
///
/// # Errors
/// [`Error::Io`] when it cannot be opened or synced.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let shown = dir.display().to_string();
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", shown, 0, e))
}

/// Create the file `path` (which must not exist) with `build`, which is given a temporary name
/// in the same directory; rename it into place only when `build` succeeded, then sync the
/// directory. On failure the temporary file (and the `NAME.holder` and `NAME.witness` files next
/// to it) is removed, so nothing is left; on success `NAME.witness` (the table's rollback
/// witness) follows the file to `path.witness`. Errors about the temporary name are reported
/// with `path`.
///
/// # Errors
/// [`Error::Io`] (`AlreadyExists` when `path` exists), or `build`'s error.
pub fn create_complete(path: &Path, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let shown = path.display().to_string();
    if path.symlink_metadata().is_ok() {
        return Err(Error::io(
            "create",
            shown,
            0,
            std::io::ErrorKind::AlreadyExists.into(),
        ));
    }
    let tmp = temp_sibling(path);
    let tmp_shown = tmp.display().to_string();
    let cleanup = || {
        let _ = std::fs::remove_file(&tmp);
        let mut holder = tmp.clone().into_os_string();
        holder.push(".holder");
        let _ = std::fs::remove_file(holder);
        let _ = std::fs::remove_file(witness_path(&tmp));
    };
    let placed = build(&tmp).and_then(|()| rename_noreplace(&tmp, path));
    if let Err(e) = placed {
        cleanup();
        return Err(match e {
            Error::Io {
                op,
                target,
                offset,
                source,
            } if target == tmp_shown => Error::io(op, shown, offset, source),
            e => e,
        });
    }
    let witness = witness_path(&tmp);
    if witness.exists() {
        let to = witness_path(path);
        std::fs::rename(&witness, &to)
            .map_err(|e| Error::io("rename into", to.display().to_string(), 0, e))?;
    }
    sync_dir(parent_dir(path))
}

/// The rollback witness file of a table: `TABLE.witness`. It is named here, below the table
/// code, because [`create_complete`] moves it along with the table file it creates.
#[must_use]
pub fn witness_path(table: &Path) -> PathBuf {
    let mut p = table.as_os_str().to_owned();
    p.push(".witness");
    PathBuf::from(p)
}

/// Rename `from` to `to`, failing with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    let shown = to.display().to_string();
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            // The file system cannot rename without replacing: a hard link cannot replace.
            std::fs::hard_link(from, to).map_err(|e| Error::io("create", &shown, 0, e))?;
            std::fs::remove_file(from)
                .map_err(|e| Error::io("remove", from.display().to_string(), 0, e))
        }
        Err(e) => Err(Error::io("create", shown, 0, e.into())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]
    use super::*;
    use crate::volume::MemVolume;

    #[test]
    fn zeros_hold_no_data_and_signatures_are_named() {
        let v = MemVolume::new("v", 4 << 20);
        assert_eq!(visible_data(&v, &[(0, 4 << 20)]).unwrap(), None);
        let mut d = vec![0u8; 4 << 20];
        d[1080] = 0x53;
        d[1081] = 0xef;
        let v = MemVolume::with_data("v", &d);
        let found = visible_data(&v, &[(0, 4 << 20)]).unwrap().unwrap();
        assert!(found.contains("ext2/3/4"), "{found}");
        // Outside the ranges looked at, data does not count.
        let mut d = vec![0u8; 4 << 20];
        d[2 << 20] = 1;
        let v = MemVolume::with_data("v", &d);
        assert_eq!(visible_data(&v, &[(0, 4 << 20)]).unwrap(), None);
        d[(4 << 20) - 1] = 1;
        let v = MemVolume::with_data("v", &d);
        let found = visible_data(&v, &[(0, 4 << 20)]).unwrap().unwrap();
        assert!(found.contains(&((4u64 << 20) - 1).to_string()), "{found}");
    }

    #[test]
    fn create_complete_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let r = create_complete(&p, |tmp| {
            std::fs::write(tmp, b"partial").unwrap();
            Err(Error::io(
                "write",
                tmp.display().to_string(),
                7,
                std::io::ErrorKind::StorageFull.into(),
            ))
        });
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains(&p.display().to_string()) && !msg.contains(".tmp-"),
            "{msg}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        create_complete(&p, |tmp| {
            std::fs::write(tmp, b"whole").map_err(|e| Error::io("write", "t", 0, e))
        })
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"whole");
        assert!(create_complete(&p, |_| Ok(())).is_err());
    }
}
