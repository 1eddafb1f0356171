//! The state directory of the orchestration commands (docs/orchestration.md, section 3.4):
//! where it is, and what it holds.
//!
//! `STATE` is `--state DIR`, else `$TIMEZERO_STATE`, else `/var/lib/timezero`. It holds
//! `orchestration.sqlite` (the store), `timezero.toml` (the global configuration),
//! `plans/NAME.toml` (plans named on the command line without a path) and `daemon.lock` (the
//! marker of the daemon holding the state).
//!
//! Decisions: a relative table path (in a plan's `table` or the global `tables`) is relative to
//! `STATE`; a plan that names no table uses the one table `timezero.toml` configures (two or more
//! configured tables need the plan to say which). Commands that only read (`jobs`, `plan list`)
//! do not create a store that does not exist yet: they see an empty one.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Fail;
use crate::plan::{GlobalConfig, Plan};
use crate::store::{MemStore, SqliteStore, Store};

/// The store's file name in the state directory.
pub(super) const STORE_FILE: &str = "orchestration.sqlite";
/// The global configuration's file name in the state directory.
pub(super) const CONFIG_FILE: &str = "timezero.toml";
/// The daemon's lock file in the state directory.
pub(super) const DAEMON_LOCK_FILE: &str = "daemon.lock";
/// The directory of named plans in the state directory.
pub(super) const PLANS_DIR: &str = "plans";

/// The state directory: `--state`, else `$TIMEZERO_STATE`, else `/var/lib/timezero`.
pub(super) fn state_dir(state: Option<PathBuf>) -> PathBuf {
    state
        .or_else(|| std::env::var_os("TIMEZERO_STATE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/timezero"))
}

/// A plan file in `STATE/plans` and its plan, or why it does not load.
pub(super) type PlanEntry = (PathBuf, Result<Plan, String>);

/// A state directory and the files in it.
#[derive(Debug, Clone)]
pub(super) struct StateDir {
    /// The directory.
    pub dir: PathBuf,
}

impl StateDir {
    /// The state directory the flags and environment select.
    pub fn new(state: Option<PathBuf>) -> StateDir {
        StateDir {
            dir: state_dir(state),
        }
    }

    /// `STATE/orchestration.sqlite`.
    pub fn store_path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    /// `STATE/timezero.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// `STATE/daemon.lock`.
    pub fn daemon_lock_path(&self) -> PathBuf {
        self.dir.join(DAEMON_LOCK_FILE)
    }

    /// `STATE/plans`.
    pub fn plans_dir(&self) -> PathBuf {
        self.dir.join(PLANS_DIR)
    }

    /// Open the store, creating the state directory and the store when they do not exist.
    pub fn open_store(&self) -> Result<Arc<SqliteStore>, Fail> {
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            Fail::Message(format!(
                "create state directory {}: {e}",
                self.dir.display()
            ))
        })?;
        SqliteStore::open(self.store_path())
            .map(Arc::new)
            .map_err(|e| Fail::Message(e.to_string()))
    }

    /// Open the store to read it: an empty one in memory when the file does not exist yet.
    pub fn read_store(&self) -> Result<Arc<dyn Store>, Fail> {
        if self.store_path().exists() {
            let s: Arc<dyn Store> = self.open_store()?;
            Ok(s)
        } else {
            Ok(Arc::new(MemStore::new()))
        }
    }

    /// The global configuration (the default when `timezero.toml` does not exist).
    pub fn global(&self) -> Result<GlobalConfig, Fail> {
        GlobalConfig::load(&self.config_path()).map_err(|e| Fail::Usage(e.to_string()))
    }

    /// The file of `plan`: the path when it exists or has more than one component, else
    /// `STATE/plans/PLAN.toml`.
    pub fn plan_path(&self, plan: &Path) -> PathBuf {
        if plan.exists() || plan.components().count() > 1 {
            plan.to_path_buf()
        } else {
            let mut name = plan.as_os_str().to_os_string();
            if plan.extension().is_none_or(|e| e != "toml") {
                name.push(".toml");
            }
            self.plans_dir().join(name)
        }
    }

    /// Load `plan` (a path or a name); a file that does not parse is a usage error (exit 2).
    pub fn load_plan(&self, plan: &Path) -> Result<(PathBuf, Plan), Fail> {
        let path = self.plan_path(plan);
        let p = Plan::load(&path).map_err(|e| Fail::Usage(e.to_string()))?;
        Ok((path, p))
    }

    /// The plans in `STATE/plans`, by file name; files that do not parse are returned with
    /// their error.
    pub fn plans(&self) -> Result<Vec<PlanEntry>, Fail> {
        let dir = self.plans_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(Fail::Message(format!(
                    "read plan directory {}: {e}",
                    dir.display()
                )))
            }
        };
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| {
                Fail::Message(format!("read plan directory {}: {e}", dir.display()))
            })?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "toml") {
                paths.push(path);
            }
        }
        paths.sort();
        Ok(paths
            .into_iter()
            .map(|p| {
                let plan = Plan::load(&p).map_err(|e| e.to_string());
                (p, plan)
            })
            .collect())
    }

    /// The activity tables `timezero.toml` configures (`tables = ["a.tzt"]`, or
    /// `[tables.NAME]` with `path = ...`, or `[tables]` with `NAME = "path"`), relative paths
    /// resolved against the state directory.
    pub fn tables(&self) -> Result<Vec<PathBuf>, Fail> {
        let path = self.config_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Fail::Message(format!("read {}: {e}", path.display()))),
        };
        let value: toml::Table = toml::from_str(&text)
            .map_err(|e| Fail::Usage(format!("{}: {}", path.display(), e.message())))?;
        let bad = |why: &str| Fail::Usage(format!("{}: tables: {why}", path.display()));
        let mut out = Vec::new();
        match value.get("tables") {
            None => {}
            Some(toml::Value::Array(a)) => {
                for v in a {
                    let s = v.as_str().ok_or_else(|| bad("an entry is not a path"))?;
                    out.push(self.resolve(Path::new(s)));
                }
            }
            Some(toml::Value::Table(t)) => {
                for (name, v) in t {
                    let s = match v {
                        toml::Value::String(s) => s.as_str(),
                        toml::Value::Table(inner) => inner
                            .get("path")
                            .and_then(toml::Value::as_str)
                            .ok_or_else(|| bad(&format!("{name} has no path")))?,
                        _ => return Err(bad(&format!("{name} is not a path or a table"))),
                    };
                    out.push(self.resolve(Path::new(s)));
                }
            }
            Some(_) => return Err(bad("not a list of paths or a table")),
        }
        Ok(out)
    }

    /// `path` resolved against the state directory when relative.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.dir.join(path)
        }
    }

    /// The activity table the jobs of `plan` use: the plan's `table`, else the one table the
    /// global configuration lists.
    pub fn table_of(&self, plan: &Plan) -> Result<PathBuf, Fail> {
        if let Some(t) = &plan.table {
            return Ok(self.resolve(t));
        }
        let mut tables = self.tables()?;
        match tables.len() {
            1 => Ok(tables.remove(0)),
            0 => Err(Fail::Usage(format!(
                "plan {} names no table and {} configures none (set table = \"...\" in the plan)",
                plan.name,
                self.config_path().display()
            ))),
            n => Err(Fail::Usage(format!(
                "plan {} names no table and {} configures {n}: say which in the plan",
                plan.name,
                self.config_path().display()
            ))),
        }
    }

    /// Hold a shared lock on `STATE/daemon.lock` (created when missing) while the returned file
    /// is open: a job run in this process keeps a daemon from starting on the state under it.
    /// `Err(holder)` with the lock file's text when a daemon holds the state.
    pub fn hold_runner_lock(&self) -> Result<Result<File, String>, Fail> {
        use rustix::fs::{flock, FlockOperation};
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            Fail::Message(format!(
                "create state directory {}: {e}",
                self.dir.display()
            ))
        })?;
        let path = self.daemon_lock_path();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Fail::Message(format!("open {}: {e}", path.display())))?;
        match flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) => Ok(Ok(file)),
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                Ok(Err(text.trim().to_string()))
            }
            Err(e) => Err(Fail::Message(format!("lock {}: {e}", path.display()))),
        }
    }
}
