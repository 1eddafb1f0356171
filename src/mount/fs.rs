//! The FUSE requests of [`ExportFs`]: one directory holding one regular file per export of an
//! [`ExportRegistry`], each request answered by the export's own operation, as the NBD server
//! answers the same request over the wire.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use crate::limits::FUSE_MAX_WRITE_BYTES;
use crate::nbd::{ExportRegistry, NbdExport};

/// Neither entries nor attributes are cached by the kernel: exports come and go with sessions,
/// and every lookup asks the registry again.
const TTL: Duration = Duration::ZERO;

/// The root directory's inode.
const ROOT: u64 = 1;

const O_ACCMODE: i32 = 0o3;
const O_TRUNC: i32 = 0o1000;
const O_DSYNC: i32 = 0o10000;

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// The block size the files report (`st_blksize`): the granularity a loop device or `dd` picks
/// for its requests when it asks.
const BLOCK_BYTES: u32 = 4096;

/// One open file: the export it was opened on, and how.
struct Handle {
    export: Arc<dyn NbdExport>,
    writable: bool,
    /// Opened with `O_SYNC` or `O_DSYNC`: every write is a durability point (NBD's FUA).
    sync: bool,
}

/// Inode numbers by export name, stable for the life of the mount (a name that goes away and
/// comes back gets its old number).
#[derive(Default)]
struct Inodes {
    by_name: HashMap<String, u64>,
    names: Vec<String>,
}

impl Inodes {
    fn ino(&mut self, name: &str) -> u64 {
        if let Some(&i) = self.by_name.get(name) {
            return i;
        }
        self.names.push(name.to_string());
        let i = ROOT + self.names.len() as u64;
        self.by_name.insert(name.to_string(), i);
        i
    }

    fn name(&self, ino: u64) -> Option<String> {
        let k = usize::try_from(ino.checked_sub(ROOT + 1)?).ok()?;
        self.names.get(k).cloned()
    }
}

/// A FUSE file system showing the exports of `R` as files of one directory.
///
/// Files are opened with `FOPEN_DIRECT_IO`: every read and write reaches the export with the
/// caller's offset and length, and the kernel keeps no page cache of them (see the module
/// documentation of [`crate::mount`] for why).
pub struct ExportFs<R: ExportRegistry> {
    registry: Arc<R>,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
}

impl<R: ExportRegistry> std::fmt::Debug for ExportFs<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportFs")
            .field("open_files", &self.handles.lock().len())
            .finish_non_exhaustive()
    }
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

/// The errno of a library error: the same value the NBD server sends for it.
fn errno_of(e: &crate::Error) -> i32 {
    i32::try_from(crate::nbd::proto::errno_for(e)).unwrap_or(EIO)
}

const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const EIO: i32 = 5;
const EBADF: i32 = 9;
const EFBIG: i32 = 27;
const EROFS: i32 = 30;
const EOPNOTSUPP: i32 = 95;
const ENOTDIR: i32 = 20;
const EISDIR: i32 = 21;

impl<R: ExportRegistry> ExportFs<R> {
    /// A file system over `registry`; files are owned by this process's user and group.
    #[must_use]
    pub fn new(registry: Arc<R>) -> Self {
        ExportFs {
            registry,
            inodes: Mutex::new(Inodes::default()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            mounted_at: SystemTime::now(),
        }
    }

    fn dir_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT),
            size: 0,
            blocks: 0,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_BYTES,
            flags: 0,
        }
    }

    fn file_attr(&self, ino: u64, export: &dyn NbdExport) -> FileAttr {
        let size = export.size();
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::RegularFile,
            perm: if export.read_only() { 0o444 } else { 0o644 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_BYTES,
            flags: 0,
        }
    }

    /// The export an inode stands for now (`ENOENT` once it is gone).
    fn export_of(&self, ino: u64) -> Result<Arc<dyn NbdExport>, i32> {
        let name = self.inodes.lock().name(ino).ok_or(ENOENT)?;
        self.registry.get(&name).ok_or(ENOENT)
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, i32> {
        if ino == ROOT {
            return Ok(self.dir_attr());
        }
        let e = self.export_of(ino)?;
        Ok(self.file_attr(ino, e.as_ref()))
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, i32> {
        self.handles.lock().get(&fh.0).cloned().ok_or(EBADF)
    }

    fn do_open(&self, ino: u64, flags: i32) -> Result<u64, i32> {
        if ino == ROOT {
            return Err(EISDIR);
        }
        let export = self.export_of(ino)?;
        let writable = flags & O_ACCMODE != 0;
        if writable && export.read_only() {
            return Err(EROFS);
        }
        if writable && flags & O_TRUNC != 0 {
            // A volume has the size it has: truncating it is not an operation on it.
            return Err(EPERM);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let h = Handle {
            export,
            writable,
            sync: flags & O_DSYNC != 0,
        };
        self.handles.lock().insert(fh, Arc::new(h));
        Ok(fh)
    }

    fn do_read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let h = self.handle(fh)?;
        let end = h.export.size();
        if offset >= end {
            return Ok(Vec::new());
        }
        let n = u64::from(size).min(end - offset);
        let mut buf = vec![0u8; usize::try_from(n).map_err(|_| EFBIG)?];
        h.export.read(offset, &mut buf).map_err(|e| errno_of(&e))?;
        Ok(buf)
    }

    fn do_write(&self, fh: FileHandle, offset: u64, data: &[u8], flags: i32) -> Result<u32, i32> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(EBADF);
        }
        let end = h.export.size();
        if offset >= end && !data.is_empty() {
            // Past the end of the volume: a file here never grows.
            return Err(EFBIG);
        }
        // A write reaching past the end is cut there, as on a block device.
        let n = usize::try_from((data.len() as u64).min(end - offset)).map_err(|_| EFBIG)?;
        let fua = h.sync || flags & O_DSYNC != 0;
        h.export
            .write(offset, &data[..n], fua)
            .map_err(|e| errno_of(&e))?;
        u32::try_from(n).map_err(|_| EFBIG)
    }

    fn do_fallocate(&self, fh: FileHandle, offset: u64, length: u64, mode: i32) -> Result<(), i32> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(EBADF);
        }
        let size = h.export.size();
        let want_end = offset.checked_add(length).ok_or(EFBIG)?;
        let keep = mode & FALLOC_FL_KEEP_SIZE != 0;
        let op = mode & !FALLOC_FL_KEEP_SIZE;
        if want_end > size && !keep {
            return Err(EFBIG);
        }
        let end = want_end.min(size);
        let len = end.saturating_sub(offset);
        match op {
            // Allocation: every byte of a volume is there already.
            0 => Ok(()),
            // Discard (a loop device's DISCARD arrives as this): NBD's TRIM.
            FALLOC_FL_PUNCH_HOLE if keep => {
                if len > 0 {
                    h.export.trim(offset, len).map_err(|e| errno_of(&e))?;
                }
                Ok(())
            }
            // A loop device's WRITE_ZEROES: NBD's WRITE_ZEROES.
            FALLOC_FL_ZERO_RANGE => {
                if len > 0 {
                    h.export
                        .write_zeroes(offset, len, h.sync)
                        .map_err(|e| errno_of(&e))?;
                }
                Ok(())
            }
            _ => Err(EOPNOTSUPP),
        }
    }

    fn entries(&self) -> Vec<(u64, FileType, String)> {
        let mut out = vec![
            (ROOT, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        let mut names = self.registry.list();
        names.sort();
        names.dedup();
        let mut inodes = self.inodes.lock();
        for n in names {
            out.push((inodes.ino(&n), FileType::RegularFile, n));
        }
        out
    }
}

impl<R: ExportRegistry + 'static> Filesystem for ExportFs<R> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large writes (a loop device sends up to its queue's limit at once); a smaller limit
        // the kernel insists on is fine.
        let _ = config.set_max_write(FUSE_MAX_WRITE_BYTES);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = (|| -> Result<FileAttr, i32> {
            if parent.0 != ROOT {
                return Err(ENOTDIR);
            }
            let name = name.to_str().ok_or(ENOENT)?;
            let e = self.registry.get(name).ok_or(ENOENT)?;
            let ino = self.inodes.lock().ino(name);
            Ok(self.file_attr(ino, e.as_ref()))
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // An open file keeps its export: its attributes come from there even if the name is
        // gone meanwhile.
        let open = fh.and_then(|f| self.handle(f).ok());
        let r = match open {
            Some(h) if ino.0 != ROOT => Ok(self.file_attr(ino.0, h.export.as_ref())),
            _ => self.attr(ino.0),
        };
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| -> Result<FileAttr, i32> {
            let a = self.attr(ino.0)?;
            if mode.is_some() || uid.is_some() || gid.is_some() {
                return Err(EPERM);
            }
            match size {
                // Resizing (truncate, O_TRUNC without atomic truncation) is refused; setting
                // the size it has changes nothing. Times are accepted and not kept.
                Some(n) if n != a.size => Err(if n > a.size { EFBIG } else { EPERM }),
                _ => Ok(a),
            }
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.do_open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.do_read(fh, offset, size) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.do_write(fh, offset, data, flags.0) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is no durability point (NBD has none at disconnect either).
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // fsync and fdatasync are NBD's FLUSH: everything acknowledged before is durable.
        let r = self
            .handle(fh)
            .and_then(|h| h.export.flush().map_err(|e| errno_of(&e)));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.do_fallocate(fh, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            reply.error(err(ENOTDIR));
            return;
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (k, (i, kind, name)) in self.entries().into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(i), (k + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let names = self.registry.list();
        let bytes: u64 = names
            .iter()
            .filter_map(|n| self.registry.get(n))
            .map(|e| e.size())
            .sum();
        let blocks = bytes.div_ceil(u64::from(BLOCK_BYTES));
        let files = names.len() as u64 + 1;
        reply.statfs(blocks, 0, 0, files, 0, BLOCK_BYTES, 255, BLOCK_BYTES);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        // Files are the table's volumes and images; none is made by name.
        reply.error(err(EPERM));
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(err(EPERM));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(err(EPERM));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(err(EPERM));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(err(EPERM));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(err(EPERM));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]
    use super::*;
    use crate::nbd::{StaticRegistry, VolumeExport};
    use crate::volume::{MemVolume, Volume};

    const O_RDONLY: i32 = 0;
    const O_RDWR: i32 = 2;

    fn fs() -> (ExportFs<StaticRegistry>, Arc<MemVolume>) {
        let v = Arc::new(MemVolume::new("v", 64 << 10));
        let ro = Arc::new(MemVolume::new("r", 8 << 10));
        let r = StaticRegistry::new()
            .with(
                "vol",
                Arc::new(VolumeExport::new(v.clone() as Arc<dyn Volume>)),
            )
            .with(
                "ro",
                Arc::new(VolumeExport::new(ro as Arc<dyn Volume>).with_read_only(true)),
            );
        (ExportFs::new(Arc::new(r)), v)
    }

    fn ino(f: &ExportFs<StaticRegistry>, name: &str) -> u64 {
        f.entries().into_iter().find(|e| e.2 == name).unwrap().0
    }

    #[test]
    fn files_have_the_exports_sizes_and_modes() {
        let (f, _) = fs();
        let names: Vec<String> = f.entries().into_iter().map(|e| e.2).collect();
        assert_eq!(names, [".", "..", "ro", "vol"]);
        let a = f.attr(ino(&f, "vol")).unwrap();
        assert_eq!(
            (a.size, a.perm, a.kind),
            (64 << 10, 0o644, FileType::RegularFile)
        );
        let a = f.attr(ino(&f, "ro")).unwrap();
        assert_eq!((a.size, a.perm), (8 << 10, 0o444));
        assert_eq!(f.attr(99).unwrap_err(), ENOENT);
    }

    #[test]
    fn writes_reach_the_export_and_never_grow_it() {
        let (f, v) = fs();
        let fh = FileHandle(f.do_open(ino(&f, "vol"), O_RDWR).unwrap());
        assert_eq!(f.do_write(fh, 4096, b"abc", 0).unwrap(), 3);
        let mut b = [0u8; 3];
        v.read_at(4096, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert_eq!(f.do_read(fh, 4096, 3).unwrap(), b"abc");
        // Straddling the end: cut there. At or past the end: EFBIG.
        assert_eq!(f.do_write(fh, (64 << 10) - 2, b"wxyz", 0).unwrap(), 2);
        assert_eq!(f.do_write(fh, 64 << 10, b"x", 0).unwrap_err(), EFBIG);
        // Reads past the end are short.
        assert_eq!(f.do_read(fh, (64 << 10) - 1, 16).unwrap().len(), 1);
        assert!(f.do_read(fh, 1 << 20, 16).unwrap().is_empty());
        assert_eq!(f.attr(ino(&f, "vol")).unwrap().size, 64 << 10);
    }

    #[test]
    fn truncation_and_read_only_writes_are_refused() {
        let (f, _) = fs();
        assert_eq!(
            f.do_open(ino(&f, "vol"), O_RDWR | O_TRUNC).unwrap_err(),
            EPERM
        );
        assert_eq!(f.do_open(ino(&f, "ro"), O_RDWR).unwrap_err(), EROFS);
        let fh = FileHandle(f.do_open(ino(&f, "ro"), O_RDONLY).unwrap());
        assert_eq!(f.do_write(fh, 0, b"x", 0).unwrap_err(), EBADF);
        assert_eq!(f.do_open(ROOT, O_RDONLY).unwrap_err(), EISDIR);
    }

    #[test]
    fn fallocate_maps_to_trim_and_zeroes_within_the_file() {
        let (f, v) = fs();
        v.write_at(0, &[7u8; 8192]).unwrap();
        let fh = FileHandle(f.do_open(ino(&f, "vol"), O_RDWR).unwrap());
        f.do_fallocate(fh, 0, 4096, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            .unwrap();
        f.do_fallocate(fh, 4096, 100, FALLOC_FL_ZERO_RANGE).unwrap();
        let mut b = vec![0u8; 8192];
        v.read_at(0, &mut b).unwrap();
        assert!(b[..4196].iter().all(|&x| x == 0));
        assert!(b[4196..].iter().all(|&x| x == 7));
        assert_eq!(f.do_fallocate(fh, 0, 1 << 20, 0).unwrap_err(), EFBIG);
        f.do_fallocate(fh, 0, 4096, 0).unwrap();
        assert_eq!(
            f.do_fallocate(fh, 0, 4096, FALLOC_FL_PUNCH_HOLE)
                .unwrap_err(),
            EOPNOTSUPP
        );
    }
}
