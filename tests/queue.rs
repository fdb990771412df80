//! The PGMQ queue layer: every operation, interop with PGMQ's own SQL in both directions,
//! queue-name validation.

mod common;

use std::{collections::HashSet, time::Duration};

use apalis_pgmq_notify::{
    Delay, Error, NewMessage, PgmqQueue, QueueName, list_queues, metrics_all,
};
use chrono::{DateTime, Utc};
use common::{TestDb, count};
use serde_json::{Value, json};
use sqlx::Row;

fn queue(name: &str) -> PgmqQueue {
    PgmqQueue::new(QueueName::new(name).expect("valid name"))
}

async fn db_now(pool: &sqlx::PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await
        .expect("now")
}

#[tokio::test]
async fn sql_send_is_read_by_our_layer() {
    let db = TestDb::setup().await;
    let q = queue("interop_in");
    q.create(&db.pool).await.expect("create");
    let id: i64 = sqlx::query_scalar("SELECT * FROM pgmq.send('interop_in', $1, $2)")
        .bind(json!({"hello": "world"}))
        .bind(json!({"trace": "t-1"}))
        .fetch_one(&db.pool)
        .await
        .expect("pgmq.send");
    let before = db_now(&db.pool).await;
    let msgs = q
        .read(&db.pool, Duration::from_secs(30), 10)
        .await
        .expect("read");
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.msg_id, id);
    assert_eq!(m.read_ct, 1, "first delivery is read_ct 1");
    assert_eq!(m.message, Some(json!({"hello": "world"})));
    assert_eq!(m.headers, Some(json!({"trace": "t-1"})));
    let last_read = m.last_read_at.expect("read stamps last_read_at");
    assert!(last_read >= before);
    let hidden_for = m.vt - last_read;
    assert!(
        (29_000..=31_000).contains(&hidden_for.num_milliseconds()),
        "vt should be ~30 s after the read, got {hidden_for}"
    );
    // Hidden now: neither we nor pgmq.read see it.
    assert!(
        q.read(&db.pool, Duration::from_secs(30), 10)
            .await
            .expect("read")
            .is_empty()
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pgmq.read('interop_in', 30, 10)"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn our_send_is_read_by_pgmq() {
    let db = TestDb::setup().await;
    let q = queue("interop_out");
    q.create(&db.pool).await.expect("create");
    let id = q
        .send_with(
            &db.pool,
            &json!({"n": 1}),
            Some(&json!({"k": "v"})),
            Delay::Now,
        )
        .await
        .expect("send");
    let row = sqlx::query(
        "SELECT msg_id, read_ct, message, headers, last_read_at IS NOT NULL \
         FROM pgmq.read('interop_out', 30, 10)",
    )
    .fetch_one(&db.pool)
    .await
    .expect("pgmq.read");
    assert_eq!(row.get::<i64, _>(0), id);
    assert_eq!(row.get::<i32, _>(1), 1);
    assert_eq!(row.get::<Value, _>(2), json!({"n": 1}));
    assert_eq!(row.get::<Value, _>(3), json!({"k": "v"}));
    assert!(row.get::<bool, _>(4));
    // And pgmq.archive accepts it.
    let archived: bool = sqlx::query_scalar("SELECT pgmq.archive('interop_out', $1::bigint)")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("pgmq.archive");
    assert!(archived);
}

#[tokio::test]
async fn read_matches_pgmq_read_exactly() {
    let db = TestDb::setup().await;
    let q = queue("same_effect");
    q.create(&db.pool).await.expect("create");
    let a = q.send(&db.pool, &json!("a")).await.expect("send");
    let b = q.send(&db.pool, &json!("b")).await.expect("send");
    // One read by PGMQ, one by us, same visibility timeout.
    sqlx::query("SELECT * FROM pgmq.read('same_effect', 45, 1)")
        .execute(&db.pool)
        .await
        .expect("pgmq.read");
    let ours = q
        .read(&db.pool, Duration::from_secs(45), 1)
        .await
        .expect("read");
    assert_eq!(ours.len(), 1);
    assert_eq!(ours[0].msg_id, b, "FIFO by msg_id: pgmq took a, we take b");
    let rows = sqlx::query(
        "SELECT msg_id, read_ct, extract(epoch FROM vt - last_read_at)::float8, enqueued_at <= last_read_at \
         FROM pgmq.q_same_effect ORDER BY msg_id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("rows");
    for row in &rows {
        let id: i64 = row.get(0);
        assert!(id == a || id == b);
        assert_eq!(row.get::<i32, _>(1), 1, "read_ct incremented once for {id}");
        let secs: f64 = row.get(2);
        assert!(
            (44.9..=45.1).contains(&secs),
            "vt = last_read_at + 45 s for {id}: {secs}"
        );
        assert!(row.get::<bool, _>(3));
    }
}

#[tokio::test]
async fn archive_keeps_msg_id_and_sets_archived_at() {
    let db = TestDb::setup().await;
    let q = queue("archive_check");
    q.create(&db.pool).await.expect("create");
    let ids = q
        .send_batch(
            &db.pool,
            &[
                NewMessage::new(json!(1)),
                NewMessage::new(json!(2)).headers(json!({"h": 2})),
            ],
        )
        .await
        .expect("send_batch");
    q.read(&db.pool, Duration::from_secs(30), 10)
        .await
        .expect("read");
    let archived = q.archive(&db.pool, &ids).await.expect("archive");
    assert_eq!(archived, ids);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_archive_check").await,
        0
    );
    let rows = sqlx::query(
        "SELECT msg_id, read_ct, message, headers, archived_at IS NOT NULL, last_read_at IS NOT NULL \
         FROM pgmq.a_archive_check ORDER BY msg_id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("archive rows");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<i64, _>(0), ids[0]);
    assert_eq!(rows[1].get::<i64, _>(0), ids[1]);
    assert_eq!(rows[1].get::<i32, _>(1), 1);
    assert_eq!(rows[1].get::<Value, _>(2), json!(2));
    assert_eq!(rows[1].get::<Value, _>(3), json!({"h": 2}));
    assert!(
        rows.iter()
            .all(|r| r.get::<bool, _>(4) && r.get::<bool, _>(5))
    );
    // Archiving again is a no-op.
    assert!(q.archive(&db.pool, &ids).await.expect("archive").is_empty());
}

#[tokio::test]
async fn delays_set_vt_and_delete() {
    let db = TestDb::setup().await;
    let q = queue("timing");
    q.create(&db.pool).await.expect("create");
    let now = db_now(&db.pool).await;
    let later = q
        .send_with(&db.pool, &json!("later"), None, Delay::seconds(120))
        .await
        .expect("send delayed");
    let at = now + chrono::Duration::hours(1);
    let scheduled = q
        .send_with(&db.pool, &json!("scheduled"), None, Delay::At(at))
        .await
        .expect("send scheduled");
    let sub_second = q
        .send_with(
            &db.pool,
            &json!("soon"),
            None,
            Delay::After(Duration::from_millis(1500)),
        )
        .await
        .expect("send sub-second");
    let vts: Vec<(i64, DateTime<Utc>, DateTime<Utc>)> =
        sqlx::query_as("SELECT msg_id, vt, enqueued_at FROM pgmq.q_timing ORDER BY msg_id")
            .fetch_all(&db.pool)
            .await
            .expect("vts");
    let vt_of = |id: i64| vts.iter().find(|r| r.0 == id).map(|r| r.1).expect("row");
    let delayed_by = vt_of(later) - now;
    assert!(
        (119..=121).contains(&delayed_by.num_seconds()),
        "{delayed_by}"
    );
    assert_eq!(vt_of(scheduled), at);
    let soon_by = (vt_of(sub_second) - now).num_milliseconds();
    assert!((1_400..=2_500).contains(&soon_by), "{soon_by} ms");
    // None visible yet.
    assert!(
        q.read(&db.pool, Duration::from_secs(5), 10)
            .await
            .expect("read")
            .is_empty()
    );
    let next = q
        .next_visible_at(&db.pool)
        .await
        .expect("next")
        .expect("some");
    assert_eq!(next, vt_of(sub_second));

    // set_vt brings one forward; set_vt_many brings the rest forward.
    let moved = q
        .set_vt(&db.pool, later, Delay::Now)
        .await
        .expect("set_vt")
        .expect("exists");
    assert_eq!(moved.msg_id, later);
    let got = q
        .read(&db.pool, Duration::from_secs(5), 10)
        .await
        .expect("read");
    assert_eq!(
        got.iter().map(|m| m.msg_id).collect::<Vec<_>>(),
        vec![later]
    );
    let moved = q
        .set_vt_many(&db.pool, &[scheduled, sub_second, 999_999], Delay::Now)
        .await
        .expect("set_vt_many");
    assert_eq!(moved, vec![scheduled, sub_second]);
    assert!(
        q.set_vt(&db.pool, 999_999, Delay::Now)
            .await
            .expect("set_vt")
            .is_none()
    );
    let deleted = q
        .delete(&db.pool, &[later, scheduled, sub_second])
        .await
        .expect("delete");
    assert_eq!(deleted.len(), 3);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_timing").await,
        0
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.a_timing").await,
        0
    );
}

#[tokio::test]
async fn list_and_metrics_agree_with_pgmq() {
    let db = TestDb::setup().await;
    let logged = queue("m_logged");
    let unlogged = queue("m_unlogged");
    logged.create(&db.pool).await.expect("create");
    logged.create(&db.pool).await.expect("create is idempotent");
    unlogged
        .create_unlogged(&db.pool)
        .await
        .expect("create unlogged");
    for i in 0..5 {
        logged.send(&db.pool, &json!(i)).await.expect("send");
    }
    logged
        .send_with(&db.pool, &json!("hidden"), None, Delay::seconds(600))
        .await
        .expect("send");

    let ours = list_queues(&db.pool).await.expect("list");
    let theirs: Vec<(String, bool, bool)> = sqlx::query_as(
        "SELECT queue_name::text, is_partitioned, is_unlogged FROM pgmq.list_queues() ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .expect("pgmq.list_queues");
    assert_eq!(
        ours.iter()
            .map(|q| (q.queue_name.clone(), q.is_partitioned, q.is_unlogged))
            .collect::<Vec<_>>(),
        theirs
    );
    assert_eq!(theirs.len(), 2);
    assert!(
        ours.iter()
            .any(|q| q.queue_name == "m_unlogged" && q.is_unlogged)
    );
    let persistence: String = sqlx::query_scalar(
        "SELECT relpersistence::text FROM pg_class WHERE oid = 'pgmq.q_m_unlogged'::regclass",
    )
    .fetch_one(&db.pool)
    .await
    .expect("relpersistence");
    assert_eq!(persistence, "u");

    let m = logged.metrics(&db.pool).await.expect("metrics");
    let (len, visible, total): (i64, i64, i64) = sqlx::query_as(
        "SELECT queue_length, queue_visible_length, total_messages FROM pgmq.metrics('m_logged')",
    )
    .fetch_one(&db.pool)
    .await
    .expect("pgmq.metrics");
    assert_eq!(
        (m.queue_length, m.queue_visible_length, m.total_messages),
        (len, visible, total)
    );
    assert_eq!((len, visible, total), (6, 5, 6));
    assert_eq!(m.queue_name, "m_logged");
    let all = metrics_all(&db.pool).await.expect("metrics_all");
    assert_eq!(all.len(), 2);
    assert_eq!(
        all.iter()
            .find(|x| x.queue_name == "m_logged")
            .map(|x| x.queue_length),
        Some(6)
    );

    assert_eq!(logged.purge(&db.pool).await.expect("purge"), 6);
    assert!(logged.exists(&db.pool).await.expect("exists"));
    assert!(logged.drop_queue(&db.pool).await.expect("drop"));
    assert!(!logged.exists(&db.pool).await.expect("exists"));
    assert_eq!(list_queues(&db.pool).await.expect("list").len(), 1);
}

#[tokio::test]
async fn send_in_callers_transaction() {
    let db = TestDb::setup().await;
    let q = queue("tx_send");
    q.create(&db.pool).await.expect("create");

    let mut tx = db.pool.begin().await.expect("begin");
    q.send(&mut *tx, &json!("rolled back")).await.expect("send");
    q.send_batch(&mut *tx, &[NewMessage::new(json!("also rolled back"))])
        .await
        .expect("send_batch");
    tx.rollback().await.expect("rollback");
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_tx_send").await,
        0
    );

    let mut tx = db.pool.begin().await.expect("begin");
    let id = q.send(&mut *tx, &json!("committed")).await.expect("send");
    // Not visible to others before commit.
    assert!(
        q.read(&db.pool, Duration::from_secs(1), 10)
            .await
            .expect("read")
            .is_empty()
    );
    tx.commit().await.expect("commit");
    let got = q
        .read(&db.pool, Duration::from_secs(1), 10)
        .await
        .expect("read");
    assert_eq!(got.iter().map(|m| m.msg_id).collect::<Vec<_>>(), vec![id]);
}

#[tokio::test]
async fn batch_send_keeps_order_and_per_message_options() {
    let db = TestDb::setup().await;
    let q = queue("batch_order");
    q.create(&db.pool).await.expect("create");
    let batch: Vec<NewMessage> = (0..500)
        .map(|i| NewMessage::new(json!({"i": i})).headers(json!({"i": i})))
        .chain([NewMessage::new(json!("late")).delay(Delay::seconds(300))])
        .collect();
    let ids = q.send_batch(&db.pool, &batch).await.expect("send_batch");
    assert_eq!(ids.len(), 501);
    let rows: Vec<(i64, Value, Value)> = sqlx::query_as(
        "SELECT msg_id, message, headers FROM pgmq.q_batch_order WHERE message ? 'i'",
    )
    .fetch_all(&db.pool)
    .await
    .expect("rows");
    for (id, message, headers) in rows {
        let pos = ids.iter().position(|x| *x == id).expect("returned id");
        assert_eq!(message, json!({"i": pos}));
        assert_eq!(headers, json!({"i": pos}));
    }
    let read = q
        .read(&db.pool, Duration::from_secs(30), 1000)
        .await
        .expect("read");
    assert_eq!(read.len(), 500, "the delayed one stays hidden");
    assert!(
        q.send_batch(&db.pool, &[])
            .await
            .expect("empty batch")
            .is_empty()
    );
}

#[tokio::test]
async fn oversize_payload_is_refused_and_nothing_is_written() {
    let db = TestDb::setup().await;
    let q = queue("big").with_max_payload_bytes(1000);
    q.create(&db.pool).await.expect("create");
    let big = json!("x".repeat(2000));
    match q.send(&db.pool, &big).await {
        Err(Error::PayloadTooLarge { size, limit }) => {
            assert_eq!(limit, 1000);
            assert!(size > 2000);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // Multi-byte text counts in bytes: 500 × 'é' is 500 characters but 1000 bytes, plus quotes.
    let accented = json!("é".repeat(500));
    assert!(matches!(
        q.send(&db.pool, &accented).await,
        Err(Error::PayloadTooLarge { .. })
    ));
    let batch = [NewMessage::new(json!("small")), NewMessage::new(big)];
    assert!(matches!(
        q.send_batch(&db.pool, &batch).await,
        Err(Error::PayloadTooLarge { .. })
    ));
    assert_eq!(count(&db.pool, "SELECT count(*) FROM pgmq.q_big").await, 0);
    q.send(&db.pool, &json!("é".repeat(300)))
        .await
        .expect("600 bytes fit");
}

#[tokio::test]
async fn concurrent_readers_never_share_a_message() {
    let db = TestDb::setup().await;
    let q = queue("skip_locked");
    q.create(&db.pool).await.expect("create");
    let batch: Vec<_> = (0..2000).map(|i| NewMessage::new(json!(i))).collect();
    let sent = q.send_batch(&db.pool, &batch).await.expect("send");
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let q = q.clone();
        let pool = db.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = q
                    .read(&pool, Duration::from_secs(60), 37)
                    .await
                    .expect("read");
                if got.is_empty() {
                    break mine;
                }
                let ids: Vec<i64> = got.iter().map(|m| m.msg_id).collect();
                q.delete(&pool, &ids).await.expect("delete");
                mine.extend(ids);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("join"));
    }
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), sent.len(), "no message read twice");
    assert_eq!(unique, sent.into_iter().collect::<HashSet<_>>());
}

#[tokio::test]
async fn hostile_queue_names_are_refused_before_any_sql() {
    let db = TestDb::setup().await;
    let tables_before = count(
        &db.pool,
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'pgmq'::regnamespace",
    )
    .await;
    let hostile = [
        String::new(),
        "x".repeat(44),
        "q'; DROP TABLE pgmq.meta; --".to_owned(),
        "a b".to_owned(),
        "a;b".to_owned(),
        "\"quoted\"".to_owned(),
        "Email".to_owned(),
        "naïve".to_owned(),
        "日本".to_owned(),
        "1abc".to_owned(),
        "a$b".to_owned(),
        "a\nb".to_owned(),
        "ab\u{200b}".to_owned(),
    ];
    for name in &hostile {
        let err = QueueName::new(name).expect_err(name);
        let text = err.to_string();
        assert!(text.starts_with("invalid queue name"), "{text}");
        // The same error converts into the crate error.
        let as_crate: Error = err.into();
        assert!(matches!(as_crate, Error::InvalidQueueName(_)));
    }
    let tables_after = count(
        &db.pool,
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'pgmq'::regnamespace",
    )
    .await;
    assert_eq!(tables_before, tables_after, "nothing was created");
    assert_eq!(list_queues(&db.pool).await.expect("list").len(), 0);
    // The longest valid name works end to end, including its dead-letter queue.
    let longest = queue(&"l".repeat(43));
    longest.create(&db.pool).await.expect("create longest");
    longest
        .dead_letter()
        .create(&db.pool)
        .await
        .expect("create its dlq");
    let id = longest
        .dead_letter()
        .send(&db.pool, &json!(1))
        .await
        .expect("send");
    assert_eq!(
        longest
            .dead_letter()
            .archive(&db.pool, &[id])
            .await
            .expect("archive"),
        vec![id]
    );
}

#[tokio::test]
async fn null_message_from_sql_reads_as_none() {
    let db = TestDb::setup().await;
    let q = queue("nulls");
    q.create(&db.pool).await.expect("create");
    sqlx::query("INSERT INTO pgmq.q_nulls (vt, message) VALUES (clock_timestamp(), NULL)")
        .execute(&db.pool)
        .await
        .expect("insert");
    let got = q
        .read(&db.pool, Duration::from_secs(1), 1)
        .await
        .expect("read");
    assert_eq!(got[0].message, None);
    assert_eq!(got[0].headers, None);
}

#[tokio::test]
async fn deeply_nested_messages_do_not_break_a_read() {
    let db = TestDb::setup().await;
    let q = queue("deep");
    q.create(&db.pool).await.expect("create");
    let deep = format!("{}1{}", "[".repeat(2000), "]".repeat(2000));
    sqlx::query("SELECT pgmq.send('deep', $1::jsonb)")
        .bind(&deep)
        .execute(&db.pool)
        .await
        .expect("send deep");
    q.send(&db.pool, &json!({"ok": true}))
        .await
        .expect("send ok");
    let got = q
        .read(&db.pool, Duration::from_secs(30), 10)
        .await
        .expect("one unreadable row does not fail the read");
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].message, None);
    let err = got[0].decode_error.as_deref().unwrap_or("");
    assert!(err.contains("recursion limit"), "{err}");
    assert_eq!(got[1].message, Some(json!({"ok": true})));
    assert_eq!(got[1].decode_error, None);
}

#[tokio::test]
async fn every_statement_the_crate_issues_prepares() {
    let db = TestDb::setup().await;
    let q = QueueName::new("prepared").expect("name");
    apalis_pgmq_notify::PgmqStorage::<String>::new(&db.runtime(), q.clone())
        .create_queue()
        .await
        .expect("create");
    let n = apalis_pgmq_notify::prepare_every_statement(&db.pool, &q)
        .await
        .expect("every statement prepares");
    assert!(n >= 50, "{n} statements");
}

#[tokio::test]
async fn sql_and_rust_accept_the_same_queue_names() {
    let db = TestDb::setup().await;
    for name in [
        "a".to_owned(),
        "_x".to_owned(),
        "a".repeat(43),
        "a".repeat(44),
        "a".repeat(47),
        "9lives".to_owned(),
        "Upper".to_owned(),
        String::new(),
    ] {
        let rust = QueueName::new(&name).is_ok();
        let sql = sqlx::query("SELECT apalis_pgmq.check_queue_name($1)")
            .bind(&name)
            .execute(&db.pool)
            .await
            .is_ok();
        assert_eq!(rust, sql, "{name:?}: Rust says {rust}, SQL says {sql}");
    }
}
