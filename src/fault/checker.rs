//! The online ordering checker (crash-model rule 2).
//!
//! At every volume write the checker opens a copy of the *durable* table bytes (what a crash
//! right now would leave) and, for every active session whose source range the write touches,
//! demands that each touched grain (a) has its copied bit in the durable table and (b) when the
//! grain has not been written since T0, has durable target bytes equal to the source's current
//! bytes (its T0 bytes). The first write to a grain after T0 is exactly the one that would
//! destroy T0 data, so that is where (b) is checked. A grain whose record names the table's
//! copy log passes (b) as well when the durable log holds its T0 bytes there (the target's
//! flush comes later, at the log's retire).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::activity::{MemStorage, Table, TableStorage};

/// What the checker reads of the simulated devices (implemented by the simulated world, so the
/// checker depends on nothing of it).
pub(crate) trait Devices {
    /// The device whose volume has this locator (`mem:NAME`).
    fn dev_by_locator(&self, locator: &str) -> Option<usize>;
    /// The bytes of device `dev` that a crash right now would leave.
    fn durable(&self, dev: usize) -> &[u8];
    /// The bytes of device `dev` as written so far.
    fn current(&self, dev: usize) -> &[u8];
    /// The table device, once there is one.
    fn table_dev(&self) -> Option<usize>;
}

/// State of the online ordering checker (lives inside a [`super::SimWorld`]).
#[derive(Debug, Default)]
pub struct OrderingChecker {
    /// Per session id: image grains already written at the source since T0.
    touched: BTreeMap<u64, BTreeSet<u64>>,
    /// Byte ranges per device written by the user as a target (leave the relationship).
    user: Vec<(usize, u64, u64)>,
    /// Source writes checked.
    pub checks: u64,
    /// The durable table bytes last opened and what opening them gave (`None`: no valid table
    /// yet): reopened only when the durable bytes changed, that is after a table flush.
    opened: Option<(Vec<u8>, Option<Table>)>,
}

impl OrderingChecker {
    pub(crate) fn note_user_write(&mut self, dev: usize, off: u64, len: u64) {
        self.user.push((dev, off, off.saturating_add(len)));
    }

    fn user_written(&self, dev: usize, off: u64, len: u64) -> bool {
        self.user
            .iter()
            .any(|(d, s, e)| *d == dev && off < *e && *s < off + len)
    }

    /// Check a write of `len` bytes at `off` to volume `dev` before it is applied.
    pub(crate) fn on_volume_write(
        &mut self,
        w: &dyn Devices,
        dev: usize,
        off: u64,
        len: u64,
    ) -> Vec<String> {
        let out = Vec::new();
        let Some(tdev) = w.table_dev() else {
            return out;
        };
        let durable = w.durable(tdev);
        if !matches!(&self.opened, Some((b, _)) if b.as_slice() == durable) {
            let storage: Arc<dyn TableStorage> =
                Arc::new(MemStorage::from_bytes("durable", durable.to_vec()));
            // Checked copies are taken as recorded: (b) below checks their target bytes.
            let table = Table::open_verified(storage, false, &mut |_, _, _| {
                Ok(crate::activity::CopyProof::Proven)
            })
            .ok()
            .map(|(t, _)| t);
            self.opened = Some((durable.to_vec(), table));
        }
        match self.opened.take() {
            Some((bytes, Some(table))) => {
                let found = self.check_sessions(w, &table, dev, off, len, out);
                self.opened = Some((bytes, Some(table)));
                found
            }
            // No durable table yet (creation in progress): no session can exist.
            other => {
                self.opened = other;
                out
            }
        }
    }

    fn check_sessions(
        &mut self,
        w: &dyn Devices,
        table: &Table,
        dev: usize,
        off: u64,
        len: u64,
        mut out: Vec<String>,
    ) -> Vec<String> {
        self.checks += 1;
        for s in table.sessions() {
            if !s.is_live() || w.dev_by_locator(&s.desc.source.locator) != Some(dev) {
                continue;
            }
            let Some(tgt) = w.dev_by_locator(&s.desc.target.locator) else {
                continue;
            };
            let id = s.id().0;
            for p in s.map.source_pieces(off, len) {
                if !s.extent_live(p.extent) {
                    continue;
                }
                let (g0, g1) = s.map.grains_of(&p);
                for g in g0..g1 {
                    if !s.bits().get(g) {
                        out.push(format!(
                            "ordering: source write {off}+{len} issued to grain {g} of session \
                             {id} whose copied bit is not durable"
                        ));
                        continue;
                    }
                    if self.touched.get(&id).is_some_and(|t| t.contains(&g)) {
                        continue;
                    }
                    self.touched.entry(id).or_default().insert(g);
                    let Some(gp) = s.map.grain_piece(g, g + 1) else {
                        continue;
                    };
                    if self.user_written(tgt, gp.target_offset, gp.len) {
                        continue;
                    }
                    let (so, to, l) = (
                        usize::try_from(gp.source_offset).unwrap_or(usize::MAX),
                        usize::try_from(gp.target_offset).unwrap_or(usize::MAX),
                        usize::try_from(gp.len).unwrap_or(0),
                    );
                    let t0 = w.current(dev).get(so..so + l);
                    let durable = w.durable(tgt).get(to..to + l);
                    if t0 != durable && table.log_bytes(&s, g).as_deref() != t0 {
                        out.push(format!(
                            "ordering: source write {off}+{len} issued to grain {g} of session \
                             {id} before its T0 bytes were durable in the target or the copy log"
                        ));
                    }
                }
            }
        }
        out
    }
}
