//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use timezero::{Engine, EngineOptions, MapResolver};
use timezero::{MemStorage, TableOptions, TableStorage};
use timezero::{MemVolume, Volume};

/// Small table options so tests exercise journal wrap and checkpoints.
pub fn small_table() -> TableOptions {
    TableOptions {
        journal_bytes: 128 * 1024,
        checkpoint_bytes: 256 * 1024,
        log_bytes: 256 * 1024,
    }
}

/// A new in-memory table storage sized for `opts`.
pub fn mem_storage(opts: &TableOptions) -> Arc<MemStorage> {
    Arc::new(MemStorage::new(
        "table",
        opts.layout().unwrap().file_bytes(),
    ))
}

/// Create an engine on `storage`.
pub fn create(storage: &Arc<MemStorage>, opts: TableOptions) -> Engine {
    let s: Arc<dyn TableStorage> = storage.clone();
    Engine::create(
        s,
        EngineOptions {
            table: opts,
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

/// Reopen an engine on `storage` with `vols`.
pub fn reopen(storage: &Arc<MemStorage>, vols: &[Arc<MemVolume>]) -> Engine {
    let mut r = MapResolver::default();
    for v in vols {
        r.add(v.clone() as Arc<dyn Volume>);
    }
    let s: Arc<dyn TableStorage> = storage.clone();
    Engine::open(s, &r, EngineOptions::default()).unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    timezero::fault::fuzzing::fill(seed, len)
}

/// Read a session's whole image.
pub fn image(e: &Engine, id: timezero::SessionId) -> Vec<u8> {
    let s = e.session(id).unwrap();
    let mut b = vec![0u8; s.image_len() as usize];
    e.read_image(id, 0, &mut b).unwrap();
    b
}

/// Running the `timezero` binary from tests.
pub mod cli {
    use std::path::Path;
    use std::process::Command;

    /// The binary under test.
    pub fn tz() -> Command {
        Command::new(env!("CARGO_BIN_EXE_timezero"))
    }

    /// Run it with `args`; its stdout, after checking it succeeded.
    pub fn ok(args: &[&str]) -> String {
        let o = tz().args(args).output().unwrap();
        assert!(
            o.status.success(),
            "timezero {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Run it in `dir` with `args`; its stdout, after checking it succeeded.
    pub fn ok_in(dir: &Path, args: &[&str]) -> String {
        let o = tz().current_dir(dir).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "timezero {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// A path as an argument.
    pub fn p(x: &Path) -> &str {
        x.to_str().unwrap()
    }
}
