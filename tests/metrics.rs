//! The `metrics` feature: counters and histograms seen by a recorder while a worker runs.
#![cfg(feature = "metrics")]

mod common;

use std::{sync::OnceLock, time::Duration};

use apalis::prelude::*;
use apalis_pgmq_notify::{Backoff, Config, PgmqStorage, QueueName};
use common::{TestDb, count, stop_worker, wait_for};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    kind: String,
}

fn snapshotter() -> &'static Snapshotter {
    static S: OnceLock<Snapshotter> = OnceLock::new();
    S.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this test binary");
        snapshotter
    })
}

type Snap = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn snapshot() -> Snap {
    snapshotter().snapshot().into_vec()
}

/// The value of a counter or gauge (summed over label sets matching `labels`), or the number
/// of samples of a histogram.
fn value(snap: &Snap, name: &str, labels: &[(&str, &str)]) -> u64 {
    snap.iter()
        .filter(|(key, ..)| {
            let k = key.key();
            k.name() == name
                && labels
                    .iter()
                    .all(|(l, v)| k.labels().any(|x| x.key() == *l && x.value() == *v))
        })
        .map(|(_, _, _, v)| match v {
            DebugValue::Counter(n) => *n,
            DebugValue::Histogram(samples) => samples.len() as u64,
            DebugValue::Gauge(g) => g.into_inner() as u64,
        })
        .sum()
}

#[tokio::test]
async fn outcomes_are_counted_and_latencies_recorded() {
    snapshotter();
    let db = TestDb::setup().await;
    let name = "metered";
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(name).expect("name"),
        Config::default()
            .max_attempts(2)
            .backoff(Backoff::default().base(Duration::from_secs(3600)))
            .heartbeat_interval(Duration::from_secs(1))
            .metrics_kind("report"),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    let q = s.queue().clone();
    for kind in ["ok", "ok", "ok", "retry"] {
        q.send(&db.pool, &json!({ "kind": kind }))
            .await
            .expect("send");
    }
    q.send_with(
        &db.pool,
        &json!({"kind": "die"}),
        Some(&json!({"apalis": {"max_attempts": 1}})),
        apalis_pgmq_notify::Delay::Now,
    )
    .await
    .expect("send");
    // Sent by SQL, as another PGMQ client would: not counted as enqueued by this process, and
    // its body does not decode as a Job (dead letter `undecodable`).
    sqlx::query("SELECT pgmq.send('metered', '{\"n\": 1}')")
        .execute(&db.pool)
        .await
        .expect("send by SQL");
    let worker = WorkerBuilder::new("metered")
        .backend(s.clone())
        .build(|job: Job| async move {
            match job.kind.as_str() {
                "ok" => Ok(()),
                _ => Err::<(), BoxDynError>("nope".into()),
            }
        });
    let (stop, join) = spawn_worker!(worker);
    wait_for(Duration::from_secs(30), "every outcome", || async {
        (count(&db.pool, "SELECT count(*) FROM pgmq.a_metered").await == 3
            && count(&db.pool, "SELECT count(*) FROM pgmq.q_metered_dlq").await == 2)
            .then_some(())
    })
    .await;
    // One snapshot for counters and histograms (a snapshot drains what it reports).
    let snap = snapshot();
    // Every job metric of the storage carries its kind (`Config::metrics_kind`).
    let queue = [("queue", name), ("kind", "report")];
    let v = |n: &str, l: &[(&str, &str)]| value(&snap, n, l);
    assert_eq!(v("apalis_pgmq_jobs_enqueued_total", &queue), 5);
    assert_eq!(v("apalis_pgmq_jobs_claimed_total", &queue), 6);
    assert_eq!(v("apalis_pgmq_jobs_done_total", &queue), 3);
    assert_eq!(v("apalis_pgmq_jobs_retried_total", &queue), 1);
    assert_eq!(
        v(
            "apalis_pgmq_jobs_dead_lettered_total",
            &[("queue", name), ("kind", "report"), ("reason", "failed")]
        ),
        1
    );
    assert_eq!(
        v(
            "apalis_pgmq_jobs_dead_lettered_total",
            &[
                ("queue", name),
                ("kind", "report"),
                ("reason", "undecodable")
            ]
        ),
        1,
        "every dead letter is counted, whatever its reason"
    );
    // Every metric is described: help text and unit (`# HELP` in Prometheus).
    for (key, unit, help, _) in &snap {
        if key.key().name().starts_with("apalis_pgmq_") {
            assert!(
                help.as_ref().is_some_and(|h| !h.is_empty()) && unit.is_some(),
                "{} has no description",
                key.key().name()
            );
        }
    }
    assert_eq!(v("apalis_pgmq_pickup_latency_seconds", &queue), 5);
    assert_eq!(v("apalis_pgmq_job_duration_seconds", &queue), 5);
    wait_for(
        Duration::from_secs(30),
        "the gauges sampled by the heartbeat",
        || async {
            let snap = snapshot();
            (value(
                &snap,
                "apalis_pgmq_queue_jobs",
                &[("queue", name), ("state", "done")],
            ) == 3)
                .then_some(())
        },
    )
    .await;
    stop_worker(stop, join).await;
}
