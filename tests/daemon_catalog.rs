//! The daemon and the catalog on the real binary and the real SQLite store: at start it runs
//! the catalog reconcile (CAT-04) and then retention (CAT-05), in that order, as at NEWDAY.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod daemon_rig;

use std::path::PathBuf;

use daemon_rig::{text, Rig, T0};
use timezero::store::{ImageQuery, ImageRecord, ImageStateKind, Store};

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
