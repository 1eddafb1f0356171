//! The resource broker (JOB-02, JOB-03, JOB-05): a pure pass over the queue that grants each
//! ready job all of its resources or none.
//!
//! A pass walks the queue in order (higher priority first, then creation, then id), keeps its own
//! copy of the counters, and for each request checks every resource against its limit before it
//! counts any of them, so a refused request leaves every counter as it was. With
//! `strict = false` a job may take resources that a blocked job ahead of it cannot use; with
//! `strict = true` no job passes a ready job ahead of it that waits on resources: it waits on
//! the same resources.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;

use super::Limits;
use crate::store::{JobId, Priority, WaitReason};

/// A resource a job holds while it is active; its name is what `WaitReason::Resources` shows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// One of `max_jobs` (`global`).
    Global,
    /// One of the plan's "max jobs per policy" (`plan:P`).
    Plan(String),
    /// One of the client's "max jobs per client" (`client:C`).
    Client(String),
    /// One of the destination's (the storage unit's) jobs (`destination:D`).
    Destination(String),
    /// One of the activity table's jobs (`table:T`).
    Table(String),
    /// The one run of a plan in a backup day (`run:P@YYYYMMDD`): two attempts of one (plan,
    /// backup day) are never active together (JOB-12).
    Run(String),
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Global => write!(f, "global"),
            Resource::Plan(p) => write!(f, "plan:{p}"),
            Resource::Client(c) => write!(f, "client:{c}"),
            Resource::Destination(d) => write!(f, "destination:{d}"),
            Resource::Table(t) => write!(f, "table:{t}"),
            Resource::Run(r) => write!(f, "run:{r}"),
        }
    }
}

/// Whether a queued job may start now, as its plan's window and start time say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// It may start once its resources are granted.
    Ready,
    /// Its window has not opened yet (`window`).
    WaitWindow,
    /// Its start time has not come (`start_time`).
    WaitStartTime,
    /// Its window has closed: the job is canceled `WindowClosed` (JOB-08).
    WindowClosed,
}

/// One queued job's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The job.
    pub job: JobId,
    /// Its priority (higher first).
    pub priority: Priority,
    /// When it was created (earlier first among equal priorities).
    pub created: Timestamp,
    /// Everything it needs, each once.
    pub resources: Vec<Resource>,
    /// Whether its window and start time let it start.
    pub readiness: Readiness,
}

/// The queued jobs, in any order ([`grant`] sorts them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Queue {
    /// The requests.
    pub requests: Vec<Request>,
}

/// How many active jobs hold each resource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    held: BTreeMap<Resource, u32>,
}

impl Counters {
    /// No resource held.
    #[must_use]
    pub fn new() -> Counters {
        Counters::default()
    }

    /// The counters of the active jobs holding these resource lists (a resource named twice in
    /// one list counts once).
    #[must_use]
    pub fn of_active<'a>(active: impl IntoIterator<Item = &'a [Resource]>) -> Counters {
        let mut c = Counters::new();
        for resources in active {
            c.take(resources);
        }
        c
    }

    /// How many active jobs hold `r`.
    #[must_use]
    pub fn held(&self, r: &Resource) -> u32 {
        self.held.get(r).copied().unwrap_or(0)
    }

    /// Count one more holder of each resource of `resources` (each at most once).
    pub fn take(&mut self, resources: &[Resource]) {
        let mut seen: Vec<&Resource> = Vec::with_capacity(resources.len());
        for r in resources {
            if !seen.contains(&r) {
                seen.push(r);
                *self.held.entry(r.clone()).or_insert(0) += 1;
            }
        }
    }

    /// Every resource with at least one holder, with its count.
    pub fn iter(&self) -> impl Iterator<Item = (&Resource, u32)> {
        self.held.iter().map(|(r, n)| (r, *n))
    }
}

/// What a pass decided for one queued job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Every resource it asked for is its own: it becomes `Active` (JOB-04).
    Granted {
        /// The job.
        job: JobId,
        /// What it holds.
        resources: Vec<Resource>,
    },
    /// It stays queued, naming what it waits on (JOB-03).
    Waits {
        /// The job.
        job: JobId,
        /// What it waits on.
        on: WaitReason,
    },
    /// Its window closed: cancel it `WindowClosed` (JOB-08).
    WindowClosed {
        /// The job.
        job: JobId,
    },
}

impl Grant {
    /// The job this is about.
    #[must_use]
    pub fn job(&self) -> JobId {
        match self {
            Grant::Granted { job, .. } | Grant::Waits { job, .. } | Grant::WindowClosed { job } => {
                *job
            }
        }
    }
}

/// One broker pass: each request of `queue`, in queue order, is granted all its resources or
/// none, against `counters` (the active jobs) and `limits`. The result has one entry per
/// request, in queue order.
#[must_use]
pub fn grant(queue: &Queue, counters: &Counters, limits: &Limits) -> Vec<Grant> {
    let mut order: Vec<&Request> = queue.requests.iter().collect();
    order.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.created.cmp(&b.created))
            .then(a.job.cmp(&b.job))
    });
    let mut held = counters.clone();
    let mut blocked_ahead: Option<Vec<String>> = None;
    let mut out = Vec::with_capacity(order.len());
    for req in order {
        match req.readiness {
            Readiness::WindowClosed => {
                out.push(Grant::WindowClosed { job: req.job });
                continue;
            }
            Readiness::WaitWindow => {
                out.push(Grant::Waits {
                    job: req.job,
                    on: WaitReason::Window,
                });
                continue;
            }
            Readiness::WaitStartTime => {
                out.push(Grant::Waits {
                    job: req.job,
                    on: WaitReason::StartTime,
                });
                continue;
            }
            Readiness::Ready => {}
        }
        if let (true, Some(names)) = (limits.strict, &blocked_ahead) {
            out.push(Grant::Waits {
                job: req.job,
                on: WaitReason::Resources {
                    names: names.clone(),
                },
            });
            continue;
        }
        let mut resources: Vec<Resource> = Vec::with_capacity(req.resources.len());
        for r in &req.resources {
            if !resources.contains(r) {
                resources.push(r.clone());
            }
        }
        let full: Vec<String> = resources
            .iter()
            .filter(|r| held.held(r) >= limits.limit_of(r))
            .map(ToString::to_string)
            .collect();
        if full.is_empty() {
            held.take(&resources);
            out.push(Grant::Granted {
                job: req.job,
                resources,
            });
        } else {
            if blocked_ahead.is_none() {
                blocked_ahead = Some(full.clone());
            }
            out.push(Grant::Waits {
                job: req.job,
                on: WaitReason::Resources { names: full },
            });
        }
    }
    out
}
