//! The FUSE requests: a pass-through to the backing directory with every file write kept
//! volatile by [`Store`].

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use super::store::{Store, TraceOp};

/// Attributes and entries are not cached by the kernel: sizes change with volatile writes.
const TTL: Duration = Duration::ZERO;

const O_DIRECT: i32 = 0o40000;
const O_DSYNC: i32 = 0o10000;
const O_SYNC: i32 = 0o4010000;

/// The file system handed to fuser.
#[derive(Debug)]
pub(crate) struct PowerLossFs {
    pub(crate) store: Arc<Mutex<Store>>,
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn io_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(5)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let n = u32::try_from(nsecs).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, n),
        Err(_) => UNIX_EPOCH,
    }
}

fn kind_of(m: &std::fs::Metadata) -> FileType {
    FileType::from_std(m.file_type()).unwrap_or(FileType::RegularFile)
}

impl PowerLossFs {
    fn attr(s: &mut Store, ino: u64) -> Result<FileAttr, i32> {
        let rel = s.rel(ino).ok_or(2)?;
        let m = std::fs::symlink_metadata(s.real(&rel)).map_err(|e| io_errno(&e))?;
        let size = if m.is_file() {
            s.visible_size(ino, m.len())
        } else {
            m.len()
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: kind_of(&m),
            perm: u16::try_from(m.mode() & 0o7777).unwrap_or(0o600),
            nlink: u32::try_from(m.nlink()).unwrap_or(1),
            uid: m.uid(),
            gid: m.gid(),
            rdev: u32::try_from(m.rdev()).unwrap_or(0),
            blksize: 4096,
            flags: 0,
        })
    }

    fn child(s: &Store, parent: u64, name: &OsStr) -> Result<PathBuf, i32> {
        let p = s.rel(parent).ok_or(2)?;
        Ok(p.join(name))
    }

    fn entry(s: &mut Store, rel: &Path) -> Result<FileAttr, i32> {
        let ino = s.ino_of(rel);
        Self::attr(s, ino)
    }

    fn open_flags(s: &mut Store, ino: u64, flags: i32) -> FopenFlags {
        s.record(ino, TraceOp::Open { flags });
        if flags & O_DIRECT != 0 {
            s.direct_opens += 1;
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        }
    }
}

impl Filesystem for PowerLossFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.store.lock();
        let r = s
            .alive()
            .and_then(|()| Self::child(&s, parent.0, name))
            .and_then(|rel| Self::entry(&mut s, &rel));
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let mut s = self.store.lock();
        match s.alive().and_then(|()| Self::attr(&mut s, ino.0)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
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
        let mut s = self.store.lock();
        let r = (|| -> Result<FileAttr, i32> {
            if mode.is_some() || size.is_some() {
                s.tick()?;
            } else {
                s.alive()?;
            }
            let rel = s.rel(ino.0).ok_or(2)?;
            let real = s.real(&rel);
            if let Some(m) = mode {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&real, std::fs::Permissions::from_mode(m & 0o7777))
                    .map_err(|e| io_errno(&e))?;
            }
            if let Some(n) = size {
                // A size change first makes the file's volatile writes durable (see the
                // module docs), then applies to the backing file at once.
                s.persist(ino.0)?;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&real)
                    .map_err(|e| io_errno(&e))?;
                f.set_len(n).map_err(|e| io_errno(&e))?;
                let op = if n == 0 {
                    TraceOp::Create
                } else {
                    TraceOp::Resize { size: n }
                };
                s.record(ino.0, op);
            }
            Self::attr(&mut s, ino.0)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.store.lock();
        let r = (|| -> Result<FileAttr, i32> {
            s.tick()?;
            let rel = Self::child(&s, parent.0, name)?;
            let real = s.real(&rel);
            let m = rustix::fs::Mode::from_bits_truncate(mode & !umask & 0o7777);
            let ft = rustix::fs::FileType::from_raw_mode(mode);
            rustix::fs::mknodat(rustix::fs::CWD, &real, ft, m, u64::from(rdev))
                .map_err(|e| e.raw_os_error())?;
            let a = Self::entry(&mut s, &rel)?;
            s.record(a.ino.0, TraceOp::Create);
            Ok(a)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.store.lock();
        let r = (|| -> Result<FileAttr, i32> {
            s.tick()?;
            let rel = Self::child(&s, parent.0, name)?;
            let real = s.real(&rel);
            let m = rustix::fs::Mode::from_bits_truncate(mode & !umask & 0o7777);
            rustix::fs::mkdir(&real, m).map_err(|e| e.raw_os_error())?;
            Self::entry(&mut s, &rel)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.store.lock();
        let r = (|| -> Result<(), i32> {
            s.tick()?;
            let rel = Self::child(&s, parent.0, name)?;
            std::fs::remove_file(s.real(&rel)).map_err(|e| io_errno(&e))?;
            s.record_path(rel.to_string_lossy().into_owned(), TraceOp::Unlink);
            s.forget_path(&rel);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.store.lock();
        let r = (|| -> Result<(), i32> {
            s.tick()?;
            let rel = Self::child(&s, parent.0, name)?;
            std::fs::remove_dir(s.real(&rel)).map_err(|e| io_errno(&e))?;
            s.forget_path(&rel);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.store.lock();
        let r = (|| -> Result<(), i32> {
            s.tick()?;
            let from = Self::child(&s, parent.0, name)?;
            let to = Self::child(&s, newparent.0, newname)?;
            let rf = rustix::fs::RenameFlags::from_bits_truncate(flags.bits());
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                s.real(&from),
                rustix::fs::CWD,
                s.real(&to),
                rf,
            )
            .map_err(|e| e.raw_os_error())?;
            s.record_path(
                from.to_string_lossy().into_owned(),
                TraceOp::Rename {
                    to: to.to_string_lossy().into_owned(),
                },
            );
            s.rename_path(&from, &to);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut s = self.store.lock();
        let r = (|| -> Result<FileAttr, i32> {
            s.tick()?;
            // The volatile bytes belong to the inode; make them durable so that both names show
            // the same bytes.
            s.persist(ino.0)?;
            let from = s.rel(ino.0).ok_or(2)?;
            let to = Self::child(&s, newparent.0, newname)?;
            std::fs::hard_link(s.real(&from), s.real(&to)).map_err(|e| io_errno(&e))?;
            Self::entry(&mut s, &to)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.store.lock();
        if let Err(e) = s.alive() {
            reply.error(err(e));
            return;
        }
        let f = Self::open_flags(&mut s, ino.0, flags.0);
        reply.opened(FileHandle(0), f);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut s = self.store.lock();
        match s.alive().and_then(|()| s.read(ino.0, offset, size)) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.store.lock();
        let r = (|| -> Result<(), i32> {
            s.tick()?;
            s.write(ino.0, offset, data)?;
            if flags.0 & (O_SYNC | O_DSYNC) != 0 {
                s.persist(ino.0)?;
                s.record(
                    ino.0,
                    TraceOp::Flush {
                        datasync: flags.0 & O_SYNC != O_SYNC,
                    },
                );
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
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
        // close(2): not a durability point.
        let mut s = self.store.lock();
        match s.alive() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.store.lock();
        let r = (|| -> Result<(), i32> {
            s.tick()?;
            s.persist(ino.0)?;
            s.record(ino.0, TraceOp::Flush { datasync });
            Ok(())
        })();
        match r {
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
        let mut s = self.store.lock();
        let r = (|| -> Result<Vec<(u64, FileType, std::ffi::OsString)>, i32> {
            s.alive()?;
            let rel = s.rel(ino.0).ok_or(2)?;
            let mut out = vec![
                (ino.0, FileType::Directory, ".".into()),
                (1, FileType::Directory, "..".into()),
            ];
            let mut names: Vec<_> = std::fs::read_dir(s.real(&rel))
                .map_err(|e| io_errno(&e))?
                .flatten()
                .collect();
            names.sort_by_key(std::fs::DirEntry::file_name);
            for e in names {
                let kind = e
                    .file_type()
                    .ok()
                    .and_then(FileType::from_std)
                    .unwrap_or(FileType::RegularFile);
                let i = s.ino_of(&rel.join(e.file_name()));
                out.push((i, kind, e.file_name()));
            }
            Ok(out)
        })();
        match r {
            Ok(entries) => {
                let skip = usize::try_from(offset).unwrap_or(usize::MAX);
                for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(skip) {
                    if reply.add(INodeNo(i), (k + 1) as u64, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.store.lock();
        let r = s.tick().map(|()| s.record(ino.0, TraceOp::FlushDir));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let mut s = self.store.lock();
        let r = s.alive().and_then(|()| {
            rustix::fs::statvfs(s.real(Path::new(""))).map_err(|e| e.raw_os_error())
        });
        match r {
            Ok(v) => reply.statfs(
                v.f_blocks,
                v.f_bfree,
                v.f_bavail,
                v.f_files,
                v.f_ffree,
                u32::try_from(v.f_bsize).unwrap_or(4096),
                u32::try_from(v.f_namemax).unwrap_or(255),
                u32::try_from(v.f_frsize).unwrap_or(4096),
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let mut s = self.store.lock();
        match s.alive() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.store.lock();
        let r = (|| -> Result<(FileAttr, FopenFlags), i32> {
            s.tick()?;
            let rel = Self::child(&s, parent.0, name)?;
            let real = s.real(&rel);
            let mut o = std::fs::OpenOptions::new();
            o.write(true).mode(mode & !umask & 0o7777);
            if flags & 0o200 != 0 {
                // O_EXCL
                o.create_new(true);
            } else {
                o.create(true);
            }
            o.open(&real).map_err(|e| io_errno(&e))?;
            let a = Self::entry(&mut s, &rel)?;
            s.record(a.ino.0, TraceOp::Create);
            let f = Self::open_flags(&mut s, a.ino.0, flags);
            Ok((a, f))
        })();
        match r {
            Ok((a, f)) => reply.created(&TTL, &a, Generation(0), FileHandle(0), f),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.store.lock();
        let r = (|| -> Result<(), i32> {
            s.tick()?;
            let fl = rustix::fs::FallocateFlags::from_bits(u32::try_from(mode).unwrap_or(0))
                .ok_or(95)?;
            if !(fl.is_empty() || fl == rustix::fs::FallocateFlags::KEEP_SIZE) {
                // Hole punching and zeroing would change data: not offered (EOPNOTSUPP).
                return Err(95);
            }
            s.persist(ino.0)?;
            let rel = s.rel(ino.0).ok_or(2)?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(s.real(&rel))
                .map_err(|e| io_errno(&e))?;
            rustix::fs::fallocate(&f, fl, offset, length).map_err(|e| e.raw_os_error())?;
            let size = f.metadata().map_err(|e| io_errno(&e))?.len();
            s.record(ino.0, TraceOp::Resize { size });
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }
}
