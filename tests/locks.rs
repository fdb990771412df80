//! The statements that write about claimed messages (lease renewal, release, outcomes) run
//! concurrently in one process and across processes, often on the same rows: the keeper renews
//! every lease while the completer archives finished jobs and the fetcher releases what a full
//! worker cannot start. Whatever order their batches list the rows in, they must never
//! deadlock: PostgreSQL only notices a deadlock after `deadlock_timeout` (1 s), longer than a
//! short lease has left, so a deadlock costs leases and runs jobs twice. Renewals never wait
//! (a row another transaction holds is reported busy and tried again); releases lock in
//! `msg_id` order.

mod common;

use std::time::Duration;

use apalis_pgmq_notify::{NewMessage, PgmqQueue, QueueName, testing};
use common::TestDb;
use serde_json::json;

/// A queue of `n` messages, all claimed for ten minutes: their `(msg_id, read_ct)`.
async fn claimed(db: &TestDb, name: &str, n: usize) -> (PgmqQueue, Vec<(i64, i32)>) {
    let q = PgmqQueue::new(QueueName::new(name).unwrap());
    q.create(&db.pool).await.unwrap();
    q.dead_letter().create(&db.pool).await.unwrap();
    let bodies: Vec<_> = (0..n).map(|i| NewMessage::new(json!({ "i": i }))).collect();
    q.send_batch(&db.pool, &bodies).await.unwrap();
    let mut held = Vec::new();
    while held.len() < n {
        let got = q
            .read(&db.pool, Duration::from_secs(600), 1000)
            .await
            .unwrap();
        assert!(!got.is_empty(), "every message is readable");
        held.extend(got.iter().map(|m| (m.msg_id, m.read_ct)));
    }
    held.sort_unstable();
    (q, held)
}

/// Rows `from..from+len` of `held` (cycling), in ascending or descending order, with a
/// scattered middle so the statements' row orders differ from any index order too.
fn slice(held: &[(i64, i32)], from: usize, len: usize, descending: bool) -> Vec<(i64, i32)> {
    let mut s: Vec<(i64, i32)> = (0..len).map(|i| held[(from + i) % held.len()]).collect();
    if descending {
        s.reverse();
    }
    let mid = s.len() / 2;
    s[mid / 2..mid + mid / 2].rotate_left(mid / 3);
    s
}

#[tokio::test]
async fn renewals_in_opposite_orders_never_deadlock() {
    let db = TestDb::setup().await;
    let (q, held) = claimed(&db, "locks_renew", 3000).await;
    for round in 0..40 {
        let a = slice(&held, round * 37, 400, false);
        let b = slice(&held, round * 37 + 100, 400, true);
        let (ra, rb) = tokio::join!(
            testing::renew(&db.pool, &q, &a, 600.0),
            testing::renew(&db.pool, &q, &b, 600.0)
        );
        let (ra, rb) = (ra.expect("renewal a"), rb.expect("renewal b"));
        // A row the other renewal held at that moment is reported busy, not lost.
        assert_eq!(
            (
                ra.renewed.len() + ra.busy.len(),
                rb.renewed.len() + rb.busy.len()
            ),
            (400, 400),
            "round {round}: every lease renewed or busy"
        );
        for (id, _) in &a {
            assert!(
                ra.renewed.binary_search(id).is_ok() || rb.renewed.binary_search(id).is_ok(),
                "round {round}: {id} renewed by one of them"
            );
        }
    }
}

#[tokio::test]
async fn a_renewal_never_waits_for_a_row_another_transaction_holds() {
    let db = TestDb::setup().await;
    let (q, held) = claimed(&db, "locks_busy", 20).await;
    // Another transaction (an operator's, say) holds one row and stays open.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM pgmq.q_locks_busy WHERE msg_id = $1 FOR UPDATE")
        .bind(held[7].0)
        .execute(&mut *other)
        .await
        .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        testing::renew(&db.pool, &q, &held, 600.0),
    )
    .await
    .expect("the renewal returns while the other transaction is open")
    .expect("renewal");
    assert_eq!(r.busy, vec![held[7].0], "the held row is reported busy");
    assert_eq!(r.renewed.len(), 19, "every other lease is renewed");
    other.rollback().await.unwrap();
    let again = testing::renew(&db.pool, &q, &held[7..8], 600.0)
        .await
        .unwrap();
    assert_eq!(again.renewed, vec![held[7].0], "renewed once it is free");
    // A delivery that is not ours any more is neither renewed nor busy.
    let stale = testing::renew(&db.pool, &q, &[(held[3].0, held[3].1 + 1)], 600.0)
        .await
        .unwrap();
    assert_eq!(stale, testing::Renewal::default());
}

#[tokio::test]
async fn a_release_and_an_outcome_racing_a_renewal_never_deadlock() {
    let db = TestDb::setup().await;
    let (q, held) = claimed(&db, "locks_mixed", 9000).await;
    for round in 0..20 {
        // Each round has rows of its own: 150 released, 150 archived, 150 only renewed; the
        // renewal covers all 450, listed in the opposite order.
        let base = round * 450;
        let renew = slice(&held, base, 450, true);
        let release = slice(&held, base, 150, false);
        let done = slice(&held, base + 150, 150, false);
        let (rn, rl, dn) = tokio::join!(
            testing::renew(&db.pool, &q, &renew, 600.0),
            testing::release(&db.pool, &q, &release),
            testing::archive_outcomes(&db.pool, &q, &done)
        );
        let (rn, rl, dn) = (
            rn.expect("renewal"),
            rl.expect("release"),
            dn.expect("outcomes"),
        );
        assert_eq!(rl.len(), 150, "round {round}: every release applied");
        assert_eq!(dn.len(), 150, "round {round}: every outcome applied");
        let only_renewed = &held[base + 300..base + 450];
        assert!(
            only_renewed
                .iter()
                .all(|(id, _)| rn.renewed.binary_search(id).is_ok()),
            "round {round}: every lease nobody else touched was renewed"
        );
    }
}
