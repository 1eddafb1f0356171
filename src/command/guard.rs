//! Files the command line never accepts as volumes: the table itself (by device and inode, so
//! links are caught), any other activity table, a table's holder and control files, sockets
//! (NBD and control sockets), and anything that is not a regular file or a block device.

use std::io::Read as _;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};

use crate::activity::format::SUPERBLOCK_MAGIC;
use crate::volume::file_identity;
use crate::{Error, Result};

fn with_suffix(table: &Path, suffix: &str) -> PathBuf {
    let mut p = table.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Refuse `path` as a volume of the table at `table`.
///
/// # Errors
/// [`Error::NotAVolume`] saying what the file is; [`Error::Io`] when it cannot be inspected.
pub fn check_volume(path: &Path, table: &Path) -> Result<()> {
    let shown = path.display().to_string();
    let refuse = |why: String| {
        Err(Error::NotAVolume {
            path: shown.clone(),
            why,
        })
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io("open", &shown, 0, e))?;
    let ft = meta.file_type();
    if ft.is_socket() {
        return refuse("it is a socket (an NBD or control socket?)".to_string());
    }
    if !ft.is_file() && !ft.is_block_device() {
        let what = file_kind(&ft);
        return refuse(format!("it is {what}, not a file or block device"));
    }
    let id = file_identity(path)?;
    let table_shown = table.display();
    for (suffix, what) in [
        ("", "the activity table"),
        (".holder", "the holder file of table"),
        (".witness", "the rollback witness of table"),
        (".ctl", "the control socket of table"),
        (".nbd", "the NBD socket of table"),
    ] {
        let other = with_suffix(table, suffix);
        if file_identity(&other).is_ok_and(|o| o == id) {
            return refuse(format!("it is {what} {table_shown}"));
        }
    }
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(8).read_to_end(&mut head))
        .map_err(|e| Error::io("read", &shown, 0, e))?;
    if head == SUPERBLOCK_MAGIC {
        return refuse("it is a timezero activity table".to_string());
    }
    Ok(())
}

/// What kind of file `ft` is, in words (`a FIFO`, `a directory`, ...).
pub(crate) fn file_kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}
