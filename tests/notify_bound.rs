//! The bound on notifying commits (migration 0002, `src/notify/wakeup.rs`): for one arming, a
//! producer session sends at most one notifying commit, and only one transaction at a time
//! holds the right to send it; never one per insert.
//!
//! "Did this commit notify?" is answered without waiting for time to pass: after the commits
//! under test, a sentinel is sent on the same channel. PostgreSQL delivers notifications in
//! commit order, so once the sentinel is received every notification committed before it has
//! been received too: count those.

mod common;

use std::time::Duration;

use apalis_pgmq_notify::{NotifyChannels, NotifyMode, PgmqQueue, QueueName, enable_notify};
use common::TestDb;
use serde_json::json;
use sqlx::{Connection, PgConnection, postgres::PgListener};

const WAIT: Duration = Duration::from_secs(30);

struct Bench {
    db: TestDb,
    queue: PgmqQueue,
    channel: String,
    listener: PgListener,
    sentinels: u32,
    generation: i64,
}

impl Bench {
    async fn new(name: &str) -> Self {
        let db = TestDb::setup().await;
        let queue = PgmqQueue::new(QueueName::new(name).expect("name"));
        queue.create(&db.pool).await.expect("create");
        enable_notify(
            &db.pool,
            queue.name(),
            &NotifyChannels::default(),
            NotifyMode::OnDemand,
        )
        .await
        .expect("enable");
        let channel = NotifyChannels::default().queue_channel(queue.name());
        let mut listener = PgListener::connect_with(&db.pool).await.expect("listener");
        listener.listen(&channel).await.expect("listen");
        Self {
            db,
            queue,
            channel,
            listener,
            sentinels: 0,
            generation: 0,
        }
    }

    /// A producer session of its own.
    async fn session(&self) -> PgConnection {
        PgConnection::connect_with(&self.db.options)
            .await
            .expect("a producer session")
    }

    /// Arms a wake-up as a worker does (a new arming), then bumps the listeners' version.
    async fn arm(&mut self) {
        self.generation += 1;
        sqlx::query("SELECT apalis_pgmq.arm($1, 'worker', 60, $2)")
            .bind(&self.channel)
            .bind(self.generation)
            .execute(&self.db.pool)
            .await
            .expect("arm");
        sqlx::query("SELECT apalis_pgmq.listeners_changed()")
            .execute(&self.db.pool)
            .await
            .expect("bump");
    }

    /// Disarms the current arming, as the woken worker does.
    async fn disarm(&self) {
        sqlx::query("SELECT apalis_pgmq.disarm($1, 'worker', $2)")
            .bind(&self.channel)
            .bind(self.generation)
            .execute(&self.db.pool)
            .await
            .expect("disarm");
    }

    async fn send(&self, conn: &mut PgConnection) {
        self.queue.send(&mut *conn, &json!(1)).await.expect("send");
    }

    /// Wake-up notifications committed since the last call.
    async fn notified(&mut self) -> usize {
        self.sentinels += 1;
        let sentinel = format!("sentinel:{}", self.sentinels);
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.channel)
            .bind(&sentinel)
            .execute(&self.db.pool)
            .await
            .expect("sentinel");
        let mut wakes = 0;
        loop {
            let n = tokio::time::timeout(WAIT, self.listener.recv())
                .await
                .expect("the sentinel arrives")
                .expect("listener open");
            if n.payload() == sentinel {
                return wakes;
            }
            assert!(n.payload().contains("\"wake\""), "{}", n.payload());
            wakes += 1;
        }
    }
}

#[tokio::test]
async fn a_session_notifies_once_per_arming_however_many_inserts() {
    let mut b = Bench::new("bound_once").await;
    let mut p = b.session().await;
    let mut q = b.session().await;
    b.send(&mut p).await;
    assert_eq!(b.notified().await, 0, "nobody armed: no notification");
    b.arm().await;
    b.send(&mut p).await;
    assert_eq!(
        b.notified().await,
        1,
        "the first insert of a session notifies"
    );
    for _ in 0..5 {
        b.send(&mut p).await;
    }
    assert_eq!(
        b.notified().await,
        0,
        "its next inserts, the arming unanswered, do not"
    );
    b.send(&mut q).await;
    assert_eq!(b.notified().await, 1, "another session notifies once too");
    // A new arming: once more per session, however many rows a transaction inserts.
    b.arm().await;
    let mut tx = p.begin().await.expect("begin");
    b.queue.send(&mut *tx, &json!(1)).await.expect("send");
    b.queue.send(&mut *tx, &json!(2)).await.expect("send");
    tx.commit().await.expect("commit");
    assert_eq!(b.notified().await, 1);
    // Disarmed (answered): nothing.
    b.disarm().await;
    b.send(&mut q).await;
    assert_eq!(b.notified().await, 0, "a disarmed arming is nobody");
}

#[tokio::test]
async fn k_sessions_inserting_n_rows_each_send_k_notifications_not_k_times_n() {
    let mut b = Bench::new("bound_k").await;
    let mut sessions = Vec::new();
    for _ in 0..6 {
        sessions.push(b.session().await);
    }
    // Armed, never disarmed: a worker whose notification has not arrived.
    b.arm().await;
    for _ in 0..8 {
        for s in &mut sessions {
            b.queue.send(&mut *s, &json!(1)).await.expect("send");
        }
    }
    assert_eq!(
        b.notified().await,
        6,
        "one per session, not one per insert (48)"
    );
}

#[tokio::test]
async fn a_rolled_back_notification_is_sent_by_the_next_insert() {
    let mut b = Bench::new("bound_rollback").await;
    let mut p = b.session().await;
    b.arm().await;
    let mut tx = p.begin().await.expect("begin");
    b.queue.send(&mut *tx, &json!(1)).await.expect("send");
    tx.rollback().await.expect("rollback");
    assert_eq!(b.notified().await, 0, "no job, no notification");
    b.send(&mut p).await;
    assert_eq!(
        b.notified().await,
        1,
        "the session's mark was rolled back with its notification"
    );
    // The same with a savepoint rolled back inside a committed transaction.
    b.arm().await;
    let mut tx = p.begin().await.expect("begin");
    let mut sp = (*tx).begin().await.expect("savepoint");
    b.queue.send(&mut *sp, &json!(2)).await.expect("send");
    sp.rollback().await.expect("rollback to savepoint");
    tx.commit().await.expect("commit");
    assert_eq!(b.notified().await, 0);
    b.send(&mut p).await;
    assert_eq!(b.notified().await, 1);
}

#[tokio::test]
async fn an_open_transaction_holds_up_no_other_producers_notification() {
    let mut b = Bench::new("bound_open").await;
    let mut p = b.session().await;
    let mut q = b.session().await;
    b.arm().await;
    // P inserts and stays open (its trigger runs only when it commits: it holds nothing).
    let mut open = p.begin().await.expect("begin");
    b.queue.send(&mut *open, &json!(1)).await.expect("send");
    b.send(&mut q).await;
    assert_eq!(b.notified().await, 1, "Q's commit notifies at once");
    open.commit().await.expect("commit");
    assert_eq!(
        b.notified().await,
        1,
        "P notifies when it commits (its mark was below the arming)"
    );
}

#[tokio::test]
async fn repeatable_read_producers_whose_snapshot_predates_the_arming_still_notify() {
    let mut b = Bench::new("bound_rr").await;
    let mut p = b.session().await;
    b.send(&mut p).await;
    assert_eq!(b.notified().await, 0, "nobody armed");
    let mut tx = p.begin().await.expect("begin");
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .expect("isolation");
    sqlx::query("SELECT 1")
        .execute(&mut *tx)
        .await
        .expect("take the snapshot");
    b.arm().await;
    b.queue.send(&mut *tx, &json!(1)).await.expect("send");
    tx.commit().await.expect("commit");
    assert_eq!(b.notified().await, 1);
}

#[tokio::test]
async fn one_transaction_at_a_time_sends_an_armings_notification() {
    let mut b = Bench::new("bound_one").await;
    let mut h = b.session().await;
    let mut s = b.session().await;
    b.arm().await;
    // H's trigger runs now (IMMEDIATE): H holds the right to notify for this arming until it
    // ends.
    let mut tx = h.begin().await.expect("begin");
    b.queue.send(&mut *tx, &json!(1)).await.expect("send");
    sqlx::query("SET CONSTRAINTS pgmq.apalis_notify IMMEDIATE")
        .execute(&mut *tx)
        .await
        .expect("fire now");
    b.send(&mut s).await;
    assert_eq!(
        b.notified().await,
        0,
        "S leaves the wake-up to H, which is committing it"
    );
    tx.commit().await.expect("commit");
    assert_eq!(
        b.notified().await,
        1,
        "H's commit wakes the worker for both"
    );
    // The documented exception: H fails after its trigger ran. Nothing is sent; S's job is
    // found by the worker's next read (the next notification, or its fallback deadline).
    b.arm().await;
    let mut tx = h.begin().await.expect("begin");
    b.queue.send(&mut *tx, &json!(2)).await.expect("send");
    sqlx::query("SET CONSTRAINTS pgmq.apalis_notify IMMEDIATE")
        .execute(&mut *tx)
        .await
        .expect("fire now");
    b.send(&mut s).await;
    tx.rollback().await.expect("rollback");
    assert_eq!(b.notified().await, 0);
    b.send(&mut s).await;
    assert_eq!(b.notified().await, 1, "S's next insert notifies");
}

#[tokio::test]
async fn a_producer_with_only_pgmqs_rights_notifies() {
    let mut b = Bench::new("bound_rights").await;
    let (role, pool) = common::producer_role(
        &b.db,
        "bound_rights",
        "GRANT USAGE ON SEQUENCE pgmq.q_bound_rights_msg_id_seq TO {role}",
    )
    .await;
    let mut p = pool.acquire().await.expect("a producer session");
    b.queue
        .send(&mut *p, &json!(1))
        .await
        .expect("send without any right in apalis_pgmq");
    assert_eq!(b.notified().await, 0, "nobody waits");
    b.arm().await;
    b.queue.send(&mut *p, &json!(2)).await.expect("send");
    assert_eq!(b.notified().await, 1);
    drop(p);
    pool.close().await;
    common::drop_role(&b.db, &role).await;
}
