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
        &db.runtime(),
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

/// A graph that fans out to three nodes and back in: the fan-in node waits for the other
/// nodes' results through `WaitForCompletion`, so it needs `Config::store_results`.
#[tokio::test]
async fn a_graph_workflow_fans_out_and_back_in() {
    use apalis_workflow::{GraphFlow, WorkflowSink};
    let db = TestDb::setup().await;
    let mut storage: PgmqStorage<serde_json::Value> = PgmqStorage::with_config(
        &db.runtime(),
        QueueName::new("graph").expect("name"),
        Config::default().store_results(true),
    )
    .expect("config");
    storage.create_queue().await.expect("create");
    let sums: Arc<Mutex<Vec<usize>>> = Arc::default();
    let out = sums.clone();
    let graph = GraphFlow::new("fan-out-and-in");
    let source = graph.add_node(
        "source",
        task_fn(|n: u32| async move { Ok::<_, BoxDynError>(n as usize) }),
    );
    let plus_one = graph
        .add_node(
            "plus_one",
            task_fn(|n: usize| async move { Ok::<_, BoxDynError>(n + 1) }),
        )
        .depends_on(&source);
    let double = graph
        .add_node(
            "double",
            task_fn(|n: usize| async move { Ok::<_, BoxDynError>(n * 2) }),
        )
        .depends_on(&source);
    let square = graph
        .add_node(
            "square",
            task_fn(|n: usize| async move { Ok::<_, BoxDynError>(n * n) }),
        )
        .depends_on(&source);
    let _collect = graph
        .add_node(
            "collect",
            task_fn(move |parts: (usize, usize, usize)| {
                let out = out.clone();
                async move {
                    out.lock().expect("lock").push(parts.0 + parts.1 + parts.2);
                    Ok::<_, BoxDynError>(())
                }
            }),
        )
        .depends_on((&plus_one, &double, &square));
    storage.push_start(5u32).await.expect("push");
    let worker = WorkerBuilder::new("graph-worker")
        .backend(storage.clone())
        .concurrency(4)
        .build(graph);
    let (stop, join) = spawn_worker!(worker);
    wait_for(Duration::from_secs(60), "the graph to finish", || async {
        let done = !sums.lock().expect("lock").is_empty();
        let drained = count(&db.pool, "SELECT count(*) FROM pgmq.q_graph").await == 0;
        (done && drained).then_some(())
    })
    .await;
    stop_worker(stop, join).await;
    // 6 + 10 + 25, collected once.
    assert_eq!(*sums.lock().expect("lock"), vec![41]);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pgmq.q_graph_dlq").await,
        0
    );
}
