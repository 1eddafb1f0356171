//! Expanding a plan's activities into tasks (PLAN-05, PLAN-06, PLAN-13).
//!
//! Activities expand in definition order; each source is a literal path or a glob pattern
//! (globset, `literal_separator(true)`: `*` never crosses a `/`; `**` is refused). A pattern
//! is enumerated by a bounded walk below its literal directory, listing each directory once
//! through a [`VolumeFinder`]; its matches are taken in byte order. Each match gives one task
//! (one per match and region when the activity names `regions`; one task for all matches of
//! the activity when `group = true`). A literal that cannot be opened, a match that cannot be
//! opened, or a pattern matching nothing gives one `Skipped` task carrying the pattern and the
//! reason. The same plan and the same volumes give the same task list.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher};

use super::file::Plan;
use crate::limits::{SOURCE_WALK_ENTRIES_MAX, TASKS_PER_PLAN_MAX};
use crate::model::ExtentSpec;
use crate::quiesce::QuiesceSpec;
use crate::store::{BackupDay, JobId};

/// A source found by a [`VolumeFinder`]: the path the plan names, how the engine finds the
/// volume, and its size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourceInfo {
    /// The path (a literal, or a pattern's match).
    pub path: String,
    /// The volume's locator for the engine (`Engine::volume_by_locator`, or the path to
    /// attach).
    pub locator: String,
    /// Its size in bytes (file targets are created this large).
    pub size: u64,
}

/// Where sources are found: directory listings for patterns and opening a path for its size.
/// [`FsFinder`] looks at the file system; [`FakeFinder`] serves a fixed list, so tests need no
/// devices.
pub trait VolumeFinder: Send + Sync + fmt::Debug {
    /// The names of the entries of directory `dir` (names that are not UTF-8 are left out).
    ///
    /// # Errors
    /// When `dir` cannot be read (missing, not a directory, no permission).
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;

    /// Open `path` as a source and report its locator and size.
    ///
    /// # Errors
    /// When it cannot be opened.
    fn open(&self, path: &Path) -> io::Result<SourceInfo>;
}

/// The real file system: `read_dir` and opening the path read-only (block devices and
/// files; the size is where a seek to the end lands).
#[derive(Debug, Clone, Copy, Default)]
pub struct FsFinder;

impl VolumeFinder for FsFinder {
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                out.push(name);
            }
        }
        Ok(out)
    }

    fn open(&self, path: &Path) -> io::Result<SourceInfo> {
        use std::io::Seek;
        let mut f = std::fs::File::open(path)?;
        if f.metadata()?.is_dir() {
            return Err(io::Error::other("is a directory"));
        }
        let size = f.seek(io::SeekFrom::End(0))?;
        let p = path.to_string_lossy().into_owned();
        Ok(SourceInfo {
            path: p.clone(),
            locator: p,
            size,
        })
    }
}

/// A [`VolumeFinder`] over a fixed list of (path, locator, size): directories are the
/// paths' parents.
#[derive(Debug, Clone, Default)]
pub struct FakeFinder {
    volumes: BTreeMap<String, (String, u64)>,
}

impl FakeFinder {
    /// An empty finder.
    #[must_use]
    pub fn new() -> FakeFinder {
        FakeFinder::default()
    }

    /// Add a volume at the absolute `path`, found by the engine as `locator`.
    #[must_use]
    pub fn with(mut self, path: &str, locator: &str, size: u64) -> FakeFinder {
        self.volumes
            .insert(path.to_string(), (locator.to_string(), size));
        self
    }
}

impl VolumeFinder for FakeFinder {
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = BTreeSet::new();
        for p in self.volumes.keys() {
            if let Ok(rest) = Path::new(p).strip_prefix(dir) {
                if let Some(first) = rest.components().next() {
                    names.insert(first.as_os_str().to_string_lossy().into_owned());
                }
            }
        }
        if names.is_empty() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(names.into_iter().collect())
    }

    fn open(&self, path: &Path) -> io::Result<SourceInfo> {
        let p = path.to_string_lossy();
        match self.volumes.get(p.as_ref()) {
            Some((locator, size)) => Ok(SourceInfo {
                path: p.into_owned(),
                locator: locator.clone(),
                size: *size,
            }),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
}

/// Why a plan could not be expanded at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    /// More tasks than `TASKS_PER_PLAN_MAX`.
    #[error("the plan expands into more than {max} tasks", max = TASKS_PER_PLAN_MAX)]
    TooManyTasks,
    /// The walk for the patterns read more than `SOURCE_WALK_ENTRIES_MAX` entries.
    #[error("source pattern {pattern:?} reads more than {max} directory entries", max = SOURCE_WALK_ENTRIES_MAX)]
    WalkTooLarge {
        /// The pattern being walked.
        pattern: String,
    },
    /// A pattern that did not compile (checked when the plan was parsed, so not expected).
    #[error("source pattern {pattern:?}: {why}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// Why.
        why: String,
    },
}

/// Why a task is `Skipped` before it runs (PLAN-06).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Skip {
    /// A literal source, or a pattern's match, could not be opened.
    Unavailable {
        /// The operating system's message.
        why: String,
    },
    /// A pattern matched nothing.
    NoMatch,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::Unavailable { why } => write!(f, "cannot be opened: {why}"),
            Skip::NoMatch => f.write_str("matches nothing"),
        }
    }
}

/// One source of a task and the target it is copied to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskSource {
    /// The source.
    pub source: SourceInfo,
    /// The target file (PLAN-13).
    pub target: PathBuf,
}

/// One task: one cut of one source (or of several, for a grouped activity), maybe limited to
/// a region.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Task {
    /// Its number in the job, from 1, in creation order.
    pub index: u32,
    /// The activity it comes from.
    pub activity: String,
    /// The source entry of the plan it comes from (a literal or a pattern).
    pub pattern: String,
    /// The region, when the activity names regions.
    pub region: Option<String>,
    /// The region's extents; empty for whole sources.
    pub extents: Vec<ExtentSpec>,
    /// The sources and their targets (several only for a grouped task); empty when skipped.
    pub sources: Vec<TaskSource>,
    /// Whether it is one grouped cut.
    pub group: bool,
    /// How its sources are quiesced.
    #[serde(skip)]
    pub quiesce: QuiesceSpec,
    /// Why it is skipped, when it is.
    pub skip: Option<Skip>,
}

impl Task {
    /// The source as hooks are told it: its paths joined by `,`, or the pattern when skipped.
    #[must_use]
    pub fn source_label(&self) -> String {
        if self.sources.is_empty() {
            return self.pattern.clone();
        }
        self.sources
            .iter()
            .map(|s| s.source.path.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The targets joined by `,`.
    #[must_use]
    pub fn target_label(&self) -> Option<String> {
        (!self.sources.is_empty()).then(|| {
            self.sources
                .iter()
                .map(|s| s.target.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(",")
        })
    }

    /// Bytes of file targets this task creates.
    #[must_use]
    pub fn target_bytes(&self) -> u64 {
        self.sources
            .iter()
            .map(|s| s.source.size)
            .fold(0u64, u64::saturating_add)
    }
}

/// Whether `s` holds glob syntax.
#[must_use]
pub fn is_pattern(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

fn glob(pattern: &str) -> Result<GlobMatcher, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g: Glob| g.compile_matcher())
        .map_err(|e| e.to_string())
}

/// Check a source entry: an absolute path, a valid pattern, no `**`, no `.` or `..`
/// components.
///
/// # Errors
/// Why it is refused.
pub fn check_pattern(s: &str) -> Result<(), String> {
    if !s.starts_with('/') {
        return Err(format!("{s:?}: sources are absolute paths"));
    }
    if s.contains("**") {
        return Err(format!(
            "{s:?}: '**' is not supported; name each directory level"
        ));
    }
    if s.split('/').any(|c| c == "." || c == "..") {
        return Err(format!("{s:?}: '.' and '..' are not allowed"));
    }
    if is_pattern(s) {
        glob(s).map(|_| ()).map_err(|e| format!("{s:?}: {e}"))
    } else {
        Ok(())
    }
}

/// A matcher for region names (`"wal*"`).
///
/// # Errors
/// Why the pattern is refused.
pub fn region_matcher(pattern: &str) -> Result<GlobMatcher, String> {
    glob(pattern).map_err(|e| format!("{pattern:?}: {e}"))
}

/// The target name component of a source path (`{source}`): the path without its leading
/// `/`, each `/` and each character other than ASCII letters, digits, `.`, `_`, `-` written
/// as `_`, and a leading `.` as `_` (`/dev/vg0/db-a` → `dev_vg0_db-a`). Two sources that map to
/// one name make two tasks with one target, which `plan check` refuses (PLAN-13).
#[must_use]
pub fn source_component(path: &str) -> String {
    let mut out: String = path
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with('.') || out.is_empty() {
        out.insert(0, '_');
    }
    out
}

/// What target names are made of besides the plan: the job and its backup day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Naming {
    /// `{job}`.
    pub job: JobId,
    /// `{day}`.
    pub day: BackupDay,
}

/// The matches of one source entry: the opened sources, and the paths that could not be
/// opened with why.
struct Matches {
    found: Vec<SourceInfo>,
    failed: Vec<(String, String)>,
}

fn find(
    entry: &str,
    finder: &dyn VolumeFinder,
    budget: &mut usize,
) -> Result<Matches, ExpandError> {
    let mut m = Matches {
        found: Vec::new(),
        failed: Vec::new(),
    };
    if !is_pattern(entry) {
        match finder.open(Path::new(entry)) {
            Ok(s) => m.found.push(s),
            Err(e) => m.failed.push((entry.to_string(), e.to_string())),
        }
        return Ok(m);
    }
    let comps: Vec<&str> = entry.split('/').collect();
    let literal = comps.iter().take_while(|c| !is_pattern(c)).count();
    let base = if literal <= 1 {
        "/".to_string()
    } else {
        comps[..literal].join("/")
    };
    let mut frontier = vec![base];
    for level in literal..comps.len() {
        let partial = comps[..=level].join("/");
        let matcher = glob(&partial).map_err(|why| ExpandError::Pattern {
            pattern: entry.to_string(),
            why,
        })?;
        let mut next = Vec::new();
        for dir in &frontier {
            let Ok(names) = finder.list(Path::new(dir)) else {
                continue;
            };
            *budget = budget.saturating_sub(names.len());
            if *budget == 0 {
                return Err(ExpandError::WalkTooLarge {
                    pattern: entry.to_string(),
                });
            }
            for name in names {
                let path = if dir.ends_with('/') {
                    format!("{dir}{name}")
                } else {
                    format!("{dir}/{name}")
                };
                if matcher.is_match(&path) {
                    next.push(path);
                }
            }
        }
        next.sort();
        next.dedup();
        frontier = next;
    }
    for path in frontier {
        match finder.open(Path::new(&path)) {
            Ok(s) => m.found.push(s),
            Err(e) => m.failed.push((path, e.to_string())),
        }
    }
    Ok(m)
}

/// Expand `plan` into its tasks, numbered from 1 in creation order.
///
/// # Errors
/// [`ExpandError`] when the plan would make more than `TASKS_PER_PLAN_MAX` tasks or its
/// patterns read too many directory entries.
pub fn expand(
    plan: &Plan,
    finder: &dyn VolumeFinder,
    naming: Naming,
) -> Result<Vec<Task>, ExpandError> {
    let mut tasks: Vec<Task> = Vec::new();
    let mut budget = SOURCE_WALK_ENTRIES_MAX;
    let push = |tasks: &mut Vec<Task>, mut t: Task| -> Result<(), ExpandError> {
        if tasks.len() >= TASKS_PER_PLAN_MAX {
            return Err(ExpandError::TooManyTasks);
        }
        t.index = u32::try_from(tasks.len() + 1).unwrap_or(u32::MAX);
        tasks.push(t);
        Ok(())
    };
    for activity in &plan.activities {
        let skipped = |pattern: &str, skip: Skip| Task {
            index: 0,
            activity: activity.name.clone(),
            pattern: pattern.to_string(),
            region: None,
            extents: Vec::new(),
            sources: Vec::new(),
            group: activity.group,
            quiesce: activity.quiesce.clone(),
            skip: Some(skip),
        };
        let regions: Vec<_> = if activity.regions.is_empty() {
            Vec::new()
        } else {
            let matchers = activity
                .regions
                .iter()
                .map(|r| region_matcher(r))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|why| ExpandError::Pattern {
                    pattern: activity.regions.join(","),
                    why,
                })?;
            plan.regions
                .iter()
                .filter(|r| matchers.iter().any(|m| m.is_match(&r.name)))
                .collect()
        };
        let mut group: Vec<SourceInfo> = Vec::new();
        let mut group_pattern = String::new();
        for entry in &activity.sources {
            let m = find(entry, finder, &mut budget)?;
            if m.found.is_empty() && m.failed.is_empty() {
                push(&mut tasks, skipped(entry, Skip::NoMatch))?;
                continue;
            }
            for (path, why) in m.failed {
                push(&mut tasks, skipped(&path, Skip::Unavailable { why }))?;
            }
            if activity.group {
                if group_pattern.is_empty() {
                    group_pattern = entry.clone();
                } else {
                    group_pattern = format!("{group_pattern},{entry}");
                }
                for s in m.found {
                    if !group.iter().any(|g| g.path == s.path) {
                        group.push(s);
                    }
                }
                continue;
            }
            for s in m.found {
                let base = Task {
                    index: 0,
                    activity: activity.name.clone(),
                    pattern: entry.clone(),
                    region: None,
                    extents: Vec::new(),
                    sources: vec![TaskSource {
                        source: s,
                        target: PathBuf::new(),
                    }],
                    group: false,
                    quiesce: activity.quiesce.clone(),
                    skip: None,
                };
                if regions.is_empty() {
                    push(&mut tasks, base)?;
                } else {
                    for r in &regions {
                        let mut t = base.clone();
                        t.region = Some(r.name.clone());
                        t.extents.clone_from(&r.extents);
                        push(&mut tasks, t)?;
                    }
                }
            }
        }
        if !group.is_empty() {
            push(
                &mut tasks,
                Task {
                    index: 0,
                    activity: activity.name.clone(),
                    pattern: group_pattern,
                    region: None,
                    extents: Vec::new(),
                    sources: group
                        .into_iter()
                        .map(|s| TaskSource {
                            source: s,
                            target: PathBuf::new(),
                        })
                        .collect(),
                    group: true,
                    quiesce: activity.quiesce.clone(),
                    skip: None,
                },
            )?;
        }
    }
    for t in &mut tasks {
        let (index, activity, region) = (t.index, t.activity.clone(), t.region.clone());
        for s in &mut t.sources {
            let rendered = plan.destination.target.render(|name| match name {
                "dest" => plan.destination.path.to_string_lossy().into_owned(),
                "plan" => plan.name.clone(),
                "activity" => activity.clone(),
                "source" => source_component(&s.source.path),
                "region" => region.clone().unwrap_or_else(|| "all".to_string()),
                "day" => naming.day.to_string(),
                "job" => naming.job.to_string(),
                "task" => index.to_string(),
                _ => String::new(),
            });
            s.target = PathBuf::from(rendered);
        }
    }
    Ok(tasks)
}

/// Targets that two or more tasks map to, with the task numbers (PLAN-13), and targets that
/// are not absolute paths under no `..`.
#[must_use]
pub fn target_conflicts(tasks: &[Task]) -> Vec<String> {
    let mut seen: BTreeMap<&Path, Vec<u32>> = BTreeMap::new();
    let mut problems = Vec::new();
    for t in tasks {
        for s in &t.sources {
            if !s.target.is_absolute()
                || s.target
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                problems.push(format!(
                    "task {}: target {} is not an absolute path without '..'",
                    t.index,
                    s.target.display()
                ));
            }
            seen.entry(&s.target).or_default().push(t.index);
        }
    }
    for (target, users) in seen {
        if users.len() > 1 {
            let list: Vec<String> = users.iter().map(u32::to_string).collect();
            problems.push(format!(
                "target {} is used by tasks {} (make the target template tell them apart)",
                target.display(),
                list.join(", ")
            ));
        }
    }
    problems
}
