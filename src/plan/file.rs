//! The plan file (docs/orchestration.md, section 3.1) and the part of the global
//! `timezero.toml` the plan layer reads: TOML through serde, `deny_unknown_fields` everywhere,
//! so a typo is an error with its line and column, never a silently ignored setting.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::civil::Time;
use jiff::tz::TimeZone;
use sha2::{Digest, Sha256};

use crate::hook::HookSpec;
use crate::ids::GrainSize;
use crate::limits::PLAN_NAME_BYTES_MAX;
use crate::model::{CopyMode, ExtentSpec};
use crate::quiesce::QuiesceSpec;

/// Why a plan file or the global configuration was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlanError {
    /// The file could not be read.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`read`).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The TOML is malformed, a field is unknown, missing or has a bad value. `line` and
    /// `column` (from 1) point at the offending text when TOML knows where it is.
    #[error("{}{}: {message}", file_prefix(path.as_deref()), position(*line, *column))]
    Parse {
        /// The file, when the text came from one.
        path: Option<PathBuf>,
        /// The line, from 1.
        line: Option<usize>,
        /// The column, from 1.
        column: Option<usize>,
        /// TOML's message, naming the field.
        message: String,
    },
    /// The file parses, but a value contradicts another (an activity naming a region that
    /// does not exist, two regions with one name, ...).
    #[error("{field}: {why}")]
    Invalid {
        /// The field, in the file's spelling (`activity[2].regions`).
        field: String,
        /// Why.
        why: String,
    },
}

fn file_prefix(path: Option<&Path>) -> String {
    path.map_or_else(|| "plan".to_string(), |p| p.display().to_string())
}

fn position(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl PlanError {
    fn from_toml(text: &str, path: Option<&Path>, e: &toml::de::Error) -> PlanError {
        let (line, column) = match e.span() {
            Some(span) => {
                let before = &text.as_bytes()[..span.start.min(text.len())];
                let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                let line_start = before
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1);
                (Some(line), Some(before.len() - line_start + 1))
            }
            None => (None, None),
        };
        PlanError::Parse {
            path: path.map(Path::to_path_buf),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    }

    fn invalid(field: impl Into<String>, why: impl Into<String>) -> PlanError {
        PlanError::Invalid {
            field: field.into(),
            why: why.into(),
        }
    }
}

impl From<PlanError> for crate::Error {
    fn from(e: PlanError) -> crate::Error {
        crate::Error::invalid("plan", e.to_string())
    }
}

/// A byte size in a plan file: `"64KiB"`, `"200GiB"`, `4096`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

impl Size {
    /// Parse `"64KiB"`, `"1.5G"`, `"4096"` (binary multiples, as everywhere in timezero).
    ///
    /// # Errors
    /// A message naming the text.
    pub fn parse(text: &str) -> Result<Size, String> {
        crate::units::parse_size(text)
            .map(Size)
            .map_err(|e| e.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Size(n)),
            Raw::Text(t) => Size::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// The free space a destination must keep (PLAN-04): bytes, or a share of its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFree {
    /// At least this many bytes stay free.
    Bytes(u64),
    /// At least this many percent (0..=100) of the file system stay free.
    Percent(u8),
}

impl MinFree {
    /// Parse `"10%"` or a size such as `"200GiB"` (a plan file may also give a number of
    /// bytes).
    ///
    /// # Errors
    /// A message naming the text.
    pub fn parse(text: &str) -> Result<MinFree, String> {
        match text.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= 100 => Ok(MinFree::Percent(n)),
                _ => Err(format!("min_free {text:?}: a percentage is 0% to 100%")),
            },
            None => Size::parse(text).map(|s| MinFree::Bytes(s.0)),
        }
    }

    /// The bytes to keep free on a file system of `total` bytes.
    #[must_use]
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => {
                u64::try_from(u128::from(total) * u128::from(p) / 100).unwrap_or(u64::MAX)
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for MinFree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MinFree, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(MinFree::Bytes(n)),
            Raw::Text(t) => MinFree::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// A daily window `HH:MM-HH:MM` in the plan's zone (PLAN-02): half-open (the start is in,
/// the end is out), crossing midnight when the end is earlier than the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The first minute in the window.
    pub start: Time,
    /// The first minute after it.
    pub end: Time,
}

impl Window {
    /// Parse `"21:30-06:30"`. Start and end must differ.
    ///
    /// # Errors
    /// A message naming the text.
    pub fn parse(text: &str) -> Result<Window, String> {
        let bad = || format!("window {text:?} is not HH:MM-HH:MM (e.g. \"21:30-06:30\")");
        let (a, b) = text.trim().split_once('-').ok_or_else(bad)?;
        let hm = |s: &str| -> Result<Time, String> {
            let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
            if h.len() != 2 || m.len() != 2 {
                return Err(bad());
            }
            let h: i8 = h.parse().map_err(|_| bad())?;
            let m: i8 = m.parse().map_err(|_| bad())?;
            Time::new(h, m, 0, 0).map_err(|_| bad())
        };
        let (start, end) = (hm(a)?, hm(b)?);
        if start == end {
            return Err(format!(
                "window {text:?} is empty (start equals end); leave it out or set \"\" for none"
            ));
        }
        Ok(Window { start, end })
    }

    /// Whether the civil time `t` is in the window.
    #[must_use]
    pub fn contains(&self, t: Time) -> bool {
        if self.start < self.end {
            self.start <= t && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start.hour(),
            self.start.minute(),
            self.end.hour(),
            self.end.minute()
        )
    }
}

/// A window setting: a window, or `""` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSetting(pub Option<Window>);

impl<'de> serde::Deserialize<'de> for WindowSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<WindowSetting, D::Error> {
        let t = String::deserialize(d)?;
        if t.trim().is_empty() {
            return Ok(WindowSetting(None));
        }
        Window::parse(&t)
            .map(|w| WindowSetting(Some(w)))
            .map_err(serde::de::Error::custom)
    }
}

/// The placeholders a target template may use.
pub const TARGET_PLACEHOLDERS: [&str; 8] = [
    "dest", "plan", "activity", "source", "region", "day", "job", "task",
];

/// The default target template (PLAN-13).
pub const TARGET_TEMPLATE_DEFAULT: &str = "{dest}/{plan}/{source}/{day}-{job}-{task}.img";

/// A target name template such as `{dest}/{plan}/{source}/{day}-{job}-{task}.img` (PLAN-13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetTemplate(String);

impl TargetTemplate {
    /// Check that every `{name}` is one of [`TARGET_PLACEHOLDERS`] and braces are balanced.
    ///
    /// # Errors
    /// A message naming the placeholder.
    pub fn parse(text: &str) -> Result<TargetTemplate, String> {
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(format!("target {text:?}: '}}' without '{{'"));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("target {text:?}: '{{' without '}}'"))?;
            let name = &after[..close];
            if !TARGET_PLACEHOLDERS.contains(&name) {
                return Err(format!(
                    "target {text:?}: unknown placeholder {{{name}}} (known: {})",
                    TARGET_PLACEHOLDERS.join(", ")
                ));
            }
            rest = &after[close + 1..];
        }
        Ok(TargetTemplate(text.to_string()))
    }

    /// The template text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The template with each `{name}` replaced by `value(name)`.
    #[must_use]
    pub fn render(&self, value: impl Fn(&str) -> String) -> String {
        let mut out = String::with_capacity(self.0.len() + 32);
        let mut rest = self.0.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').unwrap_or(after.len());
            out.push_str(&value(&after[..close]));
            rest = after.get(close + 1..).unwrap_or("");
        }
        out.push_str(rest);
        out
    }
}

impl Default for TargetTemplate {
    fn default() -> TargetTemplate {
        TargetTemplate(TARGET_TEMPLATE_DEFAULT.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for TargetTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TargetTemplate, D::Error> {
        let t = String::deserialize(d)?;
        TargetTemplate::parse(&t).map_err(serde::de::Error::custom)
    }
}

/// What happens to the tasks not yet started after a task failed (PLAN-11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTaskError {
    /// They are canceled (default).
    #[default]
    Halt,
    /// They run.
    Continue,
}

/// Who writes to a source while it is being copied (section 1.1, step 7; PLAN-15, PLAN-16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Writes {
    /// Writers go through the engine (`Engine::write`, NBD): the quiesce ends right after the
    /// cut (default).
    #[default]
    Engine,
    /// A kernel-mounted file system writes to the raw source: the source stays frozen until
    /// the copy is `Completed`. Needs `mode = "copy"` and `quiesce.mode = "freeze"`.
    Direct,
}

/// `[checks]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    /// The plan's window; `None` (the key left out) means the global one, `Some(none)` (`""`)
    /// means always open (PLAN-02).
    pub window: Option<WindowSetting>,
    /// Free space to keep on the destination (PLAN-04); none by default.
    pub min_free: Option<MinFree>,
    /// Whether the destination must be a mount point (PLAN-03); default `true`.
    #[serde(default = "yes")]
    pub require_mount: bool,
}

impl Default for Checks {
    fn default() -> Checks {
        Checks {
            window: None,
            min_free: None,
            require_mount: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// `[destination]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// The directory targets are created under (absolute).
    pub path: PathBuf,
    /// The identity `.timezero-dest` in `path` must hold (PLAN-03).
    pub id: String,
    /// The target name template (default [`TARGET_TEMPLATE_DEFAULT`]).
    #[serde(default)]
    pub target: TargetTemplate,
    /// Whether images get a checksum (catalog; parsed here).
    #[serde(default)]
    pub verify: bool,
}

/// `[session]`: how each task's sessions are established and copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSettings {
    /// Copy or nocopy.
    pub mode: CopyMode,
    /// The grain.
    pub grain: GrainSize,
    /// Who writes to the sources (PLAN-15).
    pub writes: Writes,
    /// The copier's rate limit in bytes per second (`None` = unlimited).
    pub copy_rate: Option<u64>,
    /// The copier's threads.
    pub copy_threads: usize,
}

impl Default for SessionSettings {
    fn default() -> SessionSettings {
        SessionSettings {
            mode: CopyMode::Copy,
            grain: GrainSize::DEFAULT,
            writes: Writes::Engine,
            copy_rate: None,
            copy_threads: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeName {
    Copy,
    Nocopy,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    mode: Option<ModeName>,
    grain: Option<Size>,
    writes: Option<Writes>,
    copy_rate: Option<Size>,
    copy_threads: Option<usize>,
}

/// A named list of extents (\[000\]'s "domains"), used by activities through `regions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// The name.
    pub name: String,
    /// The extents, as `establish --extent` writes them.
    pub extents: Vec<ExtentSpec>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    name: String,
    extents: Vec<String>,
}

/// One `[[activity]]`: sources (literal paths or patterns) with how they are quiesced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    /// The name.
    pub name: String,
    /// Literal paths and glob patterns, in order.
    pub sources: Vec<String>,
    /// One task (one cut) for all matches.
    pub group: bool,
    /// Region name patterns: one task per source and matching region.
    pub regions: Vec<String>,
    /// How the sources are quiesced.
    pub quiesce: QuiesceSpec,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActivity {
    name: String,
    sources: Vec<String>,
    #[serde(default)]
    group: bool,
    #[serde(default)]
    regions: Vec<String>,
    quiesce: Option<QuiesceSpec>,
}

/// `[hooks]` (HOOK-01): each stage's hook, when the plan has one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Before the first task.
    pub plan_pre: Option<HookSpec>,
    /// Before each task's quiesce.
    pub task_pre: Option<HookSpec>,
    /// After each cut and thaw.
    pub after_cut: Option<HookSpec>,
    /// After each task.
    pub task_post: Option<HookSpec>,
    /// After the last task, with the task list.
    pub plan_post: Option<HookSpec>,
    /// After each task and after the plan, always.
    pub finally: Option<HookSpec>,
}

/// `[retention]` (CAT-05; parsed here, applied by the catalog).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep the newest N images.
    pub keep_last: Option<u32>,
    /// Keep the newest image of each of the last N backup days.
    pub keep_daily: Option<u32>,
    /// ... of each of the last N weeks.
    pub keep_weekly: Option<u32>,
    /// ... of each of the last N months.
    pub keep_monthly: Option<u32>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: String,
    table: Option<PathBuf>,
    timezone: Option<String>,
    client: Option<String>,
    #[serde(default)]
    on_task_error: OnTaskError,
    max_jobs: Option<u32>,
    #[serde(default)]
    checks: Checks,
    destination: Destination,
    session: Option<RawSession>,
    #[serde(default)]
    region: Vec<RawRegion>,
    #[serde(default)]
    activity: Vec<RawActivity>,
    #[serde(default)]
    hooks: Hooks,
    retention: Option<Retention>,
}

/// A parsed and validated plan, with the text it came from (PLAN-18).
#[derive(Debug, Clone)]
pub struct Plan {
    /// The plan's name (`{plan}` in target names).
    pub name: String,
    /// The activity table, as the daemon holds it.
    pub table: Option<PathBuf>,
    /// The zone of the window and of civil times (default UTC).
    pub timezone: TimeZone,
    /// For client limits.
    pub client: Option<String>,
    /// PLAN-11.
    pub on_task_error: OnTaskError,
    /// Jobs of this plan at once (1..=999, default 1).
    pub max_jobs: u32,
    /// `[checks]`.
    pub checks: Checks,
    /// `[destination]`.
    pub destination: Destination,
    /// `[session]`.
    pub session: SessionSettings,
    /// `[[region]]`, in order.
    pub regions: Vec<Region>,
    /// `[[activity]]`, in order.
    pub activities: Vec<Activity>,
    /// `[hooks]`.
    pub hooks: Hooks,
    /// `[retention]`.
    pub retention: Option<Retention>,
    /// The file's text, as parsed.
    pub text: String,
    /// The SHA-256 of `text`.
    pub sha256: [u8; 32],
}

impl Plan {
    /// Parse a plan from its TOML text.
    ///
    /// # Errors
    /// [`PlanError::Parse`] with line and column, [`PlanError::Invalid`] for values that
    /// contradict each other.
    pub fn parse(text: &str) -> Result<Plan, PlanError> {
        Plan::parse_inner(text, None)
    }

    /// Read and parse the plan file at `path`.
    ///
    /// # Errors
    /// [`PlanError::Io`], and as [`Plan::parse`] (naming the file).
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|e| PlanError::Io {
            op: "read",
            path: path.to_path_buf(),
            source: Arc::new(e),
        })?;
        Plan::parse_inner(&text, Some(path))
    }

    /// The SHA-256 of the plan's text as 64 lowercase hex digits.
    #[must_use]
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn parse_inner(text: &str, path: Option<&Path>) -> Result<Plan, PlanError> {
        let raw: RawPlan =
            toml::from_str(text).map_err(|e| PlanError::from_toml(text, path, &e))?;
        check_name("name", &raw.name)?;
        let timezone = match &raw.timezone {
            Some(z) => TimeZone::get(z)
                .map_err(|e| PlanError::invalid("timezone", format!("{z:?}: {e}")))?,
            None => TimeZone::UTC,
        };
        let max_jobs = raw.max_jobs.unwrap_or(1);
        if !(1..=crate::limits::JOBS_PER_PLAN_MAX).contains(&max_jobs) {
            return Err(PlanError::invalid(
                "max_jobs",
                format!(
                    "{max_jobs} is out of range (1 to {})",
                    crate::limits::JOBS_PER_PLAN_MAX
                ),
            ));
        }
        if !raw.destination.path.is_absolute() {
            return Err(PlanError::invalid(
                "destination.path",
                "must be an absolute path",
            ));
        }
        if raw.destination.id.trim().is_empty() {
            return Err(PlanError::invalid("destination.id", "must not be empty"));
        }
        let session = session_settings(raw.session)?;
        let regions = regions(raw.region, session.grain)?;
        let activities = activities(raw.activity, &regions)?;
        Ok(Plan {
            name: raw.name,
            table: raw.table,
            timezone,
            client: raw.client,
            on_task_error: raw.on_task_error,
            max_jobs,
            checks: raw.checks,
            destination: raw.destination,
            session,
            regions,
            activities,
            hooks: raw.hooks,
            retention: raw.retention,
            text: text.to_string(),
            sha256: Sha256::digest(text.as_bytes()).into(),
        })
    }
}

/// A plan, region or activity name: 1..=`PLAN_NAME_BYTES_MAX` ASCII letters, digits, `.`, `_`
/// or `-`, not starting with `.` or `-` (it becomes part of file and group names).
fn check_name(field: &str, name: &str) -> Result<(), PlanError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty()
        || name.len() > PLAN_NAME_BYTES_MAX
        || !name.chars().all(ok)
        || name.starts_with(['.', '-'])
    {
        return Err(PlanError::invalid(
            field,
            format!(
                "{name:?}: 1 to {PLAN_NAME_BYTES_MAX} ASCII letters, digits, '.', '_' or '-', \
                 not starting with '.' or '-'"
            ),
        ));
    }
    Ok(())
}

fn session_settings(raw: Option<RawSession>) -> Result<SessionSettings, PlanError> {
    let mut s = SessionSettings::default();
    let Some(raw) = raw else { return Ok(s) };
    if let Some(m) = raw.mode {
        s.mode = match m {
            ModeName::Copy => CopyMode::Copy,
            ModeName::Nocopy => CopyMode::NoCopy,
        };
    }
    if let Some(g) = raw.grain {
        s.grain =
            GrainSize::new(g.0).map_err(|e| PlanError::invalid("session.grain", e.to_string()))?;
    }
    if let Some(w) = raw.writes {
        s.writes = w;
    }
    if let Some(r) = raw.copy_rate {
        if r.0 == 0 {
            return Err(PlanError::invalid("session.copy_rate", "must be above 0"));
        }
        s.copy_rate = Some(r.0);
    }
    if let Some(t) = raw.copy_threads {
        if !(1..=64).contains(&t) {
            return Err(PlanError::invalid("session.copy_threads", "1 to 64"));
        }
        s.copy_threads = t;
    }
    Ok(s)
}

fn regions(raw: Vec<RawRegion>, grain: GrainSize) -> Result<Vec<Region>, PlanError> {
    let mut out: Vec<Region> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let field = format!("region[{}]", i + 1);
        check_name(&format!("{field}.name"), &r.name)?;
        if out.iter().any(|o| o.name == r.name) {
            return Err(PlanError::invalid(
                format!("{field}.name"),
                format!("{:?} is defined twice", r.name),
            ));
        }
        if r.extents.is_empty() || r.extents.len() > crate::limits::EXTENTS_PER_SESSION_MAX {
            return Err(PlanError::invalid(
                format!("{field}.extents"),
                format!(
                    "1 to {} extents per region",
                    crate::limits::EXTENTS_PER_SESSION_MAX
                ),
            ));
        }
        let extents = r
            .extents
            .iter()
            .map(|e| ExtentSpec::parse(e))
            .collect::<crate::Result<Vec<_>>>()
            .map_err(|e| PlanError::invalid(format!("{field}.extents"), e.to_string()))?;
        let g = grain.bytes();
        if let Some(e) = extents
            .iter()
            .find(|e| e.source_offset % g != 0 || e.target_offset % g != 0 || e.len % g != 0)
        {
            return Err(PlanError::invalid(
                format!("{field}.extents"),
                format!(
                    "{}:{}@{} is not aligned to the grain ({g} bytes)",
                    e.source_offset, e.len, e.target_offset
                ),
            ));
        }
        out.push(Region {
            name: r.name,
            extents,
        });
    }
    Ok(out)
}

fn activities(raw: Vec<RawActivity>, regions: &[Region]) -> Result<Vec<Activity>, PlanError> {
    let mut out: Vec<Activity> = Vec::with_capacity(raw.len());
    for (i, a) in raw.into_iter().enumerate() {
        let field = format!("activity[{}]", i + 1);
        check_name(&format!("{field}.name"), &a.name)?;
        if out.iter().any(|o| o.name == a.name) {
            return Err(PlanError::invalid(
                format!("{field}.name"),
                format!("{:?} is defined twice", a.name),
            ));
        }
        if a.sources.is_empty() {
            return Err(PlanError::invalid(
                format!("{field}.sources"),
                "names no source",
            ));
        }
        for s in &a.sources {
            super::expand::check_pattern(s)
                .map_err(|why| PlanError::invalid(format!("{field}.sources"), why))?;
        }
        if a.group && !a.regions.is_empty() {
            return Err(PlanError::invalid(
                format!("{field}.regions"),
                "a grouped activity covers whole sources; regions and group = true exclude \
                 each other",
            ));
        }
        for r in &a.regions {
            let m = super::expand::region_matcher(r)
                .map_err(|why| PlanError::invalid(format!("{field}.regions"), why))?;
            if !regions.iter().any(|g| m.is_match(&g.name)) {
                return Err(PlanError::invalid(
                    format!("{field}.regions"),
                    format!("{r:?} matches no [[region]]"),
                ));
            }
        }
        out.push(Activity {
            name: a.name,
            sources: a.sources,
            group: a.group,
            regions: a.regions,
            quiesce: a.quiesce.unwrap_or_else(QuiesceSpec::none),
        });
    }
    Ok(out)
}

/// The part of the global `timezero.toml` the plan layer reads: whether backups may run at
/// all (PLAN-01) and the default window (PLAN-02). The other sections belong to other layers;
/// they are accepted here by name (any other key is an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalConfig {
    /// `backups_allowed` (default `true`).
    pub backups_allowed: bool,
    /// `window`: the default window of plans that set none; `None` = always open.
    pub window: Option<Window>,
}

impl Default for GlobalConfig {
    fn default() -> GlobalConfig {
        GlobalConfig {
            backups_allowed: true,
            window: None,
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(
    dead_code,
    reason = "the other layers' sections are accepted, not read"
)]
struct RawGlobal {
    backups_allowed: Option<bool>,
    window: Option<WindowSetting>,
    tables: Option<toml::Value>,
    limits: Option<toml::Value>,
    retry: Option<toml::Value>,
    newday: Option<toml::Value>,
    history_days: Option<toml::Value>,
    broker: Option<toml::Value>,
}

impl GlobalConfig {
    /// Parse the global configuration's text.
    ///
    /// # Errors
    /// [`PlanError::Parse`] with line and column.
    pub fn parse(text: &str) -> Result<GlobalConfig, PlanError> {
        GlobalConfig::parse_inner(text, None)
    }

    /// Read and parse `path`; a missing file is the default configuration.
    ///
    /// # Errors
    /// [`PlanError::Io`], [`PlanError::Parse`].
    pub fn load(path: &Path) -> Result<GlobalConfig, PlanError> {
        match std::fs::read_to_string(path) {
            Ok(text) => GlobalConfig::parse_inner(&text, Some(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(GlobalConfig::default()),
            Err(e) => Err(PlanError::Io {
                op: "read",
                path: path.to_path_buf(),
                source: Arc::new(e),
            }),
        }
    }

    fn parse_inner(text: &str, path: Option<&Path>) -> Result<GlobalConfig, PlanError> {
        let raw: RawGlobal =
            toml::from_str(text).map_err(|e| PlanError::from_toml(text, path, &e))?;
        Ok(GlobalConfig {
            backups_allowed: raw.backups_allowed.unwrap_or(true),
            window: raw.window.and_then(|w| w.0),
        })
    }
}

/// The window that applies to `plan` under `global`: the plan's own when it sets one (`""`
/// meaning none), else the global one (PLAN-02).
#[must_use]
pub fn effective_window(plan: &Plan, global: &GlobalConfig) -> Option<Window> {
    match plan.checks.window {
        Some(WindowSetting(w)) => w,
        None => global.window,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_min_free_parse_bytes_and_percentages() {
        assert_eq!(Size::parse("64KiB"), Ok(Size(64 << 10)));
        assert_eq!(Size::parse("200GiB"), Ok(Size(200 << 30)));
        assert!(Size::parse("ten").is_err());
        assert_eq!(MinFree::parse("10%"), Ok(MinFree::Percent(10)));
        assert_eq!(MinFree::parse("1MiB"), Ok(MinFree::Bytes(1 << 20)));
        assert!(MinFree::parse("101%").is_err());
        assert_eq!(MinFree::Percent(10).bytes(1000), 100);
        assert_eq!(MinFree::Percent(100).bytes(u64::MAX), u64::MAX);
    }

    #[test]
    fn target_templates_know_their_placeholders() {
        let t = TargetTemplate::parse("{dest}/{plan}/{source}-{task}.img").unwrap();
        let out = t.render(|n| format!("<{n}>"));
        assert_eq!(out, "<dest>/<plan>/<source>-<task>.img");
        assert!(TargetTemplate::parse("{dest}/{x}.img").is_err());
        assert!(TargetTemplate::parse("{dest/a").is_err());
        assert!(TargetTemplate::parse("dest}/a").is_err());
    }

    #[test]
    fn a_window_crossing_midnight_is_half_open() {
        let w = Window::parse("21:30-06:30").unwrap();
        let t = |h, m| Time::new(h, m, 0, 0).unwrap();
        assert!(w.contains(t(23, 0)) && w.contains(t(6, 29)) && w.contains(t(21, 30)));
        assert!(!w.contains(t(6, 30)) && !w.contains(t(12, 0)));
        let day = Window::parse("08:00-17:00").unwrap();
        assert!(day.contains(t(8, 0)) && !day.contains(t(17, 0)) && !day.contains(t(7, 59)));
        assert_eq!(w.to_string(), "21:30-06:30");
    }
}
