//! Restore throughput, side by side in one run: `timezero restore` of a catalog image (a copy
//! session from the image file) vs `qemu-img convert` of the same image file vs `timezero copy`
//! (a new session from the image file) vs the streamed in-place restore (`timezero restore`
//! onto a destination a no-copy session of the image's table protects: the image streamed
//! through the engine's write path, with copy-before-write for that session), each into a
//! fresh sparse file of the image's size.
//!
//! `cargo build --release && cargo run --release --example restore_bench [DIR [MIB [ROUNDS]]]`
//! (defaults: a new directory under /var/tmp, 2048 MiB, 3 rounds). The image is made as the
//! plan layer makes one: a session on a real table, copied to the end, recorded in a
//! `SqliteStore` with its CRC32C checksums and made `Valid`. The four commands run
//! interleaved, round by round; the figures are medians, and ratios to the restore are what
//! compare (the machine may be shared). Figures: docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use timezero::catalog::{self, Cut, FileVolumes, ImageReader};
use timezero::store::{
    Change, EventId, EventKind, EventRow, IdKind, JobId, JobKind, JobRecord, JobState,
    OccurrenceOutcome, OccurrenceRow, Priority, ScheduleRow, SqliteStore, Store, WaitReason,
};
use timezero::{CopyMode, Engine, EngineOptions, GrainCount, GrainSize, SessionSpec};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let base = args
        .first()
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let mib: u64 = args.get(1).map_or(Ok(2048), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let exe = std::env::var_os("TIMEZERO").map_or_else(
        || {
            let me = std::env::current_exe().unwrap_or_default();
            me.parent()
                .and_then(Path::parent)
                .map(|d| d.join("timezero"))
                .unwrap_or_default()
        },
        PathBuf::from,
    );
    if !exe.is_file() {
        return Err(format!("{} missing: cargo build --release first", exe.display()).into());
    }
    let dir = tempfile::Builder::new()
        .prefix("restore-bench.")
        .tempdir_in(&base)?;
    let d = dir.path();
    let bytes = mib << 20;
    println!(
        "restore_bench: {mib} MiB, {rounds} rounds, in {}",
        d.display()
    );

    // The source: non-zero data, 1 MiB at a time.
    let src = d.join("src.img");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src)?);
        let mut block = vec![0u8; 1 << 20];
        for i in 0..mib {
            for (j, b) in block.iter_mut().enumerate() {
                *b = (j as u64 ^ i.wrapping_mul(0x9E37)) as u8 | 1;
            }
            f.write_all(&block)?;
        }
        f.into_inner()?.sync_all()?;
    }
    let image_file = d.join("image.img");
    std::fs::File::create(&image_file)?.set_len(bytes)?;
    let state = d.join("state");
    std::fs::create_dir(&state)?;
    let table = d.join("backup.tzt");
    let image = backup(&state, &table, &src, &image_file)?;
    println!("image {image} of {} in {}", src.display(), state.display());

    let dest = d.join("dest.img");
    let fresh = |p: &Path| -> Res<()> {
        let _ = std::fs::remove_file(p);
        std::fs::File::create(p)?.set_len(bytes)?;
        Ok(())
    };
    let run = |c: &mut Command| -> Res<f64> {
        let t = Instant::now();
        let o = c.output()?;
        let s = t.elapsed().as_secs_f64();
        if !o.status.success() {
            return Err(format!("{c:?}: {}", String::from_utf8_lossy(&o.stderr).trim_end()).into());
        }
        Ok(s)
    };
    let mut times: [Vec<f64>; 4] = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for round in 0..rounds {
        // The order turns round by round, so no command always runs after the same one.
        for k in 0..4 {
            let which = (round + k) % 4;
            fresh(&dest)?;
            let t = match which {
                0 => run(Command::new(&exe).args([
                    "restore",
                    &image.to_string(),
                    "--to",
                    s(&dest),
                    "--wait",
                    "--state",
                    s(&state),
                ]))?,
                // `-t writeback`: qemu-img convert's default cache mode is `unsafe` (no flush
                // at the end); the other two make their writes durable.
                1 => run(Command::new("qemu-img").args([
                    "convert",
                    "-n",
                    "-t",
                    "writeback",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    s(&image_file),
                    s(&dest),
                ]))?,
                3 => {
                    // A no-copy session of the image's table protects DEST: the restore is in
                    // place and streams. Only the restore is timed.
                    let snap = d.join("snap.img");
                    fresh(&snap)?;
                    let o = Command::new(&exe)
                        .args(["establish", s(&table), s(&dest), s(&snap), "--nocopy"])
                        .output()?;
                    if !o.status.success() {
                        return Err(String::from_utf8_lossy(&o.stderr).trim_end().into());
                    }
                    let text = String::from_utf8_lossy(&o.stdout).to_string();
                    let session = text.split(':').next().unwrap_or_default().to_string();
                    let t = run(Command::new(&exe).args([
                        "restore",
                        &image.to_string(),
                        "--to",
                        s(&dest),
                        "--wait",
                        "--state",
                        s(&state),
                    ]))?;
                    run(Command::new(&exe).args(["withdraw", s(&table), &session]))?;
                    let _ = std::fs::remove_file(&snap);
                    t
                }
                _ => {
                    let t2 = d.join(format!("copy{round}.tzt"));
                    let _ = std::fs::remove_file(&t2);
                    run(Command::new(&exe).args(["init", s(&t2)]))?;
                    run(Command::new(&exe).args([
                        "establish",
                        s(&t2),
                        s(&image_file),
                        s(&dest),
                        "--force",
                    ]))?;
                    run(Command::new(&exe).args(["copy", s(&t2)]))?
                }
            };
            times[which].push(t);
        }
        println!(
            "round {round}: restore {:.2} s, qemu-img convert {:.2} s, timezero copy {:.2} s, streamed in-place restore {:.2} s",
            times[0][round], times[1][round], times[2][round], times[3][round]
        );
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [r, q, c, st] = &mut times;
    let (r, q, c, st) = (med(r), med(q), med(c), med(st));
    let mbs = |t: f64| mib as f64 / t;
    println!("median of {rounds} rounds, {mib} MiB:");
    println!(
        "  timezero restore      {r:.2} s  {:.0} MiB/s  1.00",
        mbs(r)
    );
    println!(
        "  qemu-img convert      {q:.2} s  {:.0} MiB/s  {:.2}",
        mbs(q),
        r / q
    );
    println!(
        "  timezero copy         {c:.2} s  {:.0} MiB/s  {:.2}",
        mbs(c),
        r / c
    );
    println!(
        "  streamed in place     {st:.2} s  {:.0} MiB/s  {:.2}",
        mbs(st),
        r / st
    );
    println!("  (last column: restore time / this time; above 1 = this is faster)");
    println!(
        "  command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Cut, copy and record an image of `src` onto `target` in the store of `state`.
fn backup(state: &Path, table: &Path, src: &Path, target: &Path) -> Res<timezero::store::ImageId> {
    let store = SqliteStore::open(state.join("orchestration.sqlite"))?;
    let event = EventId(store.allocate(IdKind::Event)?);
    let job = JobId(store.allocate(IdKind::Job)?);
    let now = jiff::Timestamp::from_millisecond(jiff::Timestamp::now().as_millisecond())?;
    let day = timezero::store::BackupDay(now.to_zoned(jiff::tz::TimeZone::UTC).date());
    let j = JobRecord {
        id: job,
        kind: JobKind::Backup {
            plan: "bench".to_string(),
        },
        event,
        due_at: now,
        backup_day: day,
        priority: Priority::ALWAYS,
        attempt: 1,
        state: JobState::Queued {
            waiting_on: WaitReason::Broker,
        },
        owner: None,
        plan_text: None,
        plan_sha256: None,
        progress: None,
        created: now,
        started: None,
        ended: None,
        stop_requested: None,
    };
    store.commit(vec![
        Change::PutSchedule {
            schedule: ScheduleRow {
                name: "bench".to_string(),
                expr: format!("once {now}"),
                zone: "UTC".to_string(),
                enabled: false,
            },
            replace: false,
        },
        Change::PutEvent {
            event: EventRow {
                id: event,
                name: "bench".to_string(),
                schedule: "bench".to_string(),
                kind: EventKind::Plan {
                    plan: "bench".to_string(),
                },
                priority: Priority::ALWAYS,
                blocking: false,
                enabled: false,
                next_due: None,
            },
            replace: false,
        },
        Change::InsertJob {
            occurrence: OccurrenceRow {
                event,
                due: now,
                backup_day: day,
                outcome: OccurrenceOutcome::Started(job),
            },
            job: j,
        },
    ])?;
    let engine = Engine::create_path(table, EngineOptions::default())?;
    let s = engine.attach_path(src)?;
    let t = engine.attach_path(target)?;
    let session = engine.establish(&SessionSpec {
        source: s,
        target: t,
        extents: Vec::new(),
        grain: GrainSize::DEFAULT,
        mode: CopyMode::Copy,
        incremental: false,
    })?;
    let desc = engine.session(session)?.desc.clone();
    let image = catalog::record_cut(
        &store,
        &Cut {
            job,
            task: 0,
            plan: "bench",
            backup_day: day,
            table,
        },
        &desc,
    )?;
    engine.copy_all(session, GrainCount(64))?;
    let row = store.image(image)?.ok_or("image row missing")?;
    let reader = ImageReader::open(&row, &FileVolumes::default(), None)?;
    let sums = catalog::checksums(&reader, catalog::image_bytes(&row))?;
    catalog::validate(&store, &engine.status(), image, Some(sums))?;
    engine.close()?;
    Ok(image)
}
