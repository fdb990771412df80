//! The campaign's independent checker. It reads the database and the append-only logs of the
//! producers and of the handlers (see `campaign.rs` for who writes what), never the
//! orchestrator's idea of what happened to a job; the fault log only counts the faults and tells
//! which re-runs after a finished run a fault can explain.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde_json::Value;
use sqlx::PgPool;

use super::{
    Res,
    vocab::{FaultKind, JobKind, PRIO_QUEUE, QUEUE, read_json_lines},
};

/// What the checker found; `ok` when every count that must be zero is.
pub(crate) struct Report {
    pub(crate) ok: bool,
    pub(crate) text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Archived,
    Dead,
    Queued,
}

#[derive(Debug, Clone)]
struct DbMsg {
    q: String,
    msg: i64,
    place: Place,
    key: Option<String>,
    reason: Option<String>,
    /// Seconds until visible (queued rows).
    vt_in: f64,
    /// The `read_ct` it was archived with: the delivery whose outcome was written.
    read_ct: i32,
}

#[derive(Debug, Clone, Default)]
struct Push {
    kind: Option<JobKind>,
    tried_at: u64,
    delay_ms: Option<u64>,
    key: Option<String>,
    acked: Option<(String, Option<i64>, bool)>,
    failed: bool,
    waits: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct Run {
    lid: u64,
    pid: u32,
    rc: i64,
    start: u64,
    /// E or X time.
    end: Option<u64>,
    /// "ok", "fail", "panic", "abort", "stopped", or "" (no end line).
    how: String,
}

fn u(v: &Value, k: &str) -> Option<u64> {
    v.get(k).and_then(Value::as_u64)
}

fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

/// At most 20 ids, for the report.
fn ids<T: std::fmt::Display>(v: &[T]) -> String {
    if v.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = v.iter().take(20).map(ToString::to_string).collect();
    format!(
        " [{}{}]",
        shown.join(", "),
        if v.len() > 20 { ", …" } else { "" }
    )
}

/// A dead letter: the job's msg_id, its own, the producer's id, the key, the reason.
type DeadRow = (
    Option<i64>,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// Every message of the campaign's queues, archives and dead-letter queues, with the producer's
/// id read from its body (0 when unreadable).
async fn read_db(pool: &PgPool) -> Res<Vec<(u64, DbMsg)>> {
    let mut out = Vec::new();
    let lid = "CASE WHEN jsonb_typeof(message) = 'object' AND jsonb_typeof(message->'lid') = 'number' \
               THEN (message->>'lid')::bigint END";
    let id = |l: Option<i64>| l.and_then(|l| u64::try_from(l).ok()).unwrap_or(0);
    for q in [QUEUE, PRIO_QUEUE] {
        let rows: Vec<(i64, Option<i64>, Option<String>, i32)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT msg_id, {lid}, headers->'apalis'->>'idempotency_key', read_ct \
                 FROM pgmq.a_{q}"
            )))
            .fetch_all(pool)
            .await?;
        for (msg, lid, key, read_ct) in rows {
            out.push((
                id(lid),
                DbMsg {
                    q: q.into(),
                    msg,
                    place: Place::Archived,
                    key,
                    reason: None,
                    vt_in: 0.0,
                    read_ct,
                },
            ));
        }
        let rows: Vec<DeadRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT (headers->'apalis_dead_letter'->>'msg_id')::bigint, msg_id, {lid}, \
                        headers->'apalis'->>'idempotency_key', \
                        headers->'apalis_dead_letter'->>'reason' \
                 FROM pgmq.q_{q}_dlq"
        )))
        .fetch_all(pool)
        .await?;
        for (orig, own, lid, key, reason) in rows {
            out.push((
                id(lid),
                DbMsg {
                    q: q.into(),
                    msg: orig.unwrap_or(-own),
                    place: Place::Dead,
                    key,
                    reason,
                    vt_in: 0.0,
                    read_ct: 0,
                },
            ));
        }
        let rows: Vec<(i64, Option<i64>, Option<String>, f64)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT msg_id, {lid}, headers->'apalis'->>'idempotency_key', \
                        extract(epoch FROM vt - clock_timestamp())::float8 FROM pgmq.q_{q}"
            )))
            .fetch_all(pool)
            .await?;
        for (msg, lid, key, vt_in) in rows {
            out.push((
                id(lid),
                DbMsg {
                    q: q.into(),
                    msg,
                    place: Place::Queued,
                    key,
                    reason: None,
                    vt_in,
                    read_ct: 0,
                },
            ));
        }
    }
    Ok(out)
}

/// A fault's active window, from the fault log: `slot` None for the whole server.
struct Window {
    slot: Option<u64>,
    from: u64,
    to: u64,
}

/// Runs the checks on a campaign's directory and database.
pub(crate) async fn check(dir: &Path, pool: &PgPool) -> Res<Report> {
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("campaign.json"))?)?;
    let vt_ms = u(&meta, "vt_ms").unwrap_or(2500);
    let mut out = String::new();
    let mut ok = true;

    // -------- the producers' log
    let mut pushes: BTreeMap<u64, Push> = BTreeMap::new();
    for l in read_json_lines(&dir.join("producer.log")) {
        let Some(lid) = u(&l, "lid") else { continue };
        let p = pushes.entry(lid).or_default();
        let kind = l
            .get("kind")
            .and_then(|k| serde_json::from_value::<JobKind>(k.clone()).ok());
        match s(&l, "k") {
            Some("T") => {
                p.kind = kind;
                p.tried_at = u(&l, "at").unwrap_or(0);
                p.delay_ms = u(&l, "delay_ms");
                p.key = s(&l, "key").map(str::to_owned);
            }
            Some("A") => {
                p.acked = Some((
                    s(&l, "q").unwrap_or_default().to_owned(),
                    l.get("msg").and_then(Value::as_i64),
                    l.get("dup").and_then(Value::as_bool).unwrap_or(false),
                ));
            }
            Some("F") => p.failed = true,
            Some("W") => p.waits.push((
                s(&l, "outcome").unwrap_or_default().to_owned(),
                s(&l, "detail").unwrap_or_default().to_owned(),
            )),
            _ => {}
        }
    }

    // -------- the handlers' logs
    let mut runs: BTreeMap<(String, i64), Vec<Run>> = BTreeMap::new();
    // Every death of each pid, in order: a pid can be reused by a later worker process (seen in
    // a 40-minute campaign), and a run ends at the first death of its pid after it started.
    let mut deaths: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
    let mut slot_of: BTreeMap<u32, u64> = BTreeMap::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !(name.starts_with('w') && name.ends_with(".log")) {
            continue;
        }
        let slot: Option<u64> = name[1..].split('-').next().and_then(|x| x.parse().ok());
        let mut open: BTreeMap<(String, i64, u32), Vec<usize>> = BTreeMap::new();
        for l in read_json_lines(&e.path()) {
            let at = u(&l, "at").unwrap_or(0);
            let pid = u(&l, "pid")
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0);
            match s(&l, "k") {
                Some("B") => {
                    if let Some(sl) = slot {
                        slot_of.insert(pid, sl);
                    }
                }
                Some("D") => {
                    deaths
                        .entry(pid)
                        .or_default()
                        .push((at, s(&l, "cause").unwrap_or_default().to_owned()));
                }
                Some(k @ ("S" | "E" | "X")) => {
                    let q = s(&l, "q").unwrap_or_default().to_owned();
                    let msg = l.get("msg").and_then(Value::as_i64).unwrap_or(0);
                    let list = runs.entry((q.clone(), msg)).or_default();
                    if k == "S" {
                        open.entry((q, msg, pid)).or_default().push(list.len());
                        list.push(Run {
                            lid: u(&l, "lid").unwrap_or(0),
                            pid,
                            rc: l.get("rc").and_then(Value::as_i64).unwrap_or(0),
                            start: at,
                            end: None,
                            how: String::new(),
                        });
                    } else if let Some(i) = open.get_mut(&(q, msg, pid)).and_then(Vec::pop) {
                        list[i].end = Some(at);
                        list[i].how = if k == "X" {
                            "stopped".into()
                        } else {
                            s(&l, "r").unwrap_or_default().to_owned()
                        };
                    }
                }
                _ => {}
            }
        }
    }
    for list in runs.values_mut() {
        list.sort_by_key(|r| r.start);
    }
    // Every run of a producer's id, in start order per message.
    let mut runs_of: BTreeMap<u64, Vec<&Run>> = BTreeMap::new();
    for r in runs.values().flatten() {
        runs_of.entry(r.lid).or_default().push(r);
    }

    // -------- the fault log
    let mut windows: Vec<Window> = Vec::new();
    let mut fault_counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut open_faults: BTreeMap<(String, Option<u64>, u64), u64> = BTreeMap::new();
    let mut unexpected_exits = Vec::new();
    // A fault the orchestrator could not apply or undo (a restart that failed): the run did not
    // test what it says.
    let mut failed_faults = Vec::new();
    for l in read_json_lines(&dir.join("faults.log")) {
        let kind = s(&l, "kind").unwrap_or_default().to_owned();
        let slot = u(&l, "slot");
        let at = u(&l, "at").unwrap_or(0);
        let key = (kind.clone(), slot, u(&l, "offset_ms").unwrap_or(0));
        match s(&l, "phase") {
            Some("start") => {
                let c = fault_counts.entry(kind).or_default();
                if s(&l, "detail").is_some_and(|d| d.starts_with("skipped")) {
                    c.1 += 1;
                } else {
                    c.0 += 1;
                    open_faults.insert(key, at);
                }
            }
            Some("end") => {
                if let Some(d) = s(&l, "detail").filter(|d| d.starts_with("failed")) {
                    failed_faults.push(format!("{} at {} ms: {d}", key.0, key.2));
                }
                if let Some(from) = open_faults.remove(&key) {
                    // A freeze's connections stay silent after the thaw (only new ones flow):
                    // the worker learns of each at its statement's deadline, at most the
                    // visibility timeout later, and until then its outcomes wait on them.
                    let lingers = if key.0 == "freeze" { vt_ms * 1000 } else { 0 };
                    windows.push(Window {
                        slot,
                        from,
                        to: at.saturating_add(lingers),
                    });
                }
            }
            Some("unexpected_exit") => unexpected_exits.push(format!(
                "slot {}: {}",
                slot.unwrap_or(0),
                s(&l, "detail").unwrap_or_default()
            )),
            _ => {}
        }
    }
    for ((_, slot, _), from) in open_faults {
        windows.push(Window {
            slot,
            from,
            to: u64::MAX,
        });
    }

    // -------- the database
    let msgs = read_db(pool).await?;
    let mut by_lid: BTreeMap<u64, Vec<&DbMsg>> = BTreeMap::new();
    let mut by_msg: BTreeMap<(String, i64), Vec<(u64, &DbMsg)>> = BTreeMap::new();
    for (lid, m) in &msgs {
        by_lid.entry(*lid).or_default().push(m);
        by_msg
            .entry((m.q.clone(), m.msg))
            .or_default()
            .push((*lid, m));
    }

    // -------- 1. exactly one terminal outcome per acknowledged push
    let mut lost = Vec::new();
    let mut doubled = Vec::new();
    let mut unfinished = Vec::new();
    let mut wrong_id = Vec::new();
    let mut unacked_twice = Vec::new();
    let mut phantom = Vec::new();
    let mut refused_written = Vec::new();
    let mut key_mismatch = Vec::new();
    let mut wrong_outcome = Vec::new();
    let mut outcomes: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut pushed: BTreeMap<&str, [u64; 4]> = BTreeMap::new();
    for (lid, p) in &pushes {
        let kind = p.kind.map_or("?", JobKind::name);
        let c = pushed.entry(kind).or_default();
        c[0] += 1;
        let found = by_lid.get(lid).map_or(&[][..], Vec::as_slice);
        let Some((q, msg, dup)) = &p.acked else {
            if p.failed {
                c[2] += 1;
            }
            // Not acknowledged: it may have landed (an acknowledgement lost in a crash), once.
            if found.len() > 1 {
                unacked_twice.push(*lid);
            }
            continue;
        };
        c[1] += 1;
        if *dup {
            c[3] += 1;
            // Refused: nothing written for this push; the job it named must be terminal.
            if !found.is_empty() {
                refused_written.push(*lid);
            }
            let Some(msg) = msg else {
                lost.push(*lid);
                continue;
            };
            let target = by_msg
                .get(&(q.clone(), *msg))
                .map_or(&[][..], Vec::as_slice);
            if target.iter().any(|(_, m)| m.key != p.key) {
                key_mismatch.push(*lid);
            }
            match target {
                [] => lost.push(*lid),
                [(_, m)] if m.place == Place::Queued => unfinished.push(*lid),
                [_] => {}
                _ => doubled.push(*lid),
            }
            continue;
        }
        let outcome = match found {
            [] => {
                // Deleted by design: an abort job whose last run returned AbortError.
                let aborted = runs_of
                    .get(lid)
                    .and_then(|r| r.iter().max_by_key(|r| r.start))
                    .is_some_and(|r| r.how == "abort");
                if aborted {
                    "deleted"
                } else {
                    lost.push(*lid);
                    "lost"
                }
            }
            [m] => {
                if msg.is_some_and(|id| id != m.msg) || &m.q != q {
                    wrong_id.push(*lid);
                }
                match m.place {
                    Place::Archived => "archived",
                    Place::Dead => {
                        if m.reason.as_deref() == Some("undecodable") {
                            "dead-lettered (undecodable)"
                        } else {
                            "dead-lettered"
                        }
                    }
                    Place::Queued => {
                        unfinished.push(*lid);
                        "unfinished"
                    }
                }
            }
            _ => {
                doubled.push(*lid);
                "doubled"
            }
        };
        *outcomes.entry((kind, outcome)).or_default() += 1;
        let expected = match p.kind {
            Some(JobKind::Poison) => outcome == "dead-lettered (undecodable)",
            Some(JobKind::Doomed) => outcome == "dead-lettered",
            Some(JobKind::Abort) => outcome == "deleted",
            _ => matches!(outcome, "archived" | "dead-lettered"),
        };
        if !expected && !matches!(outcome, "lost" | "doubled" | "unfinished") {
            wrong_outcome.push(*lid);
        }
    }
    for lid in by_lid.keys() {
        if pushes.get(lid).is_none_or(|p| p.kind.is_none()) {
            phantom.push(*lid);
        }
    }
    // The read_ct fence: an archived job was archived by the delivery whose run finished ok.
    let mut unfenced = Vec::new();
    for (lid, m) in &msgs {
        if m.place != Place::Archived {
            continue;
        }
        let by_that_delivery = runs.get(&(m.q.clone(), m.msg)).is_some_and(|r| {
            r.iter()
                .any(|r| r.rc == i64::from(m.read_ct) && r.how == "ok")
        });
        if !by_that_delivery {
            unfenced.push(format!("{lid} (msg {}, read_ct {})", m.msg, m.read_ct));
        }
    }
    let r1 = unfenced.len()
        + lost.len()
        + doubled.len()
        + unfinished.len()
        + wrong_id.len()
        + unacked_twice.len()
        + phantom.len()
        + refused_written.len()
        + key_mismatch.len()
        + wrong_outcome.len();
    ok &= r1 == 0;

    // -------- 2. every job ran at least once (a poison message never)
    let mut never_ran = Vec::new();
    let mut poison_ran = Vec::new();
    for (lid, p) in &pushes {
        let Some((_, _, false)) = p.acked else {
            continue;
        };
        let ran = runs_of.get(lid).map_or(0, Vec::len);
        if p.kind == Some(JobKind::Poison) {
            if ran > 0 {
                poison_ran.push(*lid);
            }
        } else if ran == 0 && !lost.contains(lid) {
            never_ran.push(*lid);
        }
    }
    ok &= never_ran.is_empty() && poison_ran.is_empty();

    // -------- 3. no two runs of one job at once; re-runs explained
    let mut overlaps = Vec::new();
    let mut never_ended = Vec::new();
    let mut reruns: BTreeMap<&str, u64> = BTreeMap::new();
    let mut unexplained = Vec::new();
    let mut total_runs = 0usize;
    let mut over_lease = 0usize;
    for ((_, msg), list) in &runs {
        total_runs += list.len();
        // A run ends at its E or X line, or when its process was reaped.
        let end = |r: &Run| {
            r.end
                .or_else(|| death_after(&deaths, r.pid, r.start).map(|d| d.0))
        };
        for r in list {
            if end(r).is_none() {
                never_ended.push(r.lid);
            }
            if r.end.is_some_and(|e| e - r.start > vt_ms * 1000) {
                over_lease += 1;
            }
        }
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if end(a).is_none_or(|e| e > b.start) {
                    overlaps.push(format!("{} (msg {msg})", a.lid));
                }
            }
        }
        for w in list.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            let kind = match a.how.as_str() {
                "fail" | "panic" => "retry after a failure (by design)",
                "stopped" => "after a run stopped for a lost lease",
                "" => "after a run cut short by its process's death",
                _ => {
                    // It finished, yet ran again: its outcome was not written in time.
                    let e = a.end.unwrap_or(a.start);
                    let died = death_after(&deaths, a.pid, a.start)
                        .is_some_and(|(d, c)| *d <= b.start && c.starts_with("killed"));
                    let slot = slot_of.get(&a.pid).copied();
                    let fault = windows.iter().any(|w| {
                        (w.slot.is_none() || w.slot == slot)
                            && w.from <= b.start
                            && w.to + 1_000_000 >= e
                    });
                    if died {
                        "finished, outcome lost with its process"
                    } else if fault {
                        "finished, outcome not written during a fault"
                    } else {
                        unexplained.push(format!("{} (msg {msg}, rc {})", a.lid, b.rc));
                        "finished, unexplained"
                    }
                }
            };
            *reruns.entry(kind).or_default() += 1;
        }
    }
    ok &= overlaps.is_empty() && unexplained.is_empty() && never_ended.is_empty();

    // -------- 4. nothing stuck
    let vt_s = vt_ms as f64 / 1000.0;
    let stuck: Vec<String> = msgs
        .iter()
        .filter(|(_, m)| m.place == Place::Queued && m.vt_in > vt_s)
        .map(|(lid, m)| format!("{lid} (msg {}, visible in {:.0} s)", m.msg, m.vt_in))
        .collect();
    let queued = msgs
        .iter()
        .filter(|(_, m)| m.place == Place::Queued)
        .count();
    ok &= stuck.is_empty();

    // -------- 5. every push_and_wait: its result or its timeout
    let mut wait_counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut wait_bad = Vec::new();
    for (lid, p) in pushes.iter().filter(|(_, p)| p.kind == Some(JobKind::Wait)) {
        match p.waits.as_slice() {
            [(o, detail)] => {
                *wait_counts.entry(o.clone()).or_default() += 1;
                let fine = match o.as_str() {
                    "ok" => detail == &lid.to_string(),
                    "err" | "timeout" | "push_failed" => true,
                    _ => false,
                };
                if !fine {
                    wait_bad.push(format!("{lid} ({o}: {detail})"));
                }
            }
            other => wait_bad.push(format!("{lid} ({} answers)", other.len())),
        }
    }
    ok &= wait_bad.is_empty();

    // -------- extra: delayed jobs never start early; workers never exit by themselves
    let mut early = Vec::new();
    for (lid, p) in &pushes {
        let (Some(d), Some((_, _, false))) = (p.delay_ms, &p.acked) else {
            continue;
        };
        // run_after is whole seconds of the producer's clock: visible at most 1 s early.
        let due = p.tried_at + d * 1000;
        let first = runs_of
            .get(lid)
            .and_then(|r| r.iter().map(|r| r.start).min());
        if first.is_some_and(|f| f + 1_000_000 < due) {
            early.push(*lid);
        }
    }
    // A process asked to stop at the end (stdin closed) that had to be killed after 30 s.
    let unstoppable: Vec<String> = deaths
        .iter()
        .flat_map(|(pid, list)| list.iter().map(move |d| (pid, d)))
        .filter(|(_, (_, cause))| cause.starts_with("did not stop"))
        .map(|(pid, _)| {
            format!(
                "pid {pid} (slot {})",
                slot_of.get(pid).copied().unwrap_or(0)
            )
        })
        .collect();
    ok &= early.is_empty()
        && unexpected_exits.is_empty()
        && unstoppable.is_empty()
        && failed_faults.is_empty();

    // -------- the report
    let _ = writeln!(out, "\nfaults applied (skipped) by kind:");
    for k in FaultKind::ALL {
        let (a, sk) = fault_counts.get(k.name()).copied().unwrap_or_default();
        let _ = writeln!(out, "  {:<22} {a:>5} ({sk})", k.name());
    }
    let _ = writeln!(
        out,
        "\njobs by kind: tried / acknowledged / failed to push / refused as duplicates"
    );
    for k in JobKind::ALL {
        let c = pushed.get(k.name()).copied().unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<8} {:>6} {:>6} {:>6} {:>6}",
            k.name(),
            c[0],
            c[1],
            c[2],
            c[3]
        );
    }
    let _ = writeln!(out, "\nterminal outcomes of acknowledged pushes by kind:");
    for ((k, o), n) in &outcomes {
        let _ = writeln!(out, "  {k:<8} {o:<28} {n:>6}");
    }
    let _ = writeln!(
        out,
        "\nruns: {total_runs} ({over_lease} longer than the {vt_ms} ms lease); re-runs:"
    );
    for (k, n) in &reruns {
        let _ = writeln!(out, "  {k:<48} {n:>6}");
    }
    let _ = writeln!(out, "\ncheck (every count must be 0):");
    let mut line = |name: &str, v: &[String]| {
        let _ = writeln!(out, "  {name:<62} {:>5}{}", v.len(), ids(v));
    };
    let st = |v: &[u64]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    line("1. acknowledged, no terminal outcome (lost)", &st(&lost));
    line(
        "1. acknowledged, more than one outcome (doubled)",
        &st(&doubled),
    );
    line(
        "1. acknowledged, still queued after settling",
        &st(&unfinished),
    );
    line(
        "1. acknowledged id differs from the stored job's",
        &st(&wrong_id),
    );
    line(
        "1. outcome not the one its kind must have",
        &st(&wrong_outcome),
    );
    line(
        "1. archived, but no run of that delivery finished ok",
        &unfenced,
    );
    line("1. refused duplicate, yet written", &st(&refused_written));
    line(
        "1. refused duplicate, the job it named has another key",
        &st(&key_mismatch),
    );
    line("1. unacknowledged push stored twice", &st(&unacked_twice));
    line("1. stored job no producer tried (phantom)", &st(&phantom));
    line("2. acknowledged job that never ran", &st(&never_ran));
    line("2. poison message that ran", &st(&poison_ran));
    line("3. two runs of one job at once", &overlaps);
    line(
        "3. run that never ended (no end line, process not reaped)",
        &st(&never_ended),
    );
    line(
        "3. re-run after a finished run, no fault to explain it",
        &unexplained,
    );
    line(
        "4. stuck (queued, not visible within the visibility timeout)",
        &stuck,
    );
    line(
        "5. push_and_wait without its result or its timeout",
        &wait_bad,
    );
    line("+ delayed job started before its time", &st(&early));
    line("+ worker process that exited by itself", &unexpected_exits);
    line(
        "+ fault that failed to apply (a restart that did not work)",
        &failed_faults,
    );
    line(
        "+ worker process that did not stop when asked (killed after 30 s)",
        &unstoppable,
    );
    let _ = writeln!(
        out,
        "  (queued after settling, any visibility: {queued}; push_and_wait answers: {wait_counts:?})"
    );
    out.push_str(&failover_stalls(dir)?);
    Ok(Report { ok, text: out })
}

/// How long pushes and runs stalled around each failover of a campaign against a formation
/// (from the logs only): for each, the longest time without an acknowledged push, and without
/// a run starting, between the last before the failover began and the first after it, looked
/// at until 30 s after the formation was stable again; by kind of failover, the count, the
/// median and the longest. Empty without failovers.
pub(crate) fn failover_stalls(dir: &Path) -> Res<String> {
    // (start, end, what) of every failover applied.
    let mut failovers: Vec<(u64, u64, String)> = Vec::new();
    let mut open: Option<(u64, String)> = None;
    for l in read_json_lines(&dir.join("faults.log")) {
        if s(&l, "kind") != Some("failover") {
            continue;
        }
        let at = u(&l, "at").unwrap_or(0);
        let detail = s(&l, "detail").unwrap_or_default();
        match s(&l, "phase") {
            Some("start") if !detail.starts_with("skipped") => {
                open = Some((at, detail.to_owned()));
            }
            Some("end") => {
                if let Some((start, what)) = open.take() {
                    failovers.push((start, at, what));
                }
            }
            _ => {}
        }
    }
    if failovers.is_empty() {
        return Ok(String::new());
    }
    let mut acks: Vec<u64> = read_json_lines(&dir.join("producer.log"))
        .iter()
        .filter(|l| s(l, "k") == Some("A"))
        .filter_map(|l| u(l, "at"))
        .collect();
    let mut starts: Vec<u64> = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('w') && name.ends_with(".log") {
            starts.extend(
                read_json_lines(&e.path())
                    .iter()
                    .filter(|l| s(l, "k") == Some("S"))
                    .filter_map(|l| u(l, "at")),
            );
        }
    }
    acks.sort_unstable();
    starts.sort_unstable();
    // The longest gap between consecutive events of `times` that ends after `from` and starts
    // before `to`, in seconds.
    let stall = |times: &[u64], from: u64, to: u64| -> f64 {
        let first = times.partition_point(|&t| t < from).saturating_sub(1);
        times[first..]
            .windows(2)
            .take_while(|w| w[0] <= to)
            .map(|w| w[1].saturating_sub(w[0]))
            .max()
            .unwrap_or(0) as f64
            / 1e6
    };
    let mut by_what: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
    for (start, end, what) in &failovers {
        let to = end + 30_000_000;
        by_what.entry(what.clone()).or_default().push((
            (end - start) as f64 / 1e6,
            stall(&acks, *start, to),
            stall(&starts, *start, to),
        ));
    }
    let mut out = String::from(
        "
failovers: until stable / longest without an acknowledged push / without a run starting, s (median, longest):
",
    );
    for (what, mut xs) in by_what {
        let col = |xs: &mut Vec<(f64, f64, f64)>, f: fn(&(f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = xs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[v.len() - 1])
        };
        let (a, b, c) = (
            col(&mut xs, |x| x.0),
            col(&mut xs, |x| x.1),
            col(&mut xs, |x| x.2),
        );
        let _ = writeln!(
            out,
            "  {what}: {} times; {:.2} / {:.2}; {:.2} / {:.2}; {:.2} / {:.2}",
            xs.len(),
            a.0,
            a.1,
            b.0,
            b.1,
            c.0,
            c.1
        );
    }
    Ok(out)
}

/// `failover-times --dir D`: [`failover_stalls`] of a kept campaign (no database needed).
pub(crate) fn failover_times_main(args: &[String]) -> Res<bool> {
    let dir = std::path::PathBuf::from(super::arg(args, "--dir").ok_or("--dir")?);
    let text = failover_stalls(&dir)?;
    if text.is_empty() {
        println!("no failover in {}", dir.display());
    } else {
        println!("{}", text.trim_start());
    }
    Ok(true)
}

/// `check --dir D`: the checker alone, on a kept campaign (DATABASE_URL names the server).
pub(crate) async fn check_main(args: &[String]) -> Res<bool> {
    let dir = std::path::PathBuf::from(super::arg(args, "--dir").ok_or("--dir")?);
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("campaign.json"))?)?;
    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let opts = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&url)?
        .database(s(&meta, "database").ok_or("database")?);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(opts)
        .await?;
    let report = check(&dir, &pool).await?;
    println!("seed {}{}", u(&meta, "seed").unwrap_or(0), report.text);
    println!("check {}", if report.ok { "passed" } else { "FAILED" });
    Ok(report.ok)
}

/// The first death of `pid` at or after `start` (a pid may be reused by a later process).
fn death_after(
    deaths: &BTreeMap<u32, Vec<(u64, String)>>,
    pid: u32,
    start: u64,
) -> Option<&(u64, String)> {
    deaths
        .get(&pid)?
        .iter()
        .filter(|(at, _)| *at >= start)
        .min_by_key(|(at, _)| *at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_ends_at_the_first_death_of_its_pid_after_it_started() {
        // Pid 1952 died at 71 s (killed) and, reused by a later worker, again at 819 s.
        let mut deaths: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
        deaths.entry(1952).or_default().extend([
            (71_000_000, "killed".to_owned()),
            (819_000_000, "killed".to_owned()),
        ]);
        assert_eq!(
            death_after(&deaths, 1952, 69_000_000).map(|d| d.0),
            Some(71_000_000)
        );
        assert_eq!(
            death_after(&deaths, 1952, 700_000_000).map(|d| d.0),
            Some(819_000_000)
        );
        assert_eq!(death_after(&deaths, 1952, 900_000_000), None);
        assert_eq!(death_after(&deaths, 7, 0), None);
    }
}
