//! The `timezero` binary's commands. No engine logic lives here: each command parses its
//! arguments, calls the library, and prints.

mod args;
mod calendar;
mod cancel;
mod catalog;
mod command_line;
mod daemon;
mod daemon_ctl;
mod demo;
mod holds;
mod jobs;
mod mount;
mod plan;
mod reconcile;
mod runner;
mod schedule;
mod serve;
mod state;
mod terminal;

pub use crate::command::{check_volume, execute, Remote};
pub use args::parse_extent;
pub use command_line::DaemonCmd;
pub use command_line::{BackendArg, CatalogCmd, Cli, Command, IoFlags, JobsCmd, PlanCmd};
pub use schedule::{EventCmd, ScheduleCmd, StateArgs};
use serve::{check_listen, serve};
use terminal::{
    interrupt_flag, local_or_remote, not_regular, remote_only, write_input, Local, Sink,
};

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use clap::Parser;

use crate::command::output;
use crate::engine::{Engine, EngineOptions, RestartPolicy};
use crate::{Error, Result};

use output::json;

/// Why a command failed: a usage error (exit 2) or a runtime error (exit 1).
#[derive(Debug)]
pub(super) enum Fail {
    /// The arguments are wrong: exit 2.
    Usage(String),
    /// A runtime error with its own message: exit 1.
    Message(String),
    /// A library error: exit 1.
    Run(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Run(e)
    }
}

/// A clap error as one line: the message without the usage block that follows it.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let head = text
        .split("\n\nUsage:")
        .next()
        .unwrap_or_default()
        .split("\n\nFor more information")
        .next()
        .unwrap_or_default();
    let joined = head.split_whitespace().collect::<Vec<_>>().join(" ");
    let msg = joined.strip_prefix("error: ").unwrap_or(&joined);
    format!("{msg} (see --help)")
}

/// Run the CLI; returns the process exit code (0 ok, 1 error, 2 usage).
#[must_use]
pub fn main() -> i32 {
    canary_from_env();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            eprintln!("timezero: {}", one_line(&e));
            return 2;
        }
        Err(e) => {
            let _ = e.print();
            return 0;
        }
    };
    match run(cli.command, cli.io) {
        Ok(()) => 0,
        Err(Fail::Usage(m)) => {
            eprintln!("timezero: {m}");
            2
        }
        Err(Fail::Message(m)) => {
            eprintln!("timezero: {m}");
            1
        }
        Err(Fail::Run(e @ Error::Interrupted(_))) => {
            eprintln!("timezero: {e}");
            130
        }
        Err(Fail::Run(e)) => {
            eprintln!("timezero: {e}");
            1
        }
    }
}

/// The inner `--state`/`--json` of `jobs SUB`, else the outer ones.
fn merge(inner: StateArgs, state: Option<std::path::PathBuf>, json: bool) -> StateArgs {
    StateArgs {
        state: inner.state.or(state),
        json: inner.json || json,
    }
}

/// `TIMEZERO_CANARY_SKIP_CBW_FLUSH=1` turns on the engine's skipped-flush canary in every
/// thread, `TIMEZERO_CANARY_SKIP_LOG_WRITE=1` the copy log's skipped-write canary (builds with
/// the `fault` feature only; elsewhere the variables are ignored): the power-loss test runs the
/// binary with them to show that it catches the broken ordering.
/// `TIMEZERO_CHECKED_COMMIT_ON_THREAD=1` (or `=0`) fixes which of a checked first write's two
/// durability points goes to a flusher thread (the commit, or the target's flush), so that the
/// power-loss test runs both whatever the timings of its mount.
fn canary_from_env() {
    #[cfg(feature = "fault")]
    {
        if std::env::var_os("TIMEZERO_CANARY_SKIP_CBW_FLUSH").is_some_and(|v| v == "1") {
            crate::engine::set_canary_skip_cbw_flush_all_threads(true);
        }
        if std::env::var_os("TIMEZERO_CANARY_SKIP_LOG_WRITE").is_some_and(|v| v == "1") {
            crate::activity::set_canary_skip_log_write_all_threads(true);
        }
        match std::env::var_os("TIMEZERO_CHECKED_COMMIT_ON_THREAD") {
            Some(v) if v == "1" => {
                crate::engine::set_checked_commit_on_thread_all_threads(Some(true))
            }
            Some(v) if v == "0" => {
                crate::engine::set_checked_commit_on_thread_all_threads(Some(false));
            }
            _ => {}
        }
    }
}

pub(super) fn open(table: &Path, restart: RestartPolicy, io: IoFlags) -> Result<Engine> {
    Engine::open_path(table, io.engine_options(restart))
}

/// Open the engine of a server (`serve`, `mount`, `daemon`): in write-back mode unless
/// `--write-through` (its clients flush; see [`EngineOptions::write_back`]).
pub(super) fn open_server(table: &Path, io: IoFlags) -> Result<Engine> {
    Engine::open_path(
        table,
        EngineOptions {
            write_back: !io.write_through,
            ..io.engine_options(RestartPolicy::Resume)
        },
    )
}

/// Run one parsed command. Long because it is the dispatch table: one short arm per command
/// (check the flags, run here or forward, print), read top to bottom like `--help`; the work of
/// each arm is in `command`, `terminal` and `serve`.
fn run(cmd: Command, io: IoFlags) -> std::result::Result<(), Fail> {
    let mut out = std::io::stdout().lock();
    let text = match cmd {
        Command::Bench {
            json,
            dir,
            table_dir,
            log_size,
            size,
            rounds,
            writers,
            json_out,
        } => {
            let opts = crate::bench::BenchOptions {
                dir,
                table_dir,
                size,
                rounds,
                json,
                json_out,
                writers,
                backend: io.backend(),
                direct_copy: io.direct,
                checked_copies: !io.serial_copies,
                copy_offload: !io.no_copy_offload,
                log_bytes: log_size,
                probe_exe: std::env::current_exe().ok(),
            };
            crate::bench::run(&opts, &mut out, &mut std::io::stderr())?;
            String::new()
        }
        Command::Init {
            table,
            journal,
            capacity,
            log_size,
            json: as_json,
        } => init(&table, (journal, capacity, log_size), as_json)?,
        Command::Establish {
            table,
            source,
            target,
            more,
            group,
            extents,
            grain,
            nocopy,
            incremental,
            force,
            json,
        } => {
            let cmd = if more.is_empty() && group.is_none() {
                Remote::Establish {
                    source,
                    target,
                    extents,
                    grain,
                    nocopy,
                    incremental,
                    force,
                    json,
                }
            } else {
                if more.len() % 2 != 0 {
                    return Err(Fail::Usage(format!(
                        "establish takes SOURCE TARGET pairs: {} has no target",
                        more[more.len() - 1].display()
                    )));
                }
                if !extents.is_empty() {
                    return Err(Fail::Usage(
                        "--extent applies to a single pair; a group establishes whole volumes"
                            .to_string(),
                    ));
                }
                let mut pairs = vec![(source, target)];
                pairs.extend(more.chunks(2).map(|c| (c[0].clone(), c[1].clone())));
                Remote::EstablishGroup {
                    pairs,
                    group,
                    grain,
                    nocopy,
                    incremental,
                    force,
                    json,
                }
            };
            local_or_remote(&table, cmd, io, &mut Local::default())?
        }
        Command::Status { table, json } => status_command(&table, json)?,
        Command::Copy {
            table,
            session,
            rate,
            threads,
            batch,
            depth,
            convert,
            json,
        } => {
            let mut ch = Local {
                interrupt: Some(interrupt_flag()?),
                ..Local::default()
            };
            let r = local_or_remote(
                &table,
                Remote::Copy {
                    session: session.map(|s| s.0),
                    rate,
                    threads,
                    batch,
                    depth,
                    convert,
                    json,
                },
                io,
                &mut ch,
            );
            ch.finish()?;
            r?
        }
        Command::Write {
            table,
            volume,
            offset,
            from,
            len,
            json,
        } => {
            check_write_input(&from, len)?;
            let (input, len) = write_input(&from, len)?;
            let mut ch = Local {
                input: Some((input, from.display().to_string())),
                ..Local::default()
            };
            let cmd = Remote::Write {
                volume,
                offset,
                len,
                json,
            };
            local_or_remote(&table, cmd, io, &mut ch)?
        }
        Command::Withdraw {
            table,
            session,
            group,
            json,
        } => {
            let cmd = match (session, group) {
                (Some(s), _) => Remote::Withdraw { session: s.0, json },
                (None, Some(group)) => Remote::WithdrawGroup { group, json },
                (None, None) => {
                    return Err(Fail::Usage(
                        "withdraw needs a SESSION or --group NAME".to_string(),
                    ))
                }
            };
            local_or_remote(&table, cmd, io, &mut Local::default())?
        }
        Command::Refresh {
            table,
            session,
            group,
            json,
        } => {
            let cmd = Remote::Refresh {
                session: session.map(|s| s.0),
                group,
                json,
            };
            local_or_remote(&table, cmd, io, &mut Local::default())?
        }
        Command::Reverse {
            table,
            session,
            wait,
            json,
        } => {
            let cmd = Remote::Reverse {
                session: session.0,
                wait,
                json,
            };
            local_or_remote(&table, cmd, io, &mut Local::default())?
        }
        Command::Forget {
            table,
            session,
            ended,
            json,
        } => {
            let session = match (session, ended) {
                (Some(s), false) => Some(s.0),
                (None, true) => None,
                _ => {
                    return Err(Fail::Usage(
                        "forget needs a SESSION or --ended (not both)".to_string(),
                    ))
                }
            };
            local_or_remote(
                &table,
                Remote::Forget { session, json },
                io,
                &mut Local::default(),
            )?
        }
        Command::Reset {
            table,
            volume,
            json,
        } => local_or_remote(
            &table,
            Remote::Reset { volume, json },
            io,
            &mut Local::default(),
        )?,
        Command::Read {
            table,
            session,
            offset,
            len,
            to,
            json: as_json,
        } => {
            let mut ch = Local {
                sink: to
                    .clone()
                    .map_or(Sink::Stdout, |p| Sink::File(p, None, true)),
                ..Local::default()
            };
            let cmd = Remote::Read {
                session: session.0,
                offset,
                len,
            };
            local_or_remote(&table, cmd, io, &mut ch)?;
            ch.finish()?;
            match to {
                Some(p) if as_json => json(&output::ImageOut {
                    session: session.to_string(),
                    offset,
                    bytes: len,
                    output: p.display().to_string(),
                })?,
                _ => String::new(),
            }
        }
        Command::Export {
            table,
            session,
            output,
            force,
            json: as_json,
        } => {
            if !force && output.symlink_metadata().is_ok() {
                return Err(Fail::Message(format!(
                    "{} exists; pass --force to replace it",
                    output.display()
                )));
            }
            let mut ch = Local {
                sink: Sink::File(output.clone(), None, force),
                ..Local::default()
            };
            let cmd = Remote::Export { session: session.0 };
            local_or_remote(&table, cmd, io, &mut ch)?;
            ch.finish()?;
            let o = output::ImageOut {
                session: session.to_string(),
                offset: 0,
                bytes: ch.written,
                output: output.display().to_string(),
            };
            if as_json {
                json(&o)?
            } else {
                format!("exported {} bytes of {session} to {}\n", o.bytes, o.output)
            }
        }
        Command::Pause { table, session } => {
            remote_only(&table, session, &Remote::Pause { session: session.0 })?
        }
        Command::Resume { table, session } => local_or_remote(
            &table,
            Remote::Resume { session: session.0 },
            io,
            &mut Local::default(),
        )?,
        Command::Rate {
            table,
            session,
            bytes_per_s,
        } => remote_only(
            &table,
            session,
            &Remote::Rate {
                session: session.0,
                bytes_per_s,
            },
        )?,
        Command::Recover {
            table,
            terminate_incomplete,
            accept_rollback,
            json: as_json,
        } => {
            let restart = if terminate_incomplete {
                RestartPolicy::TerminateIncomplete
            } else {
                RestartPolicy::Resume
            };
            let e = Engine::open_path(
                &table,
                EngineOptions {
                    accept_rollback,
                    ..io.engine_options(restart)
                },
            )?;
            let o = output::RecoverOut {
                open: e.open_report.clone(),
                decisions: crate::command::decisions_out(&e, &e.decisions),
            };
            if as_json {
                json(&o)?
            } else {
                o.text()
            }
        }
        Command::Serve {
            table,
            socket,
            listen,
            allow_remote,
            writable_images,
            volumes,
            max_connections,
            max_connections_per_export,
            handshake_timeout,
            idle_timeout,
        } => {
            if let Some(a) = &listen {
                check_listen(a, allow_remote)?;
            }
            let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
            let config = crate::nbd::NbdConfig {
                allow_remote,
                connections_max: max_connections,
                connections_per_export_max: max_connections_per_export,
                handshake_timeout: secs(handshake_timeout),
                idle_timeout: secs(idle_timeout),
                ..crate::nbd::NbdConfig::default()
            };
            serve(
                &table,
                socket,
                listen,
                writable_images,
                &volumes,
                config,
                io,
            )?;
            String::new()
        }
        Command::Mount {
            table,
            mountpoint,
            writable_images,
            nbd,
        } => {
            mount::mount(&table, &mountpoint, writable_images, nbd, io)?;
            String::new()
        }
        Command::Umount { mountpoint } => mount::umount(&mountpoint)?,
        Command::Stop {
            table,
            json: as_json,
        } => {
            let sock = crate::control::socket_path(&table);
            if let Err(er) = crate::control::shutdown(&sock) {
                return Err(match er {
                    Error::Io { ref source, .. }
                        if matches!(
                            source.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        Fail::Message(format!("no server is running for {}", table.display()))
                    }
                    er => Fail::Run(er),
                });
            }
            let o = output::StopOut {
                table: table.display().to_string(),
                asked: true,
            };
            if as_json {
                json(&o)?
            } else {
                format!("asked the server of {} to stop\n", o.table)
            }
        }
        Command::Demo { keep, seed } => {
            demo::run(keep, seed)?;
            String::new()
        }
        Command::Plan {
            cmd:
                PlanCmd::Check {
                    plan: file,
                    at,
                    state,
                    json,
                },
        } => plan::check(&file, &at, state, json, &mut out)?,
        Command::Catalog { cmd } => match cmd {
            CatalogCmd::Ls {
                plan,
                source,
                day,
                all,
                state,
                json,
            } => catalog::ls(state, (plan, source, day, all), json)?,
            CatalogCmd::Show { image, state, json } => catalog::show(state, image, json)?,
            CatalogCmd::Verify { image, state, json } => {
                catalog::verify(state, image, io, json, &mut out)?
            }
        },
        Command::Restore {
            image,
            plan,
            source,
            at,
            to,
            extents,
            wait,
            state,
            json,
            rate,
            checkpoint,
        } => catalog::restore(
            &catalog::RestoreArgs {
                image,
                plan,
                source,
                at,
                to,
                extents,
                wait,
                state,
                json,
                rate,
                checkpoint,
            },
            io,
            &mut out,
        )?,
        Command::Plan {
            cmd:
                PlanCmd::Run {
                    plan,
                    priority,
                    wait,
                    state,
                    json,
                },
        } => jobs::plan_run(&plan, priority, wait, state, json, &mut out)?,
        Command::Plan {
            cmd: PlanCmd::List { state, json },
        } => jobs::plan_list(state, json)?,
        Command::Reconcile { state, json } => reconcile::reconcile(state, json)?,
        Command::QuiesceWatchdog { job, state } => holds::watchdog(&job, state)?,
        Command::Daemon {
            cmd,
            no_calendar,
            no_nbd,
            writable_images,
            state,
        } => daemon::command(
            cmd,
            (state, no_calendar, no_nbd, writable_images),
            io,
            &mut out,
        )?,
        Command::Jobs {
            cmd: None,
            all,
            state,
            json,
        } => jobs::jobs_list(state, all, json)?,
        Command::Jobs {
            cmd:
                Some(JobsCmd::Show {
                    job,
                    state: inner,
                    json: inner_json,
                }),
            all: _,
            state,
            json,
        } => jobs::jobs_show(inner.or(state), job, json || inner_json)?,
        Command::Schedule { cmd } => schedule::schedule(cmd)?,
        Command::Event { cmd } => schedule::event(cmd)?,
        Command::Calendar { day, common } => calendar::calendar(day.as_deref(), &common)?,
        Command::Jobs {
            cmd: Some(JobsCmd::Cancel { job, common }),
            state,
            json,
            ..
        } => cancel::cancel(job, &merge(common, state, json))?,
        Command::RecoveryProbe { table } => crate::bench::recovery_probe(&table)? + "\n",
        Command::Workload { table, seed, rate } => {
            demo::workload(&table, seed, rate)?;
            String::new()
        }
        Command::Crashtest {
            workloads,
            seed,
            json,
            eio_points,
            write_back,
            only,
        } => {
            // The global --serial-copies runs every workload on the serial path.
            let serial_copies = io.serial_copies;
            let points = if eio_points == "all" {
                usize::MAX
            } else {
                eio_points.parse().map_err(|_| {
                    Fail::Usage(format!(
                        "--eio-points '{eio_points}' is not a number or 'all'"
                    ))
                })?
            };
            crashtest(
                (workloads, seed, only),
                json,
                points,
                (write_back, serial_copies),
            )?;
            String::new()
        }
    };
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

fn init(table: &Path, (journal, capacity, log): (u64, u64, u64), as_json: bool) -> Result<String> {
    let opts = EngineOptions {
        table: crate::activity::TableOptions {
            journal_bytes: journal,
            checkpoint_bytes: capacity,
            log_bytes: log,
        },
        ..EngineOptions::default()
    };
    let e = Engine::create_path(table, opts)?;
    let l = e.table().layout();
    let o = output::InitOut {
        table: table.display().to_string(),
        bytes: l.file_bytes(),
        journal_bytes: l.journal_bytes,
        checkpoint_bytes: l.checkpoint_bytes,
        log_bytes: l.log_bytes,
    };
    if as_json {
        return json(&o);
    }
    Ok(format!(
        "created {} ({} bytes: journal 2x{}, checkpoints 3x{}, copy log {})\n",
        o.table,
        o.bytes,
        crate::units::format_size(o.journal_bytes),
        crate::units::format_size(o.checkpoint_bytes),
        crate::units::format_size(o.log_bytes)
    ))
}

/// `write --from`: input that is not a regular file needs `--len` (a FIFO would otherwise
/// block, a device never end), at most 64 MiB of it.
fn check_write_input(from: &Path, len: Option<u64>) -> std::result::Result<(), Fail> {
    let shown = from.display().to_string();
    // stat, not open: opening a FIFO blocks until a writer appears.
    let meta = std::fs::metadata(from).map_err(|er| Error::io("stat", &shown, 0, er))?;
    if meta.is_file() {
        return Ok(());
    }
    match len {
        None => Err(Fail::Usage(format!(
            "--from {}",
            not_regular(&shown, &meta)
        ))),
        Some(l) if l > crate::limits::IO_BYTES_MAX => Err(Fail::Usage(format!(
            "--len {l} is over 64MiB, the most read from {shown}, which is not a regular file"
        ))),
        Some(_) => Ok(()),
    }
}

#[cfg(feature = "fault")]
fn crashtest(
    (workloads, seed, only): (usize, u64, Vec<String>),
    json: bool,
    eio_points: usize,
    (write_back, serial_copies): (bool, bool),
) -> Result<()> {
    let r = crate::fault::crashtest(&crate::fault::CrashtestOptions {
        workloads,
        seed,
        eio_points,
        write_back,
        serial_copies,
        only: only.clone(),
        ..crate::fault::CrashtestOptions::default()
    });
    if r.workloads < only.len() {
        return Err(Error::invalid(
            "crashtest",
            format!(
                "--only names {} workloads, {} of them in the catalogue of {workloads} \
                 workloads of seed {seed}",
                only.len(),
                r.workloads
            ),
        ));
    }
    let mut out = std::io::stdout().lock();
    if json {
        let s =
            serde_json::to_string_pretty(&r).map_err(|e| Error::invalid("json", e.to_string()))?;
        let _ = writeln!(out, "{s}");
    } else {
        let _ = writeln!(
            out,
            "crashtest: seed {} workloads {} crash points {} states {} ordering checks {} violations {} ({} ms)",
            r.seed, r.workloads, r.crash_points, r.states_total, r.ordering_checks, r.violations, r.elapsed_ms
        );
        for (k, v) in &r.states {
            let _ = writeln!(out, "  states {k}: {v}");
        }
        for (k, v) in &r.outcomes {
            let _ = writeln!(out, "  outcome {k}: {v}");
        }
        for v in &r.violation_samples {
            let _ = writeln!(out, "  VIOLATION {v}");
        }
    }
    if r.violations > 0 {
        return Err(Error::invalid(
            "crashtest",
            format!("{} violations", r.violations),
        ));
    }
    Ok(())
}

#[cfg(not(feature = "fault"))]
fn crashtest(
    _catalogue: (usize, u64, Vec<String>),
    _json: bool,
    _eio_points: usize,
    _modes: (bool, bool),
) -> std::result::Result<(), Fail> {
    Err(Fail::Usage(
        "crashtest is not in this build; run it with \
         `cargo run --release --features fault -- crashtest ...`"
            .to_string(),
    ))
}

/// `status`: the serving process's live state when one serves the table, else the committed
/// state read without taking the table (never a reconcile: `status` changes nothing).
fn status_command(table: &Path, as_json: bool) -> Result<String> {
    // Only a process that holds the table can be serving it: a control socket nobody holds the
    // table behind is stale (or not ours) and is not asked.
    if crate::activity::table_holder(table).is_some() {
        let sock = crate::control::socket_path(table);
        if let Ok(c) = crate::control::connect(&sock) {
            let cmd = Remote::Status { json: as_json };
            return crate::control::request(&sock, Some(c), &cmd, &mut Local::default(), None);
        }
    }
    let snap = crate::engine::read_status(table)?;
    let o = output::StatusOut {
        sessions: snap.sessions.iter().map(output::SessionOut::of).collect(),
        backend: None,
        direct: None,
        held_by: snap.holder,
        rolled_back: snap.rolled_back.map(|(t, w)| (t.get(), w.get())),
        room: Some(output::RoomOut::of(&snap.room)),
    };
    if as_json {
        json(&o)
    } else {
        Ok(o.text())
    }
}
