//! What a plan says about quiescing a task's sources (QUI-01), in the plan file's shape:
//! `quiesce = { mode = "freeze", mounts = ["/srv/db"], timeout = "30s", unquiesce_timeout =
//! "30s" }` or `{ mode = "command", quiesce_cmd = [..], status_cmd = [..], unquiesce_cmd =
//! [..], timeout = "2m" }`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::hook::{HookSpec, SpecError, Timeout};
use crate::limits::{
    HOOK_TIMEOUT_MAX_SECS, QUIESCE_MOUNTS_MAX, QUIESCE_STATUS_INTERVAL_DEFAULT_SECS,
    QUIESCE_TIMEOUT_DEFAULT_SECS, QUIESCE_TIMEOUT_MAX_SECS,
};

/// Why a quiesce setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuiesceSpecError {
    /// A duration or command that is not valid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A field the mode needs is missing.
    #[error("quiesce mode {mode:?} needs {field}")]
    Missing {
        /// The mode.
        mode: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// A field the mode does not use is set.
    #[error("quiesce mode {mode:?} does not use {field}")]
    Unused {
        /// The mode.
        mode: &'static str,
        /// The field set.
        field: &'static str,
    },
    /// No mount, more than `QUIESCE_MOUNTS_MAX`, a relative path, or one listed twice.
    #[error("quiesce mounts: {0}")]
    Mounts(&'static str),
}

/// How a task's sources are quiesced (QUI-01).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuiesceMode {
    /// Nothing.
    None,
    /// `syncfs` on each mount (\[001\]'s BufferFlushOnly): written data is on disk, writers are
    /// not stopped; nothing to undo.
    Flush {
        /// The mounts, in order.
        mounts: Vec<PathBuf>,
    },
    /// `FIFREEZE` on each mount in order (the lock); thawed in reverse order.
    Freeze {
        /// The mounts, in order.
        mounts: Vec<PathBuf>,
    },
    /// Application quiesce: `quiesce`, then `status` run every `status_interval` until it
    /// exits 0 (without `status`, `quiesce` exiting 0 is enough); `unquiesce` at the thaw.
    Command {
        /// `quiesce_cmd`.
        quiesce: HookSpec,
        /// `status_cmd`.
        status: Option<HookSpec>,
        /// `unquiesce_cmd`.
        unquiesce: HookSpec,
        /// Time between two runs of `status` (default
        /// `QUIESCE_STATUS_INTERVAL_DEFAULT_SECS`).
        status_interval: Timeout,
    },
}

impl QuiesceMode {
    /// The mode's name in a plan file.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            QuiesceMode::None => "none",
            QuiesceMode::Flush { .. } => "flush",
            QuiesceMode::Freeze { .. } => "freeze",
            QuiesceMode::Command { .. } => "command",
        }
    }
}

/// A task's quiesce: the mode and its two timeouts. Each timeout has the fixed grace
/// `QUIESCE_GRACE_SECS` on top (QUI-04, QUI-05).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "RawQuiesce")]
pub struct QuiesceSpec {
    /// What is done.
    pub mode: QuiesceMode,
    /// T: how long quiescing may take, before the grace (default
    /// `QUIESCE_TIMEOUT_DEFAULT_SECS`).
    pub timeout: Timeout,
    /// U: how long unquiescing may take, before the grace (default
    /// `QUIESCE_TIMEOUT_DEFAULT_SECS`).
    pub unquiesce_timeout: Timeout,
}

impl QuiesceSpec {
    /// `mode` with the default timeouts.
    #[must_use]
    pub fn new(mode: QuiesceMode) -> QuiesceSpec {
        QuiesceSpec {
            mode,
            timeout: Timeout::from_secs(QUIESCE_TIMEOUT_DEFAULT_SECS),
            unquiesce_timeout: Timeout::from_secs(QUIESCE_TIMEOUT_DEFAULT_SECS),
        }
    }

    /// No quiesce.
    #[must_use]
    pub fn none() -> QuiesceSpec {
        QuiesceSpec::new(QuiesceMode::None)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeName {
    None,
    Flush,
    Freeze,
    Command,
}

/// The plan file's shape of a quiesce, before validation.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuiesce {
    mode: ModeName,
    mounts: Option<Vec<PathBuf>>,
    quiesce_cmd: Option<Vec<String>>,
    status_cmd: Option<Vec<String>>,
    unquiesce_cmd: Option<Vec<String>>,
    status_interval: Option<String>,
    timeout: Option<String>,
    unquiesce_timeout: Option<String>,
}

fn check_mounts(mounts: Vec<PathBuf>) -> Result<Vec<PathBuf>, QuiesceSpecError> {
    if mounts.is_empty() {
        return Err(QuiesceSpecError::Mounts("none given"));
    }
    if mounts.len() > QUIESCE_MOUNTS_MAX {
        return Err(QuiesceSpecError::Mounts("more than QUIESCE_MOUNTS_MAX"));
    }
    if mounts.iter().any(|m| !m.is_absolute()) {
        return Err(QuiesceSpecError::Mounts("paths must be absolute"));
    }
    if mounts.iter().collect::<BTreeSet<_>>().len() != mounts.len() {
        return Err(QuiesceSpecError::Mounts("a mount is listed twice"));
    }
    Ok(mounts)
}

impl TryFrom<RawQuiesce> for QuiesceSpec {
    type Error = QuiesceSpecError;
    fn try_from(raw: RawQuiesce) -> Result<QuiesceSpec, QuiesceSpecError> {
        let mode_name = match raw.mode {
            ModeName::None => "none",
            ModeName::Flush => "flush",
            ModeName::Freeze => "freeze",
            ModeName::Command => "command",
        };
        let unused = |field| QuiesceSpecError::Unused {
            mode: mode_name,
            field,
        };
        let missing = |field| QuiesceSpecError::Missing {
            mode: mode_name,
            field,
        };
        let commands_set = [
            ("quiesce_cmd", raw.quiesce_cmd.is_some()),
            ("status_cmd", raw.status_cmd.is_some()),
            ("unquiesce_cmd", raw.unquiesce_cmd.is_some()),
            ("status_interval", raw.status_interval.is_some()),
        ];
        let mode = match raw.mode {
            ModeName::None | ModeName::Flush | ModeName::Freeze => {
                if let Some((field, _)) = commands_set.iter().find(|(_, set)| *set) {
                    return Err(unused(field));
                }
                match (raw.mode, raw.mounts) {
                    (ModeName::None, Some(_)) => return Err(unused("mounts")),
                    (ModeName::None, None) => QuiesceMode::None,
                    (_, None) => return Err(missing("mounts")),
                    (ModeName::Flush, Some(m)) => QuiesceMode::Flush {
                        mounts: check_mounts(m)?,
                    },
                    (_, Some(m)) => QuiesceMode::Freeze {
                        mounts: check_mounts(m)?,
                    },
                }
            }
            ModeName::Command => {
                if raw.mounts.is_some() {
                    return Err(unused("mounts"));
                }
                let quiesce =
                    HookSpec::new(raw.quiesce_cmd.ok_or_else(|| missing("quiesce_cmd"))?)?;
                let unquiesce =
                    HookSpec::new(raw.unquiesce_cmd.ok_or_else(|| missing("unquiesce_cmd"))?)?;
                let status = raw.status_cmd.map(HookSpec::new).transpose()?;
                let status_interval = match raw.status_interval {
                    Some(t) => Timeout::parse("status_interval", &t, HOOK_TIMEOUT_MAX_SECS)?,
                    None => Timeout::from_secs(QUIESCE_STATUS_INTERVAL_DEFAULT_SECS),
                };
                QuiesceMode::Command {
                    quiesce,
                    status,
                    unquiesce,
                    status_interval,
                }
            }
        };
        let mut spec = QuiesceSpec::new(mode);
        if let Some(t) = raw.timeout {
            spec.timeout = Timeout::parse("timeout", &t, QUIESCE_TIMEOUT_MAX_SECS)?;
        }
        if let Some(t) = raw.unquiesce_timeout {
            spec.unquiesce_timeout =
                Timeout::parse("unquiesce_timeout", &t, QUIESCE_TIMEOUT_MAX_SECS)?;
        }
        Ok(spec)
    }
}
