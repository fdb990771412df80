//! `held_snapshot`: one worker under a steady arrival rate while another session holds a
//! `REPEATABLE READ` snapshot (issue 23). Jobs are pushed in 10 ms ticks at
//! `snapshot_rate` jobs/s; after `snapshot_before_secs` a snapshot is taken and held for
//! `snapshot_hold_secs`, then released, and the run goes on for `snapshot_after_secs`. Every
//! `snapshot_window_secs` one record: arrivals, jobs done, backlog, pickup p50/p99 of the
//! window, the queue table's dead tuples and size (heap + indexes). A summary record compares
//! the last window before the snapshot, the last one while it is held and the last one after.
//!
//! Short (2 min): `--set snapshot_hold_secs=80`; long (10 min): `--set snapshot_hold_secs=600`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_pgmq_notify::PgmqStorage;
use sqlx::{Connection, Executor, PgConnection, PgPool, postgres::PgConnectOptions};

use crate::{
    Res,
    shared::{BenchJob, Counters, Params, Record, now_micros, percentile_ms, stop_workers},
};

/// The queue table's dead tuples (as the statistics collector last counted them) and size
/// in MB (heap, indexes and TOAST).
async fn table_state(pool: &PgPool) -> (f64, f64) {
    sqlx::query_as::<_, (f64, f64)>(
        "SELECT coalesce((SELECT n_dead_tup FROM pg_stat_user_tables \
                          WHERE schemaname = 'pgmq' AND relname = 'q_bench'), 0)::float8, \
                pg_total_relation_size('pgmq.q_bench')::float8 / 1048576",
    )
    .fetch_one(pool)
    .await
    .unwrap_or((f64::NAN, f64::NAN))
}

pub(crate) async fn held_snapshot(
    opts: &PgConnectOptions,
    pool: &PgPool,
    storage: &PgmqStorage<BenchJob>,
    p: &Params,
    system: &str,
) -> Res<Vec<Record>> {
    let (before, hold, after) = (
        p.snapshot_before_secs,
        p.snapshot_hold_secs,
        p.snapshot_after_secs,
    );
    let window = Duration::from_secs(p.snapshot_window_secs.max(1));
    let total = Duration::from_secs(before + hold + after);
    let counters = Arc::new(Counters::default());
    counters.record.store(true, Ordering::Relaxed);
    let (stop, joins) =
        crate::spawn_bench_workers!(storage.clone(), 1, p.snapshot_concurrency, counters);

    // The producer: rate/100 jobs every 10 ms, in one insert.
    let pushed = Arc::new(AtomicU64::new(0));
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (pushed, producing) = (pushed.clone(), producing.clone());
        let mut sink = storage.clone();
        let per_tick = (p.snapshot_rate / 100).max(1);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while producing.load(Ordering::Relaxed) {
                tick.tick().await;
                let t = now_micros();
                let jobs: Vec<BenchJob> = (0..per_tick).map(|_| BenchJob { t }).collect();
                if sink.push_bulk(jobs).await.is_ok() {
                    pushed.fetch_add(per_tick, Ordering::Relaxed);
                }
            }
        })
    };

    let started = Instant::now();
    let mut snapshot: Option<PgConnection> = None;
    let mut released = hold == 0;
    let mut records = Vec::new();
    let (mut last_pushed, mut last_done) = (0, 0);
    let mut next = started + window;
    let mut phases: [Option<Record>; 3] = [None, None, None];
    while started.elapsed() < total {
        let now = started.elapsed();
        if snapshot.is_none() && !released && now >= Duration::from_secs(before) {
            let mut c = PgConnection::connect_with(opts).await?;
            c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await?;
            let _: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_class")
                .fetch_one(&mut c)
                .await?;
            snapshot = Some(c);
        }
        if now >= Duration::from_secs(before + hold)
            && let Some(mut c) = snapshot.take()
        {
            c.execute("COMMIT").await?;
            released = true;
        }
        if Instant::now() < next {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        next += window;
        let t = started.elapsed().as_secs_f64();
        let (arrived, done) = (pushed.load(Ordering::Relaxed), counters.done());
        let mut lat = counters.take_latencies();
        lat.sort_unstable();
        let (dead, mb) = table_state(pool).await;
        let phase = if snapshot.is_some() {
            1
        } else if released && hold > 0 {
            2
        } else {
            0
        };
        let rec = Record::new(system, "held_snapshot")
            .value("t_s", t.round())
            .value("phase", f64::from(phase))
            .value("arrivals", (arrived - last_pushed) as f64)
            .value("done", (done - last_done) as f64)
            .value("backlog", arrived.saturating_sub(done) as f64)
            .value("pickup_p50_ms", percentile_ms(&lat, 50.0))
            .value("pickup_p99_ms", percentile_ms(&lat, 99.0))
            .value("dead_tuples", dead)
            .value("queue_mb", mb)
            .note("one window; phase 0 before, 1 snapshot held, 2 after");
        eprintln!(
            "held_snapshot {system} t={t:.0}s phase {phase}: arrivals {} done {} backlog {} \
             pickup p50 {:.1} ms p99 {:.1} ms, dead {dead:.0}, {mb:.1} MB",
            arrived - last_pushed,
            done - last_done,
            arrived.saturating_sub(done),
            percentile_ms(&lat, 50.0),
            percentile_ms(&lat, 99.0),
        );
        (last_pushed, last_done) = (arrived, done);
        phases[phase as usize] = Some(rec.clone());
        records.push(rec);
    }
    if let Some(mut c) = snapshot.take() {
        c.execute("COMMIT").await?;
    }
    producing.store(false, Ordering::Relaxed);
    let _ = producer.await;
    stop_workers(stop, joins).await;

    let get = |i: usize, k: &str| {
        phases[i]
            .as_ref()
            .and_then(|r| r.values.get(k).copied())
            .unwrap_or(f64::NAN)
    };
    let max_mb = records
        .iter()
        .filter_map(|r| r.values.get("queue_mb").copied())
        .fold(0.0, f64::max);
    let arrived = pushed.load(Ordering::Relaxed) as f64;
    records.push(
        Record::new(system, "held_snapshot")
            .value("rate", p.snapshot_rate as f64)
            .value("hold_s", hold as f64)
            .value("before_p50_ms", get(0, "pickup_p50_ms"))
            .value("before_p99_ms", get(0, "pickup_p99_ms"))
            .value("held_end_p50_ms", get(1, "pickup_p50_ms"))
            .value("held_end_p99_ms", get(1, "pickup_p99_ms"))
            .value(
                "p99_ratio",
                get(1, "pickup_p99_ms") / get(0, "pickup_p99_ms"),
            )
            .value("held_end_backlog", get(1, "backlog"))
            .value("held_end_dead_tuples", get(1, "dead_tuples"))
            .value("after_p99_ms", get(2, "pickup_p99_ms"))
            .value(
                "done_per_arrival",
                counters.done() as f64 / arrived.max(1.0),
            )
            .value("max_queue_mb", max_mb)
            .note(format!(
                "summary: 1 worker x concurrency {}, {} jobs/s in 10 ms ticks, snapshot held \
                 {hold} s after {before} s, {after} s after",
                p.snapshot_concurrency, p.snapshot_rate
            )),
    );
    Ok(records)
}
