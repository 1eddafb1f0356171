//! The daemon and the catalog on the real binary and the real SQLite store: at start it runs
//! the catalog reconcile (CAT-04) and then retention (CAT-05), in that order, as at NEWDAY.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod daemon_rig;

use std::path::PathBuf;

use daemon_rig::{text, Rig, T0};
use timezero::store::{ImageQuery, ImageRecord, ImageState, ImageStateKind, Store};
use timezero::{CopyMode, ReasonCode};

/// Every image of the catalog, oldest first.
fn images(r: &Rig) -> Vec<ImageRecord> {
    let mut all = r.store().images(&ImageQuery::default()).unwrap();
    all.sort_by_key(|i| i.id);
    all
}

fn target(i: &ImageRecord) -> PathBuf {
    PathBuf::from(&i.target.locator)
}

/// Two runs of the plan with its two sources, in this process: four `Valid` copy images.
fn two_runs(r: &Rig) -> Vec<ImageRecord> {
    for _ in 0..2 {
        let out = r.tz(&["plan", "run", "db", "--wait"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    let all = images(r);
    assert_eq!(all.len(), 4, "{all:?}");
    assert!(all.iter().all(|i| i.state.kind() == ImageStateKind::Valid));
    assert!(all.iter().all(|i| target(i).exists()));
    all
}

#[test]
fn cat_04_reconcile_at_daemon_start_marks_a_vanished_target_lost() {
    let r = Rig::new("", "");
    let all = two_runs(&r);
    std::fs::remove_file(target(&all[0])).unwrap();
    let mut d = r.start_daemon(Some(T0), &[]);
    r.wait_until("the vanished image is lost", || {
        images(&r)[0].state.kind() == ImageStateKind::Lost
    });
    // The others are untouched.
    for i in &images(&r)[1..] {
        assert_eq!(i.state.kind(), ImageStateKind::Valid, "{i:?}");
        assert!(target(i).exists());
    }
    r.kill(&mut d);
}

/// Retention keeps the newest image per source (`keep_last = 1`) and runs at start, after the
/// reconcile. The newest image of one source lost its target: the reconcile marks it `Lost`
/// first, so retention keeps that source's older image (the newest still `Valid`), and expires
/// the other source's older one (row `Expired`, then its file removed). Were retention to count
/// the lost image, it would remove the only good copy.
#[test]
fn cat_05_retention_at_daemon_start_runs_after_reconcile() {
    let r = Rig::new("", "");
    let plan = r.state.join("plans/db.toml");
    let mut text_of_plan = std::fs::read_to_string(&plan).unwrap();
    text_of_plan.push_str("[retention]\nkeep_last = 1\n");
    std::fs::write(&plan, text_of_plan).unwrap();
    let all = two_runs(&r);
    let source = |i: &ImageRecord| i.source.locator.clone();
    let newest_a = all
        .iter()
        .rev()
        .find(|i| source(i) == source(&all[0]))
        .unwrap()
        .clone();
    let older_b = all
        .iter()
        .find(|i| source(i) != source(&all[0]))
        .unwrap()
        .clone();
    assert_ne!(newest_a.id, all[0].id);
    std::fs::remove_file(target(&newest_a)).unwrap();

    let mut d = r.start_daemon(Some(T0), &[]);
    r.wait_until("the other source's older image expired", || {
        images(&r)
            .iter()
            .any(|i| i.id == older_b.id && i.state.kind() == ImageStateKind::Expired)
    });
    r.wait_until("its file removed", || !target(&older_b).exists());
    let now = images(&r);
    let state_of = |id| now.iter().find(|i| i.id == id).unwrap().state.kind();
    assert_eq!(state_of(newest_a.id), ImageStateKind::Lost);
    // The lost image does not count: the older image of that source is kept, file and all.
    assert_eq!(state_of(all[0].id), ImageStateKind::Valid);
    assert!(target(&all[0]).exists());
    // A Valid image's file is never deleted.
    for i in now
        .iter()
        .filter(|i| i.state.kind() == ImageStateKind::Valid)
    {
        assert!(target(i).exists(), "{i:?}");
    }
    r.kill(&mut d);
}

/// With `keep_last = 1` the older image of each source expires. A daemon killed (kill -9)
/// between the two steps of the expiry (the rows `Expired`, no file removed yet: the kill point
/// `retention-marked`) leaves both files; its next start finishes the removal in its catalog
/// reconcile. A `Valid` image's file is there throughout.
#[test]
fn cat_05_a_daemon_killed_between_the_two_steps_of_an_expiry_finishes_it_at_its_next_start() {
    let r = Rig::new("", "");
    let plan = r.state.join("plans/db.toml");
    let mut text_of_plan = std::fs::read_to_string(&plan).unwrap();
    text_of_plan.push_str("[retention]\nkeep_last = 1\n");
    std::fs::write(&plan, text_of_plan).unwrap();
    let all = two_runs(&r);
    // The first run's two images are the older ones of their sources.
    let (older, newer) = all.split_at(2);
    assert_ne!(older[0].source.locator, older[1].source.locator);
    let valid_files_are_there = || {
        for i in images(&r)
            .iter()
            .filter(|i| i.state.kind() == ImageStateKind::Valid)
        {
            assert!(target(i).exists(), "a Valid image lost its file: {i:?}");
        }
    };

    let mut d = r.spawn_daemon(T0, &[("TIMEZERO_TEST_STOP_AT", "retention-marked")]);
    r.wait_until("the older images marked expired", || {
        let now = images(&r);
        older.iter().all(|o| {
            now.iter()
                .any(|i| i.id == o.id && i.state.kind() == ImageStateKind::Expired)
        })
    });
    // Stopped for good after the marking: no file was removed.
    for o in older {
        assert!(target(o).exists(), "{o:?}");
    }
    valid_files_are_there();
    r.kill(&mut d);

    let mut d = r.start_daemon(Some(T0), &[]);
    r.wait_until("the expired images' files removed", || {
        older.iter().all(|o| !target(o).exists())
    });
    let now = images(&r);
    for o in older {
        let row = now.iter().find(|i| i.id == o.id).unwrap();
        assert_eq!(row.state.kind(), ImageStateKind::Expired);
    }
    for n in newer {
        let row = now.iter().find(|i| i.id == n.id).unwrap();
        assert_eq!(row.state.kind(), ImageStateKind::Valid);
        assert!(target(n).exists());
    }
    valid_files_are_there();
    // The removal was the catalog reconcile's, finishing what the killed daemon started.
    let said = r.daemon_text();
    for o in older {
        assert!(
            said.contains(&format!("expired image {}: target", o.id)),
            "{said}"
        );
    }
    r.kill(&mut d);
}

/// A reset notification raised through the held table's control socket (`timezero reset TABLE
/// VOLUME`, sent to the daemon that serves the table) after a source was replaced by another
/// file: the engine terminates the nocopy session on it, and the daemon, told by the engine,
/// runs the catalog reconcile at once: the image turns `Lost` with the engine's reason. The
/// other source's image stays `Valid`.
#[test]
fn cat_04_a_reset_handled_by_the_daemon_marks_the_nocopy_image_lost_with_the_engine_reason() {
    let r = Rig::new("", "mode = \"nocopy\"");
    let out = r.tz(&["plan", "run", "db", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let all = images(&r);
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all
        .iter()
        .all(|i| i.state.kind() == ImageStateKind::Valid && i.mode == CopyMode::NoCopy));
    let a = std::fs::canonicalize(r.vols.join("a.img")).unwrap();
    let on_a = all
        .iter()
        .find(|i| i.source.locator == a.display().to_string())
        .unwrap()
        .clone();
    let mut d = r.start_daemon(Some(T0), &[]);
    // The daemon's start found nothing to reconcile.
    assert!(images(&r)
        .iter()
        .all(|i| i.state.kind() == ImageStateKind::Valid));

    // Another file takes a.img's place (a new identity), and the storage says so.
    let other = r.vols.join("a.new");
    std::fs::write(&other, daemon_rig::data(9)).unwrap();
    std::fs::rename(&other, &a).unwrap();
    let table = r.state.join("db.tzt");
    let out = r.tz_plain(&["reset", table.to_str().unwrap(), a.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    r.wait_until("the image on the replaced source lost", || {
        images(&r)
            .iter()
            .any(|i| i.id == on_a.id && i.state.kind() == ImageStateKind::Lost)
    });
    let now = images(&r);
    let row = now.iter().find(|i| i.id == on_a.id).unwrap();
    let ImageState::Lost { why, engine } = &row.state else {
        panic!("{row:?}")
    };
    let engine = engine.as_ref().expect("the engine's reason is kept");
    assert_eq!(engine.code, ReasonCode::ResetMismatch, "{engine:?} ({why})");
    for i in now.iter().filter(|i| i.id != on_a.id) {
        assert_eq!(i.state.kind(), ImageStateKind::Valid, "{i:?}");
    }
    assert!(
        r.daemon_text().contains("reset handled on"),
        "{}",
        r.daemon_text()
    );
    r.kill(&mut d);
}
