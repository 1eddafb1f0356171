//! What a plan says about one hook: its command, whether it goes through a shell, its limits
//! and what its failure means. Deserialised from the plan file's TOML shape
//! (docs/orchestration.md, section 3.1), e.g.
//! `task_pre = { run = ["notify", "start"], on_failure = "warn", timeout = "2m" }`.

use std::fmt;

use jiff::SignedDuration;

use crate::limits::{
    HOOK_ARGS_MAX, HOOK_KILL_GRACE_MAX_SECS, HOOK_KILL_GRACE_SECS, HOOK_TIMEOUT_DEFAULT_SECS,
    HOOK_TIMEOUT_MAX_SECS,
};

/// Why a hook or quiesce setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `run` is empty, or its first element (the program) is empty.
    #[error("hook `run` must name a program (a non-empty first element)")]
    NoProgram,
    /// More arguments than `HOOK_ARGS_MAX`.
    #[error("hook `run` has {0} elements; at most {max} are allowed", max = HOOK_ARGS_MAX)]
    TooManyArgs(usize),
    /// An argument holds a NUL byte, which no program can receive.
    #[error("hook argument {0} contains a NUL byte")]
    NulInArg(usize),
    /// A duration that is not text such as `30s`, `2m`, `1h` or `1h30m`.
    #[error("{what} {text:?} is not a duration such as \"30s\", \"2m\" or \"1h\"")]
    Duration {
        /// Which setting (`timeout`, `kill_grace`, ...).
        what: &'static str,
        /// The text given.
        text: String,
    },
    /// A duration of zero or less, or above its limit.
    #[error("{what} {value} is out of range (more than 0 s, at most {max_secs} s)")]
    DurationRange {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: SignedDuration,
        /// Its upper limit in seconds.
        max_secs: u64,
    },
}

/// A positive duration of a hook or quiesce setting, written `"30s"`, `"2m"`, `"1h"` or
/// `"1h30m"` in a plan file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timeout(SignedDuration);

impl Timeout {
    /// A duration of `secs` seconds (no range check: the limits apply to what plans write).
    #[must_use]
    pub const fn from_secs(secs: u64) -> Timeout {
        // Limits are far below i64::MAX seconds; a larger value saturates.
        let secs = if secs > i64::MAX as u64 {
            i64::MAX
        } else {
            secs as i64
        };
        Timeout(SignedDuration::from_secs(secs))
    }

    /// A positive duration; `None` for zero or less.
    #[must_use]
    pub fn from_duration(d: SignedDuration) -> Option<Timeout> {
        (d.is_positive()).then_some(Timeout(d))
    }

    /// Parse `text` (`"30s"`, `"2m"`, `"1h30m"`) for the setting `what`, refusing zero,
    /// negative values and values above `max_secs`.
    ///
    /// # Errors
    /// [`SpecError::Duration`] for text that is no duration, [`SpecError::DurationRange`] out of
    /// range.
    pub fn parse(what: &'static str, text: &str, max_secs: u64) -> Result<Timeout, SpecError> {
        let value: SignedDuration = text.trim().parse().map_err(|_| SpecError::Duration {
            what,
            text: text.to_string(),
        })?;
        let max = Timeout::from_secs(max_secs).0;
        if value.is_negative() || value.is_zero() || value > max {
            return Err(SpecError::DurationRange {
                what,
                value,
                max_secs,
            });
        }
        Ok(Timeout(value))
    }

    /// The duration.
    #[must_use]
    pub fn get(self) -> SignedDuration {
        self.0
    }
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

/// What a failed hook does to its task or plan (HOOK-08). Default `fail`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// The task (or, for plan hooks, the job) fails.
    #[default]
    Fail,
    /// The failure is recorded as a warning; the job ends with status 1 (partial).
    Warn,
    /// The failure is recorded and otherwise ignored.
    Ignore,
}

/// One hook as a plan declares it (HOOK-05..09). Build it from the plan file (serde) or with
/// [`HookSpec::new`]; either way it has passed [`HookSpec::validate`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "RawHookSpec")]
pub struct HookSpec {
    /// The program and its arguments, run without a shell (HOOK-06): `$HOME` in an argument
    /// arrives as those five characters. With [`HookSpec::shell`] the first element is a shell
    /// script and the others are its positional parameters `$1`, `$2`, ....
    pub run: Vec<String>,
    /// Run `run[0]` as a script of `/bin/sh -c` (default `false`).
    pub shell: bool,
    /// When the hook's process group gets SIGTERM (default `HOOK_TIMEOUT_DEFAULT_SECS`).
    pub timeout: Timeout,
    /// Time between SIGTERM and SIGKILL (default `HOOK_KILL_GRACE_SECS`).
    pub kill_grace: Timeout,
    /// What a failure means for the task or job (default [`OnFailure::Fail`]).
    pub on_failure: OnFailure,
}

/// The plan file's shape of a hook, before validation.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHookSpec {
    run: Vec<String>,
    #[serde(default)]
    shell: bool,
    timeout: Option<String>,
    kill_grace: Option<String>,
    #[serde(default)]
    on_failure: OnFailure,
}

impl TryFrom<RawHookSpec> for HookSpec {
    type Error = SpecError;
    fn try_from(raw: RawHookSpec) -> Result<HookSpec, SpecError> {
        let mut spec = HookSpec::new(raw.run)?;
        spec.shell = raw.shell;
        spec.on_failure = raw.on_failure;
        if let Some(t) = raw.timeout {
            spec.timeout = Timeout::parse("timeout", &t, HOOK_TIMEOUT_MAX_SECS)?;
        }
        if let Some(t) = raw.kill_grace {
            spec.kill_grace = Timeout::parse("kill_grace", &t, HOOK_KILL_GRACE_MAX_SECS)?;
        }
        spec.validate()?;
        Ok(spec)
    }
}

impl HookSpec {
    /// A hook running `run` without a shell, with the default timeout, kill grace and
    /// `on_failure = "fail"`.
    ///
    /// # Errors
    /// As [`HookSpec::validate`].
    pub fn new<S: Into<String>>(run: impl IntoIterator<Item = S>) -> Result<HookSpec, SpecError> {
        let spec = HookSpec {
            run: run.into_iter().map(Into::into).collect(),
            shell: false,
            timeout: Timeout::from_secs(HOOK_TIMEOUT_DEFAULT_SECS),
            kill_grace: Timeout::from_secs(HOOK_KILL_GRACE_SECS),
            on_failure: OnFailure::Fail,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Check the command: a program, at most `HOOK_ARGS_MAX` elements, no NUL byte; and the
    /// durations: positive and within their limits.
    ///
    /// # Errors
    /// [`SpecError`] naming the first rule broken.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.run.first().is_none_or(String::is_empty) {
            return Err(SpecError::NoProgram);
        }
        if self.run.len() > HOOK_ARGS_MAX {
            return Err(SpecError::TooManyArgs(self.run.len()));
        }
        if let Some(i) = self.run.iter().position(|a| a.contains('\0')) {
            return Err(SpecError::NulInArg(i));
        }
        for (what, value, max_secs) in [
            ("timeout", self.timeout, HOOK_TIMEOUT_MAX_SECS),
            ("kill_grace", self.kill_grace, HOOK_KILL_GRACE_MAX_SECS),
        ] {
            if value.get().is_negative()
                || value.get().is_zero()
                || value > Timeout::from_secs(max_secs)
            {
                return Err(SpecError::DurationRange {
                    what,
                    value: value.get(),
                    max_secs,
                });
            }
        }
        Ok(())
    }

    /// The same hook with another timeout (used by quiesce commands, whose limit is the
    /// quiesce deadline).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Timeout) -> HookSpec {
        self.timeout = timeout;
        self
    }

    /// The program as the hook names it (`run[0]`, or `/bin/sh` with `shell = true`).
    #[must_use]
    pub fn program(&self) -> &str {
        if self.shell {
            SHELL
        } else {
            self.run.first().map_or("", String::as_str)
        }
    }

    /// The argv that is executed: `run` as it is, or with `shell = true`
    /// `/bin/sh -c run[0] sh run[1..]` (so `run[1..]` are `$1`, `$2`, ...).
    #[must_use]
    pub fn argv(&self) -> Vec<String> {
        if self.shell {
            let mut argv = vec![SHELL.to_string(), "-c".to_string()];
            argv.push(self.run.first().cloned().unwrap_or_default());
            argv.push("sh".to_string());
            argv.extend(self.run.iter().skip(1).cloned());
            argv
        } else {
            self.run.clone()
        }
    }
}

/// The shell of `shell = true`.
const SHELL: &str = "/bin/sh";
