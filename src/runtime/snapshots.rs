//! The old-snapshot watch of the maintenance service: on each heartbeat round of a runtime
//! that runs workers, one look at who holds back vacuum of the database
//! ([`snapshot_holders`](crate::snapshot_holders)), and a `WARN` for each holder older than
//! [`OLD_SNAPSHOT`], repeated at most every [`WARN_EVERY`] while it stays, and an `INFO` when
//! it ends.
//!
//! The age of a holder is how long its transaction has been open when PostgreSQL says so, and
//! otherwise (replication slots, standbys, other roles' sessions without `pg_read_all_stats`)
//! how long this process has seen the same `xmin` held: a lower bound, never an overstatement.

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

use crate::horizon::{SnapshotHolder, SnapshotHolders};

/// A snapshot older than this is reported. At 2 000 jobs/s a snapshot held one minute already
/// leaves about 240 000 dead row versions in a queue table (measured: claims slowed from
/// 0.15 ms to 2 ms); younger ones are ordinary transactions.
pub(crate) const OLD_SNAPSHOT: Duration = Duration::from_secs(60);

/// How often the same holder is reported again while it stays.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(300);

/// One snapshot: its kind, who (pid or name) and the `xmin` it holds.
type Key = (String, String, String);

fn key(h: &SnapshotHolder) -> Key {
    let who = h
        .name
        .clone()
        .or_else(|| h.pid.map(|p| p.to_string()))
        .unwrap_or_default();
    (h.kind.clone(), who, h.xmin.clone())
}

#[derive(Debug)]
struct Seen {
    first: Instant,
    /// When it was last reported (`None`: never, it is young).
    warned: Option<Instant>,
    /// Its last known age.
    age: Duration,
}

/// What the watch has to say after a look.
#[derive(Debug, PartialEq)]
pub(crate) enum Report {
    /// An old snapshot, with its age.
    Old(SnapshotHolder, Duration),
    /// A snapshot reported before has ended, after at least this long.
    Ended {
        kind: String,
        who: String,
        age: Duration,
    },
}

/// The watch's memory between looks.
#[derive(Debug, Default)]
pub(crate) struct SnapshotWatch {
    seen: HashMap<Key, Seen>,
    /// Whether the missing `pg_read_all_stats` was said already.
    said_partial: bool,
}

impl SnapshotWatch {
    /// Takes a look's findings at `now`; what to log.
    pub(crate) fn observe(&mut self, now: Instant, found: &SnapshotHolders) -> Vec<Report> {
        let mut reports = Vec::new();
        let mut current = HashMap::with_capacity(found.holders.len());
        for h in &found.holders {
            let k = key(h);
            let mut seen = self.seen.remove(&k).unwrap_or(Seen {
                first: now,
                warned: None,
                age: Duration::ZERO,
            });
            seen.age = h
                .held
                .unwrap_or_default()
                .max(now.saturating_duration_since(seen.first));
            let due = seen
                .warned
                .is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY);
            if seen.age >= OLD_SNAPSHOT && due {
                seen.warned = Some(now);
                reports.push(Report::Old(h.clone(), seen.age));
            }
            current.insert(k, seen);
        }
        for ((kind, who, _), seen) in self.seen.drain() {
            if seen.warned.is_some() {
                reports.push(Report::Ended {
                    kind,
                    who,
                    age: seen.age,
                });
            }
        }
        self.seen = current;
        reports
    }

    /// Whether to say, once, that this role sees only part of the picture.
    pub(crate) fn say_partial(&mut self, found: &SnapshotHolders) -> bool {
        let say = !found.sees_all && !self.said_partial;
        self.said_partial |= say;
        say
    }
}

/// Logs a look's reports (`queues`: the queues of this runtime's workers).
pub(crate) fn log(reports: Vec<Report>, queues: &str) {
    for r in reports {
        match r {
            Report::Old(h, age) => tracing::warn!(
                kind = %h.kind,
                pid = ?h.pid,
                name = ?h.name,
                age_s = age.as_secs(),
                xids = h.xids,
                application_name = ?h.application,
                role = ?h.role,
                state = ?h.state,
                query = ?h.query,
                queues,
                "an old snapshot holds back vacuum of the queue tables: dead rows accumulate and \
                 claims slow down while it stays open; end it if it is not needed \
                 (pg_terminate_backend(pid), COMMIT PREPARED / ROLLBACK PREPARED, drop the slot)"
            ),
            Report::Ended { kind, who, age } => tracing::info!(
                %kind, %who, age_s = age.as_secs(), queues,
                "the old snapshot holding back vacuum of the queue tables has ended"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(pid: i32, held: Option<u64>) -> SnapshotHolder {
        SnapshotHolder {
            kind: "session".into(),
            pid: Some(pid),
            name: None,
            role: None,
            application: Some("psql".into()),
            state: Some("idle in transaction".into()),
            query: None,
            xids: 1000,
            xmin: "742".into(),
            held: held.map(Duration::from_secs),
        }
    }

    fn found(holders: Vec<SnapshotHolder>) -> SnapshotHolders {
        SnapshotHolders {
            holders,
            sees_all: true,
        }
    }

    #[test]
    fn old_snapshots_are_reported_at_a_bounded_rate_and_their_end_once() {
        let mut w = SnapshotWatch::default();
        let t0 = Instant::now();
        // Young: nothing.
        assert!(w.observe(t0, &found(vec![holder(7, Some(10))])).is_empty());
        // Old: reported with its age.
        let r = w.observe(
            t0 + Duration::from_secs(60),
            &found(vec![holder(7, Some(70))]),
        );
        assert_eq!(
            r,
            vec![Report::Old(holder(7, Some(70)), Duration::from_secs(70))]
        );
        // Not again within WARN_EVERY...
        for s in [90, 200, 300] {
            let at = t0 + Duration::from_secs(s);
            assert!(
                w.observe(at, &found(vec![holder(7, Some(s + 10))]))
                    .is_empty()
            );
        }
        // ...then again.
        let r = w.observe(
            t0 + Duration::from_secs(360),
            &found(vec![holder(7, Some(370))]),
        );
        assert_eq!(r.len(), 1);
        // Its end, once.
        let r = w.observe(t0 + Duration::from_secs(390), &found(vec![]));
        assert_eq!(
            r,
            vec![Report::Ended {
                kind: "session".into(),
                who: "7".into(),
                age: Duration::from_secs(370)
            }]
        );
        assert!(
            w.observe(t0 + Duration::from_secs(420), &found(vec![]))
                .is_empty()
        );
    }

    #[test]
    fn without_a_start_time_the_age_is_how_long_it_was_seen() {
        let mut w = SnapshotWatch::default();
        let t0 = Instant::now();
        assert!(w.observe(t0, &found(vec![holder(9, None)])).is_empty());
        assert!(
            w.observe(t0 + Duration::from_secs(59), &found(vec![holder(9, None)]))
                .is_empty()
        );
        let r = w.observe(t0 + Duration::from_secs(61), &found(vec![holder(9, None)]));
        assert_eq!(
            r,
            vec![Report::Old(holder(9, None), Duration::from_secs(61))]
        );
        // A young holder that ends was never reported: nothing to say.
        let mut w = SnapshotWatch::default();
        w.observe(t0, &found(vec![holder(3, Some(5))]));
        assert!(
            w.observe(t0 + Duration::from_secs(30), &found(vec![]))
                .is_empty()
        );
    }

    #[test]
    fn a_partial_view_is_said_once() {
        let mut w = SnapshotWatch::default();
        let partial = SnapshotHolders {
            holders: vec![],
            sees_all: false,
        };
        assert!(w.say_partial(&partial));
        assert!(!w.say_partial(&partial));
        assert!(!w.say_partial(&found(vec![])));
    }
}
