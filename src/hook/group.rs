//! A hook's process group: signalling it, and making sure none of its processes is left.
//!
//! A process that was sent SIGKILL has not exited yet when `kill` returns. To return only once
//! the group is really gone, the runner lists the group's processes from `/proc`, opens a
//! pidfd for each and waits for each pidfd to become readable (the process has exited). Killed
//! members may stay zombies for a moment until their new parent reaps them; a zombie has
//! exited, holds no file (no pipe, no frozen file system) and counts as gone.

use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{kill_process_group, pidfd_open, Pid, PidfdFlags, Signal};

/// Send `signal` to every process of group `pgid`. A group that is already empty is fine.
pub(super) fn signal_group(pgid: Pid, signal: Signal) {
    // ESRCH: nobody left; EPERM cannot happen for our own children's group.
    let _ = kill_process_group(pgid, signal);
}

/// The processes of group `pgid` that have not exited (zombies excluded), read from `/proc`.
/// Empty when `/proc` cannot be read.
#[must_use]
pub fn live_group_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut live = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((state, group)) = stat_of(pid) {
            if group == pgid && state != 'Z' && state != 'X' {
                live.push(pid);
            }
        }
    }
    live
}

/// State letter and process group of `pid` from `/proc/PID/stat`.
fn stat_of(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid pgrp ..."; comm may hold spaces and parentheses, so split after the
    // last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let group = fields.next()?.parse().ok()?;
    Some((state, group))
}

/// SIGKILL every process of group `pgid` and wait until each has exited. Returns how many
/// processes other than `leader` were found alive at the first look (processes the hook left
/// behind, or that ignored SIGTERM).
pub(super) fn kill_group_and_wait(pgid: Pid, leader: u32) -> usize {
    let raw = pgid.as_raw_pid().unsigned_abs();
    // Counted before the signal, so a member that dies of it quickly is still counted.
    let found = live_group_members(raw)
        .into_iter()
        .filter(|&p| p != leader)
        .count();
    // A group that was sent SIGKILL cannot grow (fork fails with a fatal signal pending), so
    // this ends after at most a few rounds; the bound guards against a kernel without that.
    for _ in 0..64 {
        signal_group(pgid, Signal::KILL);
        let live = live_group_members(raw);
        if live.is_empty() {
            break;
        }
        for pid in live {
            wait_exit(pid, raw);
        }
    }
    found
}

/// Wait until process `pid` (a member of group `pgid`) has exited.
fn wait_exit(pid: u32, pgid: u32) {
    let Some(p) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    let Ok(fd) = pidfd_open(p, PidfdFlags::empty()) else {
        // Gone already (ESRCH), or no pidfds (kernel before 5.3): the next round looks again.
        return;
    };
    // The number may have been reused between the listing and the open: wait only for a
    // process that is still in the group.
    if stat_of(pid).is_none_or(|(_, g)| g != pgid) {
        return;
    }
    loop {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, None) {
            Err(rustix::io::Errno::INTR) => {}
            _ => return,
        }
    }
}
