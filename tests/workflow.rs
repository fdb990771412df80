//! apalis-workflow's sequential workflows on this backend.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis::prelude::*;
use apalis_pgmq_notify::{Config, PgmqStorage, QueueName};
use apalis_workflow::SteppedFlow;
use common::{TestDb, count, stop_worker, wait_for};

#[tokio::test]
async fn a_sequential_workflow_runs_step_by_step() {
    let db = TestDb::setup().await;
    let mut storage: PgmqStorage<u32> = PgmqStorage::with_config(
        &db.pool,
        QueueName::new("workflow").expect("name"),
        Config::default().poll_interval(Duration::from_millis(50)),
    )
    .expect("config");
    storage.create_queue().await.expect("create");
    storage.push(5).await.expect("push");
    let sums: Arc<Mutex<Vec<u32>>> = Arc::default();
    let out = sums.clone();
    let workflow = SteppedFlow::new("sum-of-odd-numbers")
        .and_then(|n: u32| async move { Ok::<_, BoxDynError>((0..n).collect::<Vec<u32>>()) })
        .and_then(|xs: Vec<u32>| async move {
            Ok::<_, BoxDynError>(xs.into_iter().filter(|x| x % 2 == 1).sum::<u32>())
        })
        .and_then(move |sum: u32| {
            let out = out.clone();
            async move {
                out.lock().expect("lock").push(sum);
                Ok::<_, BoxDynError>(())
            }
        });
    let worker = WorkerBuilder::new("workflow-worker")
        .backend(storage.clone())
        .build(workflow);
    let (stop, join) = spawn_worker!(worker);
    wait_for(
        Duration::from_secs(30),
        "the workflow to finish",
        || async {
            let done = !sums.lock().expect("lock").is_empty();
            let drained = count(&db.pool, "SELECT count(*) FROM pgmq.q_workflow").await == 0;
            (done && drained).then_some(())
        },
    )
    .await;
    stop_worker(stop, join).await;
    assert_eq!(*sums.lock().expect("lock"), vec![1 + 3]);
    // Each step was its own durable job: three archived messages.
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.a_workflow").await,
        3
    );
}
