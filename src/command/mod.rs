//! The operations the `timezero` tools run on an open engine, shared by the command line (which
//! runs them in its own process) and the control socket of a serving process (which runs them
//! for other processes): [`Remote`] names one, [`execute`] runs it and returns the text to
//! print, and a [`Channel`] carries its input bytes, output bytes, progress and interruptions.
//! Nothing here parses arguments or talks to a socket.

mod channel;
mod guard;
pub mod output;

pub use channel::{Channel, CopyRegistry, Registered};
pub use guard::check_volume;
pub(crate) use guard::file_kind;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::engine::copier::{Copier, CopierOptions};
use crate::engine::{Engine, Outcome, SessionSpec};
use crate::ids::{GrainSize, SessionId};
use crate::model::{CopyMode, ExtentSpec, SessionState};
use crate::units::format_size;
use crate::{Error, Result};
use output::{json, DecisionOut};

/// The locator a volume path is known by: its canonical path, or, when the file is gone, its
/// canonical directory joined with its name.
fn locator_of(path: &Path) -> Result<String> {
    let err = |e| Error::io("resolve", path.display().to_string(), 0, e);
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let name = path.file_name().ok_or_else(|| err(e))?;
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            let dir = std::fs::canonicalize(dir).map_err(err)?;
            Ok(dir.join(name).display().to_string())
        }
        Err(e) => Err(err(e)),
    }
}

/// The attached volume at `path`, attaching it after [`check_volume`] when it is not yet.
pub fn volume_id(engine: &Engine, path: &Path) -> Result<crate::ids::VolumeId> {
    check_volume(path, Path::new(&engine.table().name()))?;
    let canon = std::fs::canonicalize(path)
        .map_err(|e| Error::io("open", path.display().to_string(), 0, e))?;
    match engine.volume_by_locator(&canon.display().to_string()) {
        Some(id) => Ok(id),
        None => engine.attach_path(path),
    }
}

/// A command that can run here or, when another process serves the table, in that process
/// through its control socket. Each returns the text to print.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Remote {
    /// `establish`.
    Establish {
        /// Source path.
        source: PathBuf,
        /// Target path.
        target: PathBuf,
        /// Extent strings as given.
        extents: Vec<String>,
        /// Grain bytes.
        grain: u64,
        /// No-copy mode.
        nocopy: bool,
        /// Record changes for `refresh`.
        #[serde(default)]
        incremental: bool,
        /// Establish even when the target holds data.
        #[serde(default)]
        force: bool,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `establish` of several pairs (or of one with a group name): a consistency group, every
    /// pair at one T0.
    EstablishGroup {
        /// (source, target) paths, in argument order.
        pairs: Vec<(PathBuf, PathBuf)>,
        /// The group's name (default: `group-` and the first session's number).
        group: Option<String>,
        /// Grain bytes.
        grain: u64,
        /// No-copy mode.
        nocopy: bool,
        /// Record changes for `refresh`.
        #[serde(default)]
        incremental: bool,
        /// Establish even when a target holds data.
        #[serde(default)]
        force: bool,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `refresh`: a new T0 for an incremental session, or for every session of a group.
    Refresh {
        /// The session (`None`: the group).
        session: Option<u64>,
        /// The consistency group.
        group: Option<String>,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `reverse`: the session's source holds its image again.
    Reverse {
        /// The session.
        session: u64,
        /// Move every grain back before returning.
        #[serde(default)]
        wait: bool,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `withdraw --group`: end every live session of a consistency group in one commit.
    WithdrawGroup {
        /// The group's name.
        group: String,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `forget`: remove one ended session, or every ended session.
    Forget {
        /// The session (`None`: every ended session).
        session: Option<u64>,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `status`.
    Status {
        /// JSON output.
        json: bool,
    },
    /// `copy`.
    Copy {
        /// Only this session.
        session: Option<u64>,
        /// Rate limit.
        rate: Option<u64>,
        /// Threads.
        threads: usize,
        /// Bytes per copy request.
        #[serde(default)]
        batch: Option<u64>,
        /// Requests in flight per worker and direction.
        #[serde(default)]
        depth: Option<usize>,
        /// Convert first.
        convert: bool,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `withdraw`.
    Withdraw {
        /// Session.
        session: u64,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `reset`.
    Reset {
        /// Volume path.
        volume: PathBuf,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `write`: the bytes follow the request (see [`Channel::input`]).
    Write {
        /// Volume path.
        volume: PathBuf,
        /// Offset.
        offset: u64,
        /// How many bytes.
        len: u64,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `read`: the image bytes go back to the caller.
    Read {
        /// Session.
        session: u64,
        /// Image offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `export`: the whole image goes back to the caller.
    Export {
        /// Session.
        session: u64,
    },
    /// `pause`: pause the running copy of a session.
    Pause {
        /// Session.
        session: u64,
    },
    /// `resume`: resume a suspended session, or else the paused copy of a session.
    Resume {
        /// Session.
        session: u64,
    },
    /// `rate`: change the rate limit of the running copy of a session.
    Rate {
        /// Session.
        session: u64,
        /// Bytes per second.
        bytes_per_s: u64,
    },
}

impl Remote {
    /// The file paths the command names.
    #[must_use]
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            Remote::Establish { source, target, .. } => vec![source, target],
            Remote::EstablishGroup { pairs, .. } => pairs
                .iter()
                .flat_map(|(s, t)| [s.as_path(), t.as_path()])
                .collect(),
            Remote::Reset { volume, .. } | Remote::Write { volume, .. } => vec![volume],
            _ => Vec::new(),
        }
    }

    /// The same command with every path made absolute and canonical (so that it names the same
    /// files in a process with another working directory).
    ///
    /// # Errors
    /// [`Error::Io`] naming a path that cannot be resolved.
    pub fn canonical(mut self) -> Result<Remote> {
        let canon = |p: &mut PathBuf| -> Result<()> {
            *p = std::fs::canonicalize(&*p)
                .map_err(|e| Error::io("resolve", p.display().to_string(), 0, e))?;
            Ok(())
        };
        match &mut self {
            Remote::Establish { source, target, .. } => {
                canon(source)?;
                canon(target)?;
            }
            Remote::EstablishGroup { pairs, .. } => {
                for (s, t) in pairs {
                    canon(s)?;
                    canon(t)?;
                }
            }
            // A volume being reset may be gone: name it by its canonical directory.
            Remote::Reset { volume, .. } => *volume = PathBuf::from(locator_of(volume)?),
            Remote::Write { volume, .. } => canon(volume)?,
            _ => {}
        }
        Ok(self)
    }
}

/// Run a [`Remote`] command on an open engine; `io` carries its input, output, progress and
/// interruptions.
///
/// Long because it is the dispatch table of every command the CLI and the control socket
/// share: one arm per command, each a few lines that call the engine and format the answer.
///
/// # Errors
/// The command's errors; [`Error::Interrupted`] when it was stopped on request.
pub fn execute(e: &Arc<Engine>, cmd: &Remote, io: &mut dyn Channel) -> Result<String> {
    // `resume`: a suspended session first; otherwise a paused copy, below.
    if let Remote::Resume { session } = cmd {
        let mut out = String::new();
        if resume_suspended(e, SessionId(*session), io, &mut out)? {
            return Ok(out);
        }
    }
    match cmd {
        Remote::Establish {
            source,
            target,
            extents,
            grain,
            nocopy,
            incremental,
            force,
            json: as_json,
        } => {
            let spec = SessionSpec {
                source: volume_id(e, source)?,
                target: volume_id(e, target)?,
                extents: extents
                    .iter()
                    .map(|s| ExtentSpec::parse(s))
                    .collect::<Result<Vec<_>>>()?,
                grain: GrainSize::new(*grain)?,
                mode: if *nocopy {
                    CopyMode::NoCopy
                } else {
                    CopyMode::Copy
                },
                incremental: *incremental,
            };
            if !force {
                refuse_target_with_data(e, &spec, target)?;
            }
            let id = e.establish(&spec)?;
            let st = e
                .status()
                .into_iter()
                .find(|s| s.id == id)
                .ok_or(Error::UnknownSession(id))?;
            let o = output::EstablishOut::new(
                &st,
                source.display().to_string(),
                target.display().to_string(),
            );
            if *as_json {
                json(&o)
            } else {
                Ok(o.text())
            }
        }
        Remote::EstablishGroup {
            pairs,
            group,
            grain,
            nocopy,
            incremental,
            force,
            json: as_json,
        } => establish_group(
            e,
            pairs,
            group.as_deref(),
            *grain,
            Kind {
                nocopy: *nocopy,
                incremental: *incremental,
            },
            *force,
            *as_json,
        ),
        Remote::Refresh {
            session,
            group,
            json: as_json,
        } => {
            let done = match (session, group) {
                (Some(s), _) => vec![e.refresh(SessionId(*s))?],
                (None, Some(g)) => e.refresh_group(g)?,
                (None, None) => return Err(Error::invalid("refresh", "no session or group")),
            };
            let o: Vec<output::RefreshOut> = done.iter().map(output::RefreshOut::of).collect();
            if *as_json {
                json(&o)
            } else {
                Ok(o.iter().map(output::RefreshOut::text).collect())
            }
        }
        Remote::Reverse {
            session,
            wait,
            json: as_json,
        } => {
            let id = SessionId(*session);
            let r = e.reverse(id)?;
            let s = e.session(id)?;
            if *wait {
                e.restore_all(id)?;
            }
            let o = output::ReverseOut {
                session: id.to_string(),
                source: s.desc.source.locator.clone(),
                grains_to_restore: r.grains_to_restore.get(),
                bytes_to_restore: r.bytes_to_restore,
            };
            if *as_json {
                json(&o)
            } else if *wait {
                Ok(format!(
                    "{}{}: restored; {} holds the image\n",
                    o.text(),
                    o.session,
                    o.source
                ))
            } else {
                Ok(o.text())
            }
        }
        Remote::WithdrawGroup {
            group,
            json: as_json,
        } => {
            let ids = e.withdraw_group(group)?;
            let o: Vec<output::SessionStateOut> = ids
                .iter()
                .map(|id| output::SessionStateOut {
                    session: id.to_string(),
                    state: SessionState::Withdrawn.to_string(),
                })
                .collect();
            if *as_json {
                json(&output::GroupStateOut {
                    group: group.clone(),
                    sessions: o,
                })
            } else {
                Ok(o.iter()
                    .map(|s| format!("{} {}\n", s.session, s.state))
                    .collect())
            }
        }
        Remote::Forget {
            session,
            json: as_json,
        } => {
            let ids = match session {
                Some(s) => {
                    let id = SessionId(*s);
                    e.forget(id)?;
                    vec![id]
                }
                None => e.forget_ended()?,
            };
            let o = output::ForgetOut {
                forgotten: ids.iter().map(ToString::to_string).collect(),
            };
            if *as_json {
                json(&o)
            } else if o.forgotten.is_empty() {
                Ok("no ended session to forget\n".to_string())
            } else {
                Ok(o.forgotten
                    .iter()
                    .map(|s| format!("{s} forgotten\n"))
                    .collect())
            }
        }
        Remote::Status { json: as_json } => {
            let o = output::StatusOut {
                sessions: e.status().iter().map(output::SessionOut::of).collect(),
                backend: Some(e.backend_name().to_string()),
                direct: Some(e.direct()),
                held_by: None,
                rolled_back: None,
                room: Some(output::RoomOut::of(&e.room())),
            };
            if *as_json {
                json(&o)
            } else {
                Ok(o.text())
            }
        }
        Remote::Copy {
            session,
            rate,
            threads,
            batch,
            depth,
            convert,
            json: as_json,
        } => copy(
            e,
            session.map(SessionId),
            *rate,
            *threads,
            *batch,
            *depth,
            *convert,
            *as_json,
            io,
        ),
        Remote::Withdraw {
            session,
            json: as_json,
        } => {
            let id = SessionId(*session);
            e.withdraw(id)?;
            let o = output::SessionStateOut {
                session: id.to_string(),
                state: SessionState::Withdrawn.to_string(),
            };
            if *as_json {
                json(&o)
            } else {
                Ok(format!("{} {}\n", o.session, o.state))
            }
        }
        Remote::Reset {
            volume,
            json: as_json,
        } => reset(e, volume, *as_json),
        Remote::Write {
            volume,
            offset,
            len,
            json: as_json,
        } => {
            let vid = volume_id(e, volume)?;
            let size = e.volume(vid)?.size();
            if offset.checked_add(*len).is_none_or(|end| end > size) {
                return Err(Error::invalid(
                    "write",
                    format!(
                        "{len} bytes at offset {offset} do not fit {} ({size} bytes); nothing \
                         was written",
                        volume.display()
                    ),
                ));
            }
            let input = io.input()?;
            // Bounded memory whatever the length: write in chunks.
            let mut buf = vec![0u8; 4 << 20];
            let mut done = 0u64;
            while done < *len {
                let want = usize::try_from((*len - done).min(buf.len() as u64)).unwrap_or(0);
                let n = input
                    .read(&mut buf[..want])
                    .map_err(|er| Error::io("read", "write input", done, er))?;
                if n == 0 {
                    return Err(Error::invalid(
                        "write",
                        format!("input ended after {done} of {len} bytes"),
                    ));
                }
                e.write(vid, *offset + done, &buf[..n])?;
                done += n as u64;
            }
            e.flush(vid)?;
            let o = output::WriteOut {
                volume: volume.display().to_string(),
                offset: *offset,
                bytes: done,
            };
            if *as_json {
                json(&o)
            } else {
                Ok(format!("wrote {done} bytes at {offset} of {}\n", o.volume))
            }
        }
        Remote::Read {
            session,
            offset,
            len,
        } => {
            if *len > crate::limits::IO_BYTES_MAX {
                return Err(Error::invalid("read", "length over 64 MiB; use export"));
            }
            let mut buf = vec![0u8; usize::try_from(*len).unwrap_or(0)];
            e.read_image(SessionId(*session), *offset, &mut buf)?;
            io.output(&buf)?;
            Ok(String::new())
        }
        Remote::Export { session } => {
            export(e, SessionId(*session), io)?;
            Ok(String::new())
        }
        Remote::Pause { session } | Remote::Resume { session } | Remote::Rate { session, .. } => {
            let id = SessionId(*session);
            let serving = io.copies().is_some();
            let copies = io
                .copies()
                .map(|r| r.find(e, id))
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    Error::invalid(
                        "session",
                        if serving {
                            format!("no copy of {id} is running")
                        } else {
                            format!(
                                "no copy of {id} is running: no process serves {} ({id} is not \
                                 suspended)",
                                e.table().name()
                            )
                        },
                    )
                })?;
            for c in &copies {
                match cmd {
                    Remote::Pause { .. } => c.pause(),
                    Remote::Resume { .. } => c.resume(),
                    Remote::Rate { bytes_per_s, .. } => c.set_rate(Some(*bytes_per_s))?,
                    _ => {}
                }
            }
            let what = match cmd {
                Remote::Pause { .. } => "paused".to_string(),
                Remote::Resume { .. } => "resumed".to_string(),
                Remote::Rate { bytes_per_s, .. } => {
                    format!("limited to {}/s", format_size(*bytes_per_s))
                }
                _ => String::new(),
            };
            Ok(format!("copy of {id} {what}\n"))
        }
    }
}

/// `establish` of a consistency group: every pair's volumes attached and checked (an error
/// names the pair), then [`Engine::establish_group`]; one line per session, in pair order.
#[allow(clippy::too_many_arguments, reason = "the flags of one command")]
/// The kind of sessions an establish makes.
#[derive(Debug, Clone, Copy)]
struct Kind {
    nocopy: bool,
    incremental: bool,
}

fn establish_group(
    e: &Engine,
    pairs: &[(PathBuf, PathBuf)],
    group: Option<&str>,
    grain: u64,
    kind: Kind,
    force: bool,
    as_json: bool,
) -> Result<String> {
    let grain = GrainSize::new(grain)?;
    // Without a name, the group is named after the number its first session will get (ids
    // are never reused, so the name is new).
    let name = match group {
        Some(g) => g.to_string(),
        None => format!("group-{}", e.table().next_session_id().0),
    };
    let mut specs = Vec::with_capacity(pairs.len());
    for (i, (source, target)) in pairs.iter().enumerate() {
        let pair_err = |er: Error| Error::GroupPair {
            group: name.clone(),
            pair: i + 1,
            source_path: source.display().to_string(),
            target_path: target.display().to_string(),
            error: Box::new(er),
        };
        let spec = SessionSpec {
            source: volume_id(e, source).map_err(pair_err)?,
            target: volume_id(e, target).map_err(pair_err)?,
            extents: Vec::new(),
            grain,
            mode: if kind.nocopy {
                CopyMode::NoCopy
            } else {
                CopyMode::Copy
            },
            incremental: kind.incremental,
        };
        if !force {
            refuse_target_with_data(e, &spec, target).map_err(pair_err)?;
        }
        specs.push(spec);
    }
    let ids = e.establish_group(&name, &specs)?;
    let status = e.status();
    let mut out = Vec::with_capacity(ids.len());
    for (id, (source, target)) in ids.iter().zip(pairs) {
        let st = status
            .iter()
            .find(|s| s.id == *id)
            .ok_or(Error::UnknownSession(*id))?;
        out.push(output::EstablishOut::new(
            st,
            source.display().to_string(),
            target.display().to_string(),
        ));
    }
    if as_json {
        json(&output::GroupOut {
            group: name,
            sessions: out,
        })
    } else {
        Ok(out.iter().map(output::EstablishOut::text).collect())
    }
}

/// The establish policy of the command line: refuse a target that visibly holds data in the
/// ranges the session would overwrite.
fn refuse_target_with_data(e: &Engine, spec: &SessionSpec, target: &Path) -> Result<()> {
    let ranges: Vec<(u64, u64)> = if spec.extents.is_empty() {
        let size = e.volume(spec.source)?.size();
        vec![(0, size - size % spec.grain.bytes())]
    } else {
        spec.extents
            .iter()
            .map(|x| (x.target_offset, x.len))
            .collect()
    };
    match crate::volume::visible_data(e.volume(spec.target)?.as_ref(), &ranges)? {
        Some(found) => Err(Error::HoldsData {
            path: target.display().to_string(),
            found,
        }),
        None => Ok(()),
    }
}

/// The decision texts of a reset or an open, with the sessions' states now.
pub fn decisions_out(e: &Engine, ds: &[crate::engine::Decision]) -> Vec<DecisionOut> {
    ds.iter()
        .map(|d| {
            let state = e.session(d.session).ok().map(|s| s.state());
            DecisionOut::of(d, state)
        })
        .collect()
}

fn reset(e: &Engine, volume: &Path, as_json: bool) -> Result<String> {
    let l = locator_of(volume)?;
    let uses =
        |x: &crate::session::Session| x.desc.source.locator == l || x.desc.target.locator == l;
    let sessions = e.table().sessions();
    // A local open has already reconciled every session with the volumes as they are
    // now (the same comparison a reset makes): report what it decided for this volume.
    let mut decided: Vec<crate::engine::Decision> = e
        .decisions
        .iter()
        .filter(|d| {
            sessions.iter().any(|x| x.id() == d.session && uses(x))
                && (d.was_suspended
                    || matches!(
                        d.outcome,
                        Outcome::Terminated(_) | Outcome::ResumedPartly(_) | Outcome::Suspended(_)
                    ))
        })
        .cloned()
        .collect();
    let ds = e.reset_locator(&l).map_err(|er| match er {
        Error::UnknownVolume(_) => Error::UnknownVolume(volume.display().to_string()),
        er => er,
    })?;
    decided.extend(ds);
    let o = output::ResetOut {
        volume: volume.display().to_string(),
        decisions: decisions_out(e, &decided),
    };
    if as_json {
        return json(&o);
    }
    if o.decisions.is_empty() {
        return Ok(format!("no active session uses {}\n", o.volume));
    }
    Ok(o.decisions.iter().map(|d| d.text() + "\n").collect())
}

#[allow(clippy::too_many_arguments, reason = "the flags of one command")]
fn copy(
    e: &Arc<Engine>,
    session: Option<SessionId>,
    rate: Option<u64>,
    threads: usize,
    batch: Option<u64>,
    depth: Option<usize>,
    convert: bool,
    as_json: bool,
    io: &mut dyn Channel,
) -> Result<String> {
    if let Some(id) = session.filter(|id| e.session(*id).is_ok_and(|s| !s.reversing())) {
        let s = e.session(id)?;
        let state = s.status().state;
        if state == SessionState::Completed {
            let o = output::SessionStateOut {
                session: id.to_string(),
                state: state.to_string(),
            };
            return if as_json {
                json(&o)
            } else {
                Ok(format!("{id} completed\n"))
            };
        }
        e.check_active(id)?;
        if convert {
            e.convert_to_copy(id)?;
        } else if s.status().mode == CopyMode::NoCopy {
            return Err(Error::invalid(
                "copy",
                format!("{id} is a no-copy session; pass --convert to convert it"),
            ));
        }
    }
    let mut opts = CopierOptions {
        threads,
        rate_bytes_per_s: rate,
        sessions: session.into_iter().collect(),
        ..CopierOptions::default()
    };
    if let Some(b) = batch {
        opts.batch_bytes = b;
    }
    if let Some(d) = depth {
        opts.depth = d;
    }
    let c = Copier::start(e.clone(), opts)?;
    let _registered = io.copies().map(|r| r.register(c.control()));
    let mut last = std::time::Instant::now();
    while !c.wait_finished(Duration::from_millis(100)) {
        if let Some(er) = io.interrupted() {
            // Everything copied so far is committed when the workers stop.
            c.stop()?;
            return Err(er);
        }
        if last.elapsed() >= io.progress_interval() {
            last = std::time::Instant::now();
            io.progress(&progress_line(&c));
        }
    }
    let p = c.join()?;
    let o = output::CopyOut {
        bytes_copied: p.bytes_copied,
        bytes_offloaded: p.bytes_offloaded,
        grains_copied: p.grains_copied,
        grains_total: p.grains_total,
        backend: e.backend_name().to_string(),
        sessions: e
            .status()
            .iter()
            .map(|s| output::SessionStateOut {
                session: s.id.to_string(),
                state: s.state.to_string(),
            })
            .collect(),
    };
    if as_json {
        return json(&o);
    }
    let by_kernel = if o.bytes_offloaded > 0 {
        format!(" ({} by the kernel)", o.bytes_offloaded)
    } else {
        String::new()
    };
    let mut out = format!(
        "copied {} bytes{by_kernel}; {}/{} grains; backend {}\n",
        o.bytes_copied, o.grains_copied, o.grains_total, o.backend
    );
    for s in &o.sessions {
        out.push_str(&format!("{} {}\n", s.session, s.state));
    }
    Ok(out)
}

/// `resume` of a suspended session: find its volumes again and reconcile it. Returns false
/// (nothing done) when the session is not suspended and was not resumed when this process
/// opened the table, so that `resume` goes on to a paused copy.
fn resume_suspended(e: &Engine, id: SessionId, io: &dyn Channel, out: &mut String) -> Result<bool> {
    use std::fmt::Write as _;
    let d = if e.session(id)?.state() == SessionState::Suspended {
        e.resume(id, &e.file_resolver())?
    } else {
        // Opened here (not in a server): opening already reconciled the session.
        match e.decisions.iter().find(|d| d.session == id) {
            Some(d) if io.copies().is_none() && d.was_suspended => d.clone(),
            _ => return Ok(false),
        }
    };
    match &d.outcome {
        Outcome::Resumed => {
            let _ = writeln!(out, "{id} resumed");
        }
        Outcome::ResumedPartly(ended) => {
            let _ = writeln!(out, "{id} resumed; extents ended: {ended:?}");
        }
        Outcome::Suspended(_) => e.check_active(id)?,
        Outcome::Terminated(r) => {
            return Err(Error::invalid(
                "resume",
                format!("{id} terminated instead: {r}"),
            ))
        }
        Outcome::Ended | Outcome::ChangesUnknown(_) => e.check_active(id)?,
    }
    Ok(true)
}

/// One line of a running copy's progress.
fn progress_line(c: &Copier) -> String {
    let p = c.progress();
    let ctl = c.control();
    let pct = if p.grains_total == 0 {
        100.0
    } else {
        100.0 * p.grains_copied as f64 / p.grains_total as f64
    };
    let eta = p.eta_s.map_or("?".to_string(), |s| format!("{s:.0}s"));
    let limit = ctl
        .rate()
        .map(|r| format!(" limit {}/s", format_size(r)))
        .unwrap_or_default();
    let paused = if ctl.paused() { " paused" } else { "" };
    format!(
        "copy {pct:5.1}% {}/{} grains {:.1} MiB/s eta {eta}{limit}{paused}",
        p.grains_copied,
        p.grains_total,
        p.bytes_per_s / 1_048_576.0
    )
}

/// Send a session's whole image to `io` in chunks; returns its length.
fn export(e: &Engine, session: SessionId, io: &mut dyn Channel) -> Result<u64> {
    let s = e.session(session)?;
    let len = s.map.image_len();
    let chunk = 4u64 << 20;
    let mut buf = vec![0u8; usize::try_from(chunk).unwrap_or(1 << 22)];
    let mut off = 0;
    while off < len {
        let n = chunk.min(len - off);
        let b = &mut buf[..usize::try_from(n).unwrap_or(0)];
        e.read_image(session, off, b)?;
        io.output(b)?;
        off += n;
    }
    Ok(len)
}
