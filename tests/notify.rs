//! LISTEN/NOTIFY: wake-ups with no busy polling, reconnects, triggers, typed events.
//!
//! Workers here have a 60 s fallback poll, so a pickup within seconds can only come from a
//! notification (or a known visibility time).

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_pgmq_notify::{
    Config, Delay, NewMessage, NotifyChannels, NotifyMode, PgmqQueue, PgmqStorage, QueueEvent,
    QueueEvents, QueueName, disable_notify, enable_notify, notify_migration_sql, notify_mode,
};
use common::{TestDb, count, stop_worker, wait_for};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
/// Far below the 60 s fallback poll: meeting it proves a notification (or known vt) woke us.
const QUICK: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
}

type Log = Arc<Mutex<Vec<(u32, Instant)>>>;

fn slow_poll() -> Config {
    Config::default().poll_interval(Duration::from_secs(60))
}

fn storage(db: &TestDb, queue: &str) -> PgmqStorage<Job> {
    PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        slow_poll(),
    )
    .expect("config")
}

async fn handled(log: &Log, id: u32) -> Option<Instant> {
    log.lock()
        .expect("lock")
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, t)| *t)
}

async fn record(job: Job, log: Data<Log>) -> Result<(), BoxDynError> {
    log.lock().expect("lock").push((job.id, Instant::now()));
    Ok(())
}

/// Waits until an idle worker has armed its wake-up (on-demand triggers will notify).
async fn armed(db: &TestDb) {
    wait_for(WAIT, "an idle worker to arm its wake-up", || async {
        (count(
            &db.pool,
            "SELECT count(*) FROM apalis_pgmq.listeners WHERE armed",
        )
        .await
            > 0)
        .then_some(())
    })
    .await;
}

/// Starts a worker and waits until it has handled a first job, so it is idle and waiting when
/// the test continues.
macro_rules! idle_worker {
    ($db:expr, $s:expr, $log:expr) => {{
        let worker = WorkerBuilder::new("listener-test")
            .backend($s.clone())
            .data($log.clone())
            .build(record);
        let running = spawn_worker!(worker);
        $s.push_with(&$db.pool, &Job { id: 0 })
            .await
            .expect("push warm-up");
        wait_for(WAIT, "the warm-up job", || async {
            handled(&$log, 0).await
        })
        .await;
        // Idle now: it has announced that it waits, so on-demand triggers notify.
        wait_for(WAIT, "the worker to announce itself", || async {
            (count(&$db.pool, "SELECT count(*) FROM apalis_pgmq.listeners").await > 0).then_some(())
        })
        .await;
        running
    }};
}

#[tokio::test]
async fn an_idle_worker_is_woken_by_a_notification() {
    let db = TestDb::setup().await;
    let s = storage(&db, "wake_me");
    s.create_queue().await.expect("create");
    let log: Log = Arc::default();
    let (stop, join) = idle_worker!(db, s, log);
    for id in 1..=5 {
        armed(&db).await;
        let pushed = Instant::now();
        s.push_with(&db.pool, &Job { id }).await.expect("push");
        let at = wait_for(QUICK, "pickup by notification", || async {
            handled(&log, id).await
        })
        .await;
        println!("job {id}: picked up {:?} after push", at - pushed);
    }
    stop_worker(stop, join).await;
    // Pushes notified. (A push that lands in the instant between an arming's commit and the
    // version bump that follows it skips notifying and is read by the worker's settle check
    // instead, as quickly: see src/notify/wakeup.rs. So not necessarily all five.)
    wait_for(QUICK, "notifications", || async {
        (s.listener_stats().received >= 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_raw_sql_producer_wakes_the_worker() {
    let db = TestDb::setup().await;
    let s = storage(&db, "raw_sql");
    s.create_queue().await.expect("create");
    let log: Log = Arc::default();
    let (stop, join) = idle_worker!(db, s, log);
    sqlx::query("SELECT pgmq.send('raw_sql', '{\"id\": 1}'::jsonb)")
        .execute(&db.pool)
        .await
        .expect("pgmq.send");
    sqlx::query(
        "INSERT INTO pgmq.q_raw_sql (vt, message) VALUES (clock_timestamp(), '{\"id\": 2}')",
    )
    .execute(&db.pool)
    .await
    .expect("plain insert");
    wait_for(QUICK, "SQL jobs", || async {
        (handled(&log, 1).await.is_some() && handled(&log, 2).await.is_some()).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn a_delayed_job_runs_at_its_time_not_at_the_next_poll() {
    let db = TestDb::setup().await;
    let s = storage(&db, "delayed");
    s.create_queue().await.expect("create");
    let log: Log = Arc::default();
    let (stop, join) = idle_worker!(db, s, log);
    let body = json!({"id": 1});
    let id = s
        .queue()
        .send_with(
            &db.pool,
            &body,
            None,
            Delay::After(Duration::from_millis(1500)),
        )
        .await
        .expect("send delayed");
    let vt: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT vt FROM pgmq.q_delayed WHERE msg_id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .expect("vt");
    wait_for(QUICK, "the delayed job", || async {
        handled(&log, 1).await
    })
    .await;
    // It ran at or after its visibility time (by the database clock), long before the fallback.
    let read_at: chrono::DateTime<chrono::Utc> = wait_for(WAIT, "the archived row", || async {
        sqlx::query_scalar("SELECT last_read_at FROM pgmq.a_delayed WHERE msg_id = $1")
            .bind(id)
            .fetch_optional(&db.pool)
            .await
            .expect("query")
    })
    .await;
    assert!(read_at >= vt, "read at {read_at}, visible at {vt}");
    assert!(
        (read_at - vt).num_milliseconds() < 5000,
        "late by {}",
        read_at - vt
    );
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn a_killed_listener_reconnects_and_no_job_is_lost() {
    let db = TestDb::setup().await;
    let s = storage(&db, "reconnect");
    s.create_queue().await.expect("create");
    let log: Log = Arc::default();
    let (stop, join) = idle_worker!(db, s, log);
    for round in 1..=2u32 {
        let before = s.listener_stats().reconnects;
        let killed: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()",
        )
        .fetch_all(&db.pool)
        .await
        .expect("find listener");
        assert_eq!(killed.len(), 1, "exactly one LISTEN connection per process");
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(killed[0])
            .execute(&db.pool)
            .await
            .expect("terminate");
        // Sent while the listener is down or reconnecting: its notification may be lost, but
        // the catch-up read after reconnecting finds the job.
        let id = round * 10;
        s.push_with(&db.pool, &Job { id }).await.expect("push");
        wait_for(QUICK, "the job pushed during the outage", || async {
            handled(&log, id).await
        })
        .await;
        wait_for(QUICK, "the reconnect to be counted", || async {
            (s.listener_stats().reconnects > before).then_some(())
        })
        .await;
        // And notifications flow again.
        s.push_with(&db.pool, &Job { id: id + 1 })
            .await
            .expect("push");
        wait_for(QUICK, "a job after the reconnect", || async {
            handled(&log, id + 1).await
        })
        .await;
    }
    stop_worker(stop, join).await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_reconnect").await,
        0
    );
}

#[tokio::test]
async fn one_notification_per_statement_not_per_row() {
    let db = TestDb::setup().await;
    let s = storage(&db, "batch_notify");
    s.create_queue().await.expect("create");
    // Batch mode: every statement notifies, with the row count and the first id.
    enable_notify(
        &db.pool,
        s.queue().name(),
        &NotifyChannels::default(),
        NotifyMode::Batch,
    )
    .await
    .expect("batch mode");
    let mut events = QueueEvents::new(&db.runtime())
        .queue(s.queue().name())
        .subscribe()
        .await
        .expect("subscribe");
    let batch: Vec<NewMessage> = (0..1000)
        .map(|i| NewMessage::new(json!({"id": i})))
        .collect();
    let ids = s
        .queue()
        .send_batch(&db.pool, &batch)
        .await
        .expect("send 1000");
    let first = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("an event")
        .expect("stream open");
    assert_eq!(
        first,
        QueueEvent::BatchReady {
            queue: "batch_notify".into(),
            first_msg_id: ids[0],
            count: 1000,
            visible_in: Duration::ZERO,
        }
    );
    // The next event is the marker sent afterwards: nothing else came from the batch.
    let marker = s
        .queue()
        .send(&db.pool, &json!({"id": -1}))
        .await
        .expect("marker");
    let next = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("an event")
        .expect("stream open");
    assert!(
        matches!(next, QueueEvent::MessageReady { msg_id, .. } if msg_id == marker),
        "{next:?}"
    );
    assert_eq!(events.stats().parse_errors, 0);
    assert_eq!(
        events.stats().received,
        2,
        "two statements, two notifications"
    );

    // On-demand mode (the default): the subscriber is registered, so each statement sends one
    // detail-free wake-up.
    enable_notify(
        &db.pool,
        s.queue().name(),
        &NotifyChannels::default(),
        NotifyMode::OnDemand,
    )
    .await
    .expect("on-demand mode");
    s.queue()
        .send_batch(&db.pool, &batch)
        .await
        .expect("send 1000");
    s.queue()
        .send(&db.pool, &json!({"id": -2}))
        .await
        .expect("marker");
    for _ in 0..2 {
        let ev = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("an event")
            .expect("stream open");
        assert_eq!(
            ev,
            QueueEvent::Activity {
                queue: "batch_notify".into()
            }
        );
    }
    assert_eq!(events.stats().received, 4, "one notification per statement");
}

#[tokio::test]
async fn per_message_events_respect_the_byte_budget() {
    let db = TestDb::setup().await;
    let q = PgmqQueue::new(QueueName::new("inline").expect("name"));
    q.create(&db.pool).await.expect("create");
    let budget: u16 = 1000;
    enable_notify(
        &db.pool,
        q.name(),
        &NotifyChannels::default(),
        NotifyMode::Message {
            max_payload_bytes: budget,
        },
    )
    .await
    .expect("enable");
    assert_eq!(
        notify_mode(&db.pool, q.name()).await.expect("status"),
        Some((
            NotifyMode::Message {
                max_payload_bytes: budget
            },
            vec!["apq.q.inline".to_owned(), "apq.ns.default".to_owned()]
        ))
    );
    let mut events = QueueEvents::new(&db.runtime())
        .queue(q.name())
        .subscribe()
        .await
        .expect("subscribe");
    // The event's JSON around the body is about 90 bytes. 'é' is 2 bytes: 400 of them are 800
    // bytes (fits), 600 are 1200 bytes (does not) — both far under 1000 *characters*.
    let fits = json!({"text": "é".repeat(400)});
    let too_big = json!({"text": "é".repeat(600)});
    let huge = json!({"text": "ü".repeat(10_000)}); // over PostgreSQL's 8000-byte NOTIFY limit
    let a = q.send(&db.pool, &fits).await.expect("send fits");
    let b = q.send(&db.pool, &too_big).await.expect("send too big");
    let c = q
        .send(&db.pool, &huge)
        .await
        .expect("a huge message still sends");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            tokio::time::timeout(WAIT, events.next())
                .await
                .expect("an event")
                .expect("stream open"),
        );
    }
    match &got[0] {
        QueueEvent::Message {
            msg_id, message, ..
        } => {
            assert_eq!(*msg_id, a);
            assert_eq!(message, &fits, "inline and intact");
        }
        other => panic!("expected an inline message, got {other:?}"),
    }
    for (event, id) in got[1..].iter().zip([b, c]) {
        assert!(
            matches!(event, QueueEvent::MessageReady { msg_id, too_big: true, .. } if *msg_id == id),
            "{event:?}"
        );
    }
    assert_eq!(events.stats().parse_errors, 0);
    // Switching back to batch mode.
    enable_notify(
        &db.pool,
        q.name(),
        &NotifyChannels::default(),
        NotifyMode::Batch,
    )
    .await
    .expect("batch");
    assert!(matches!(
        notify_mode(&db.pool, q.name()).await.expect("status"),
        Some((NotifyMode::Batch, _))
    ));
    assert!(disable_notify(&db.pool, q.name()).await.expect("disable"));
    assert_eq!(notify_mode(&db.pool, q.name()).await.expect("status"), None);
    assert!(
        !disable_notify(&db.pool, q.name())
            .await
            .expect("disable again")
    );
}

#[tokio::test]
async fn namespace_and_queue_created_events() {
    let db = TestDb::setup().await;
    let channels = NotifyChannels::with_prefix("t1.").expect("prefix");
    let mut events = QueueEvents::new(&db.runtime())
        .channels(channels.clone())
        .namespace("billing")
        .queue_created()
        .subscribe()
        .await
        .expect("subscribe");
    let invoices = PgmqQueue::new(QueueName::new("billing_queue").expect("name"));
    invoices.create(&db.pool).await.expect("create");
    let created = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("an event")
        .expect("open");
    assert_eq!(
        created,
        QueueEvent::QueueCreated {
            queue: "billing_queue".into()
        }
    );
    enable_notify(&db.pool, invoices.name(), &channels, NotifyMode::Batch)
        .await
        .expect("enable");
    let other = PgmqQueue::new(QueueName::new("email").expect("name"));
    other.create(&db.pool).await.expect("create other");
    enable_notify(&db.pool, other.name(), &channels, NotifyMode::Batch)
        .await
        .expect("enable other");
    let _ = tokio::time::timeout(WAIT, events.next()).await; // email's QueueCreated
    other
        .send(&db.pool, &json!(1))
        .await
        .expect("send to another namespace");
    let id = invoices.send(&db.pool, &json!(2)).await.expect("send");
    let next = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("an event")
        .expect("open");
    assert!(
        matches!(&next, QueueEvent::MessageReady { queue, msg_id, .. } if queue == "billing_queue" && *msg_id == id),
        "only the billing namespace is delivered: {next:?}"
    );
}

#[tokio::test]
async fn subscribers_on_several_channels_get_one_reconnected_event_each() {
    let db = TestDb::setup().await;
    let channels = NotifyChannels::with_prefix("t3.").expect("prefix");
    for bad in ["", "Audit", "a-b", &"n".repeat(44)] {
        let err = QueueEvents::new(&db.runtime())
            .channels(channels.clone())
            .namespace(bad)
            .subscribe()
            .await
            .expect_err("an invalid namespace");
        assert!(
            matches!(err, apalis_pgmq_notify::Error::Config { .. }),
            "{bad:?}: {err}"
        );
    }
    let q = PgmqQueue::new(QueueName::new("audit_queue").expect("name"));
    q.create(&db.pool).await.expect("create");
    enable_notify(&db.pool, q.name(), &channels, NotifyMode::Batch)
        .await
        .expect("enable");
    // Two subscribers on the same three channels: each is in every channel's list.
    let mut subscribers = Vec::new();
    for _ in 0..2 {
        subscribers.push(
            QueueEvents::new(&db.runtime())
                .channels(channels.clone())
                .queue(q.name())
                .namespace("audit")
                .queue_created()
                .subscribe()
                .await
                .expect("subscribe"),
        );
    }
    let listener: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
         AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_all(&db.pool)
    .await
    .expect("find listener");
    assert_eq!(
        listener.len(),
        1,
        "one LISTEN connection for every subscriber"
    );
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(listener[0])
        .execute(&db.pool)
        .await
        .expect("terminate");
    for events in &mut subscribers {
        let first = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("an event")
            .expect("open");
        assert_eq!(first, QueueEvent::Reconnected);
    }
    // Listening again (the event comes after the LISTENs are back): the next event is this
    // message, not a second Reconnected for another of the subscriber's channels.
    let id = q.send(&db.pool, &json!(1)).await.expect("send");
    for events in &mut subscribers {
        let next = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("an event")
            .expect("open");
        assert!(
            matches!(&next, QueueEvent::MessageReady { msg_id, .. } if *msg_id == id),
            "{next:?}"
        );
    }
}

#[tokio::test]
async fn enabling_notify_refuses_bad_input() {
    let db = TestDb::setup().await;
    let missing = QueueName::new("does_not_exist").expect("name");
    let err = enable_notify(
        &db.pool,
        &missing,
        &NotifyChannels::default(),
        NotifyMode::Batch,
    )
    .await
    .expect_err("no such queue");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let q = PgmqQueue::new(QueueName::new("exists").expect("name"));
    q.create(&db.pool).await.expect("create");
    let err = enable_notify(
        &db.pool,
        q.name(),
        &NotifyChannels::default(),
        NotifyMode::Message {
            max_payload_bytes: 9000,
        },
    )
    .await
    .expect_err("over the NOTIFY limit");
    assert!(err.to_string().contains("8000"), "{err}");
    // The SQL function validates on its own too, for callers that bypass the crate.
    let err = sqlx::query("SELECT apalis_pgmq.enable_notify('x''; drop table pgmq.meta; --', 'c')")
        .execute(&db.pool)
        .await
        .expect_err("hostile name");
    assert!(err.to_string().contains("invalid queue name"), "{err}");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM pgmq.meta").await, 1);
}

#[tokio::test]
async fn generated_migration_installs_notifications_without_setup() {
    let db = TestDb::fresh().await;
    // A project that installs PGMQ itself and manages its own migrations.
    pgmq::install::install_sql_from_embedded(&db.pool)
        .await
        .expect("PGMQ");
    let q = PgmqQueue::new(QueueName::new("orders_queue").expect("name"));
    q.create(&db.pool).await.expect("create");
    let sql = notify_migration_sql(
        &[q.name().clone()],
        &NotifyChannels::default(),
        NotifyMode::Batch,
        true,
    )
    .expect("sql");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
        .execute(&db.pool)
        .await
        .expect("apply the generated SQL");
    // Applying it twice is harmless.
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .expect("apply again");
    let mut events = QueueEvents::new(&db.runtime())
        .namespace("orders")
        .subscribe()
        .await
        .expect("subscribe");
    let id = q.send(&db.pool, &json!({"order": 1})).await.expect("send");
    let ev = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("an event")
        .expect("open");
    assert!(
        matches!(ev, QueueEvent::MessageReady { msg_id, .. } if msg_id == id),
        "{ev:?}"
    );
}

/// Receives the next notification on `raw`, failing the test after `WAIT`.
async fn next_notification(raw: &mut sqlx::postgres::PgListener) -> (String, String) {
    let n = tokio::time::timeout(WAIT, raw.recv())
        .await
        .expect("a notification")
        .expect("listener open");
    (n.channel().to_owned(), n.payload().to_owned())
}

#[tokio::test]
async fn on_demand_triggers_notify_only_while_someone_waits() {
    let db = TestDb::setup().await;
    let q = PgmqQueue::new(QueueName::new("demand").expect("name"));
    q.create(&db.pool).await.expect("create");
    enable_notify(
        &db.pool,
        q.name(),
        &NotifyChannels::default(),
        NotifyMode::OnDemand,
    )
    .await
    .expect("enable");
    // A plain LISTEN that does not announce itself, plus a marker channel to order events
    // without sleeping.
    let mut raw = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .expect("listener");
    raw.listen_all(["apq.q.demand", "marker"])
        .await
        .expect("listen");
    q.send(&db.pool, &json!(1)).await.expect("send");
    sqlx::query("NOTIFY marker")
        .execute(&db.pool)
        .await
        .expect("marker");
    assert_eq!(
        next_notification(&mut raw).await.0,
        "marker",
        "nobody waits: no NOTIFY"
    );
    sqlx::query("SELECT apalis_pgmq.want_notify('apq.q.demand', 'test', 60)")
        .execute(&db.pool)
        .await
        .expect("announce");
    sqlx::query("SELECT apalis_pgmq.listeners_changed()")
        .execute(&db.pool)
        .await
        .expect("bump");
    q.send(&db.pool, &json!(2)).await.expect("send");
    let (channel, payload) = next_notification(&mut raw).await;
    assert_eq!(channel, "apq.q.demand");
    assert!(payload.contains("\"wake\""), "{payload}");
    // An expired announcement counts as nobody.
    sqlx::query("UPDATE apalis_pgmq.listeners SET until = clock_timestamp() - interval '1 second'")
        .execute(&db.pool)
        .await
        .expect("expire");
    q.send(&db.pool, &json!(3)).await.expect("send");
    sqlx::query("NOTIFY marker")
        .execute(&db.pool)
        .await
        .expect("marker");
    assert_eq!(next_notification(&mut raw).await.0, "marker");
}

#[tokio::test]
async fn an_insert_in_flight_during_the_announcement_is_not_missed() {
    let db = TestDb::setup().await;
    let s = storage(&db, "in_flight");
    s.create_queue().await.expect("create");
    // A producer transaction inserts while nobody waits (so it will not notify) and stays open.
    let mut tx = db.pool.begin().await.expect("begin");
    s.push_with(&mut *tx, &Job { id: 1 })
        .await
        .expect("push in tx");
    let settled: bool = sqlx::query_scalar("SELECT apalis_pgmq.inserts_settled('in_flight')")
        .fetch_one(&db.pool)
        .await
        .expect("check");
    assert!(!settled, "an insert that skipped notifying is in flight");
    // The worker starts, finds nothing committed, announces itself and keeps checking.
    let log: Log = Arc::default();
    let worker = WorkerBuilder::new("in-flight")
        .backend(s.clone())
        .data(log.clone())
        .build(record);
    let (stop, join) = spawn_worker!(worker);
    wait_for(WAIT, "the worker to announce itself", || async {
        (count(&db.pool, "SELECT count(*) FROM apalis_pgmq.listeners").await > 0).then_some(())
    })
    .await;
    tx.commit().await.expect("commit");
    // No notification was sent for this job, and the fallback poll is a minute away: only the
    // settle check explains a quick pickup.
    wait_for(
        QUICK,
        "the job committed after the announcement",
        || async { handled(&log, 1).await },
    )
    .await;
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn a_busy_worker_costs_producers_one_notification() {
    let db = TestDb::setup().await;
    let queue = "busy";
    let s: PgmqStorage<Job> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new(queue).expect("name"),
        slow_poll().fetch_batch_size(10),
    )
    .expect("config");
    s.create_queue().await.expect("create");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let worker = WorkerBuilder::new("busy")
        .backend(s.clone())
        .data(gate.clone())
        .concurrency(10)
        .build(
            |_job: Job, gate: Data<Arc<tokio::sync::Semaphore>>| async move {
                gate.acquire()
                    .await
                    .map_err(|e| Box::new(e) as BoxDynError)?
                    .forget();
                Ok::<(), BoxDynError>(())
            },
        );
    let (stop, join) = spawn_worker!(worker);
    armed(&db).await;
    // Fill the worker: ten jobs running, no free slot.
    s.push_bulk_with(&db.pool, (0..10).map(|id| Job { id }))
        .await
        .expect("push 10");
    wait_for(WAIT, "ten running jobs", || async {
        let claimed = count(
            &db.pool,
            "SELECT count(*) FROM pgmq.q_busy WHERE vt > clock_timestamp()",
        )
        .await;
        (claimed == 10).then_some(())
    })
    .await;
    let before = s.listener_stats().received;
    // Twenty producer statements while it is full: at most one of them notifies (the one that
    // finds the wake-up armed, if the worker re-armed before it filled up).
    for id in 10..30 {
        s.push_with(&db.pool, &Job { id }).await.expect("push");
    }
    sqlx::query("SELECT pg_notify('apq.q.busy', '{\"e\":\"marker\",\"q\":\"busy\"}')")
        .execute(&db.pool)
        .await
        .expect("marker");
    wait_for(QUICK, "the marker", || async {
        (s.listener_stats().received > before).then_some(())
    })
    .await;
    let during = s.listener_stats().received - before - 1;
    assert!(
        during <= 1,
        "{during} notifications for twenty inserts into a busy queue"
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM apalis_pgmq.listeners WHERE armed"
        )
        .await,
        0,
        "nothing armed while the worker is busy"
    );
    gate.add_permits(30);
    wait_for(WAIT, "the jobs to drain", || async {
        (count(&db.pool, "SELECT count(*) FROM pgmq.q_busy").await == 0).then_some(())
    })
    .await;
    // Idle again: armed for the next insert.
    armed(&db).await;
    stop_worker(stop, join).await;
}

#[tokio::test]
async fn steady_producers_never_leave_workers_asleep() {
    // Two workers of one process share a wake-up row; a steady producer keeps disarming it.
    // Every job must be picked up promptly (the fallback poll is a minute away).
    let db = TestDb::setup().await;
    let s = storage(&db, "steady");
    s.create_queue().await.expect("create");
    let log: Log = Arc::default();
    let mut running = Vec::new();
    for w in 0..2 {
        let worker = WorkerBuilder::new(format!("steady-{w}"))
            .backend(s.clone())
            .data(log.clone())
            .concurrency(8)
            .build(record);
        running.push(spawn_worker!(worker));
    }
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    let total = 1500u32;
    for id in 0..total {
        tick.tick().await;
        s.push_with(&db.pool, &Job { id }).await.expect("push");
    }
    let last_push = Instant::now();
    wait_for(QUICK, "every job to be handled", || async {
        (log.lock().expect("lock").len() == total as usize).then_some(())
    })
    .await;
    println!("all handled {:?} after the last push", last_push.elapsed());
    for (stop, join) in running {
        stop_worker(stop, join).await;
    }
}
