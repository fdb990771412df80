//! The completer: writes job outcomes in batches, one statement per flush.
//!
//! Outcomes arrive on a channel from the ack layer. The completer collects them until the batch
//! is full or the flush interval has passed since the first one, then writes every kind of
//! outcome (archive, delete, retry, dead-letter) in a single statement of data-modifying CTEs.
//! Each row is fenced by the `read_ct` of the delivery it belongs to. A failed flush is retried
//! with backoff; the leases of its messages keep being renewed meanwhile, so nothing is handed
//! to another worker while its outcome waits.

use crate::error::Describe;
use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;

use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::{
    deadline::Conn,
    error::pg::{is_data_error, is_privilege as is_privilege_error, is_undefined_table},
    lease::LeaseTable,
    notify::{
        WakeSignal,
        wakeup::{self, WakeTarget},
    },
    queue::{Action, MAX_DELAY, Outcome, PgmqQueue},
    util::{Stop, error_backoff},
};

enum Command {
    Complete(Outcome),
    /// Answer once everything sent before this command is written.
    Flush(oneshot::Sender<()>),
}

/// Sends outcomes to the completer task.
#[derive(Debug, Clone)]
pub(crate) struct CompleterHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl CompleterHandle {
    /// A handle whose outcomes the caller receives instead of a completer task (the ack
    /// layer's unit tests look at what it queued).
    #[cfg(test)]
    pub(crate) fn channel() -> (Self, mpsc::UnboundedReceiver<Outcome>) {
        let (tx, mut commands) = mpsc::unbounded_channel();
        let (out, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(c) = commands.recv().await {
                match c {
                    Command::Complete(o) => {
                        if out.send(o).is_err() {
                            return;
                        }
                    }
                    Command::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        (Self { tx }, rx)
    }

    /// Queues an outcome. Never blocks: the channel holds at most one entry per claimed
    /// message, and claims are bounded by what workers can run.
    pub(crate) fn complete(&self, completion: Outcome) -> bool {
        self.tx.send(Command::Complete(completion)).is_ok()
    }

    /// Waits until every outcome queued before this call is written.
    pub(crate) async fn flush(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Flush(tx)).is_err() {
            return false;
        }
        rx.await.is_ok()
    }
}

/// Everything the completer task needs; it holds no reference to the storage itself, so the
/// task ends once every sender is dropped and the last batch is written.
pub(crate) struct CompleterCtx {
    pub(crate) pool: PgPool,
    pub(crate) queue: PgmqQueue,
    pub(crate) dlq: PgmqQueue,
    pub(crate) leases: Arc<LeaseTable>,
    /// Raised when a retry is written, so idle workers wake when it becomes visible.
    pub(crate) signal: Arc<WakeSignal>,
    /// Where to wake idle workers of other processes when a retry is written (`None`: workers
    /// do not listen).
    pub(crate) wake_target: Option<WakeTarget>,
    pub(crate) batch_size: usize,
    pub(crate) flush_interval: Duration,
    /// Where stored results are announced.
    pub(crate) results_channel: String,
    /// The deadline of each write (see `src/deadline.rs`): a write that passes it fails like
    /// a lost connection, and is tried again with backoff on a new connection.
    pub(crate) deadline: Duration,
}

/// How long a completer asked to stop keeps trying to write what it has.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Resolves `extra` after `stop` is requested.
async fn after(stop: &mut Stop, extra: Duration) {
    stop.requested().await;
    tokio::time::sleep(extra).await;
}

/// A completer: the handle the ack layer sends outcomes to, and the service (run by the
/// runtime) that writes them. Asked to stop, the service takes no new outcomes, writes those
/// it has, and ends.
pub(crate) fn completer(
    ctx: CompleterCtx,
) -> (
    CompleterHandle,
    impl FnOnce(Stop) -> BoxFuture<'static, ()> + Send + 'static,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (CompleterHandle { tx }, move |stop| {
        Box::pin(run(rx, ctx, stop))
    })
}

async fn run(mut rx: mpsc::UnboundedReceiver<Command>, ctx: CompleterCtx, mut stop: Stop) {
    let mut stopping = false;
    let mut pending: Vec<Outcome> = Vec::new();
    // (number of completions that must be written first, waiter)
    let mut waiters: Vec<(u64, oneshot::Sender<()>)> = Vec::new();
    let mut received: u64 = 0;
    let mut written: u64 = 0;
    let mut open = true;
    // Held while outcomes keep coming, so each flush is one round trip (a pool's
    // `test_before_acquire` ping would be another); given back when nothing is pending.
    let mut conn: Option<Conn> = None;

    let absorb = |cmd: Command,
                  pending: &mut Vec<Outcome>,
                  waiters: &mut Vec<(u64, oneshot::Sender<()>)>,
                  received: &mut u64| match cmd {
        Command::Complete(c) => {
            pending.push(c);
            *received += 1;
        }
        Command::Flush(w) => waiters.push((*received, w)),
    };

    loop {
        // Answer every waiter whose completions are written.
        let mut i = 0;
        while i < waiters.len() {
            if waiters[i].0 <= written {
                let (_, w) = waiters.swap_remove(i);
                let _ = w.send(());
            } else {
                i += 1;
            }
        }
        if pending.is_empty() {
            // Every waiter was answered above: nothing is pending, so all is written.
            if !open {
                return;
            }
            if let Ok(cmd) = rx.try_recv() {
                absorb(cmd, &mut pending, &mut waiters, &mut received);
                continue;
            }
            conn = None;
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => absorb(cmd, &mut pending, &mut waiters, &mut received),
                    None => open = false,
                },
                () = stop.requested(), if !stopping => {
                    stopping = true;
                    rx.close();
                }
            }
            continue;
        }
        // Gather more until the batch is full, a flush is requested, or the interval is over;
        // a result a caller waits for is written with whatever has arrived.
        let deadline = tokio::time::Instant::now() + ctx.flush_interval;
        let mut awaited = pending.iter().any(Outcome::awaited);
        while open && pending.len() < ctx.batch_size && waiters.is_empty() && !awaited {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        absorb(cmd, &mut pending, &mut waiters, &mut received);
                        awaited = pending.last().is_some_and(Outcome::awaited);
                    }
                    None => open = false,
                },
                () = tokio::time::sleep_until(deadline) => break,
                () = stop.requested(), if !stopping => {
                    stopping = true;
                    rx.close();
                }
            }
        }
        while pending.len() < ctx.batch_size {
            match rx.try_recv() {
                Ok(cmd) => absorb(cmd, &mut pending, &mut waiters, &mut received),
                Err(_) => break,
            }
        }
        let n = pending.len().min(ctx.batch_size);
        // Asked to stop, a write the database does not take within `STOP_GRACE` is given up:
        // its jobs are delivered again once their leases lapse.
        let gave_up = tokio::select! {
            () = write_batch(&ctx, &pending[..n], &mut conn) => false,
            () = after(&mut stop, STOP_GRACE) => true,
        };
        if gave_up {
            tracing::error!(queue = %ctx.queue.name(), outcomes = pending.len(),
                "stopping: job outcomes could not be written in time; their jobs will be delivered again when their leases lapse");
            ctx.leases.outcomes_written(pending.len());
            return;
        }
        let mut soonest_retry: Option<Duration> = None;
        for c in pending.drain(..n) {
            ctx.leases.remove(c.delivery.msg_id, c.delivery.read_ct);
            if let Action::Retry { delay } = c.action {
                let delay = delay.min(MAX_DELAY);
                soonest_retry = Some(soonest_retry.map_or(delay, |s| s.min(delay)));
            }
        }
        ctx.leases.outcomes_written(n);
        match soonest_retry {
            Some(d) if d <= Duration::from_millis(1) => ctx.signal.wake(),
            Some(d) => ctx.signal.wake_at(tokio::time::Instant::now() + d),
            None => {}
        }
        if let (Some(d), Some(target)) = (soonest_retry, &ctx.wake_target)
            && let Err(e) = wake_others(&ctx.pool, target, d, ctx.deadline).await
        {
            tracing::debug!(error = %e.describe(),
                "could not wake other processes' workers for a retry; they find it at their next poll");
        }
        written += n as u64;
    }
}

/// Writes a batch of outcomes. A transient failure (connection lost, server restarting) is
/// retried with backoff; a failure caused by the data of one outcome (a value PostgreSQL will
/// not store) is isolated: the outcomes are written one by one and the offending one is
/// replaced by a dead letter that says why, so one bad outcome never blocks the others.
async fn write_batch(ctx: &CompleterCtx, batch: &[Outcome], conn: &mut Option<Conn>) {
    let mut failures = 0u32;
    loop {
        match write(ctx, batch, conn).await {
            Ok(()) => {
                count_dead_letters(ctx, batch);
                return;
            }
            Err(e) if is_data_error(&e) && batch.len() > 1 => {
                tracing::warn!(error = %e.describe(), outcomes = batch.len(),
                    "an outcome in a batch cannot be written; writing them one by one");
                for c in batch {
                    write_one(ctx, c, conn).await;
                }
                return;
            }
            Err(e) if is_data_error(&e) => {
                write_one(ctx, &batch[0], conn).await;
                return;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e.describe(), outcomes = batch.len(), failures,
                    "writing job outcomes failed; retrying");
                if is_undefined_table(&e) {
                    // The queue or its dead-letter queue was dropped under us: recreate them.
                    let _ = ctx.queue.create(&ctx.pool).await;
                    let _ = ctx.dlq.create(&ctx.pool).await;
                }
                tokio::time::sleep(error_backoff(failures)).await;
            }
        }
    }
}

/// Counts the dead letters of written outcomes, by reason (`failed`, `killed`, `undecodable`,
/// `outcome_unwritable`): every dead letter is counted once, where it is written.
fn count_dead_letters(ctx: &CompleterCtx, written: &[Outcome]) {
    for o in written {
        if let Action::DeadLetter { info } = &o.action {
            let reason = info
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("failed");
            crate::obs::dead_lettered(ctx.queue.name().as_str(), ctx.queue.metrics_kind(), reason);
        }
    }
}

/// Writes one outcome; if its data cannot be stored, dead-letters the message with the reason
/// instead; if even that fails, logs it and leaves the message to be delivered again when its
/// lease lapses.
async fn write_one(ctx: &CompleterCtx, c: &Outcome, conn: &mut Option<Conn>) {
    let mut failures = 0u32;
    let mut current = c.clone();
    loop {
        match write(ctx, std::slice::from_ref(&current), conn).await {
            Ok(()) => {
                count_dead_letters(ctx, std::slice::from_ref(&current));
                return;
            }
            Err(e)
                if is_data_error(&e)
                    && current.result.as_ref().is_some_and(|r| r.value.is_some()) =>
            {
                // The result is what PostgreSQL refused: keep the outcome, and say why the
                // result is missing.
                tracing::error!(msg_id = c.delivery.msg_id, error = %e.describe(),
                    "a job's result cannot be stored; keeping its outcome with an error instead of the result");
                if let Some(r) = current.result.as_mut() {
                    r.value = None;
                    r.error = Some(crate::util::clean_text(
                        &format!("the job's result could not be stored: {}", e.describe()),
                        crate::ack::MAX_ERROR_TEXT,
                    ));
                }
            }
            Err(e) if is_data_error(&e) => {
                if matches!(&current.action, Action::DeadLetter { info } if info.get("reason") == Some(&Value::from("outcome_unwritable")))
                {
                    tracing::error!(msg_id = c.delivery.msg_id, error = %e.describe(),
                        "a job's outcome cannot be written, nor a dead letter for it; it will be delivered again when its lease lapses");
                    return;
                }
                tracing::error!(msg_id = c.delivery.msg_id, read_ct = c.delivery.read_ct, error = %e.describe(),
                    "a job's outcome cannot be written; dead-lettering the message with the reason");
                current.action = Action::DeadLetter {
                    info: serde_json::json!({
                        "reason": "outcome_unwritable",
                        "error": crate::util::clean_text(&e.describe(), crate::ack::MAX_ERROR_TEXT),
                        "intended": c.action.name(),
                    }),
                };
                if let Some(r) = current.result.as_mut() {
                    r.status = "Failed";
                    r.value = None;
                    r.error = Some(crate::util::clean_text(
                        &format!("the job's outcome could not be written: {}", e.describe()),
                        crate::ack::MAX_ERROR_TEXT,
                    ));
                }
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(msg_id = c.delivery.msg_id, error = %e.describe(), failures,
                    "writing a job outcome failed; retrying");
                tokio::time::sleep(error_backoff(failures)).await;
            }
        }
    }
}

/// Writes on the held connection (acquiring one if none is held); a connection that failed
/// for any reason but the data is dropped, not reused. If the results cannot be kept because
/// the role may not write `apalis_pgmq.results`, the outcomes are written without them: a job's
/// outcome never waits on its result.
async fn write(
    ctx: &CompleterCtx,
    batch: &[Outcome],
    conn: &mut Option<Conn>,
) -> Result<(), sqlx::Error> {
    match write_outcomes(ctx, batch, conn, true).await {
        Err(e) if is_privilege_error(&e) && batch.iter().any(|c| c.result.is_some()) => {
            tracing::error!(error = %e.describe(), outcomes = batch.len(),
                "job results cannot be kept (grant INSERT, UPDATE on apalis_pgmq.results to the workers' role); writing the outcomes without them");
            write_outcomes(ctx, batch, conn, false).await
        }
        other => other,
    }
}

async fn write_outcomes(
    ctx: &CompleterCtx,
    batch: &[Outcome],
    conn: &mut Option<Conn>,
    with_results: bool,
) -> Result<(), sqlx::Error> {
    let by = tokio::time::Instant::now() + ctx.deadline;
    let mut c = match conn.take() {
        Some(c) => c,
        None => Conn::acquire(&ctx.pool, by).await?,
    };
    let written = c
        .run(by, "writing job outcomes", |x| {
            ctx.queue
                .complete(x, batch, with_results, &ctx.results_channel)
        })
        .await;
    if written.as_ref().is_ok()
        || written
            .as_ref()
            .is_err_and(|e| is_data_error(e) || is_privilege_error(e))
    {
        // The server answered: the connection is fine for the next write.
        c.trust();
        *conn = Some(c);
    }
    let matched = written?;
    if matched.len() < batch.len() {
        tracing::debug!(
            stale = batch.len() - matched.len(),
            "some outcomes matched no row (message gone or delivered again after a lost lease)"
        );
    }
    Ok(())
}

/// [`wakeup::wake_others`] on a connection of its own, within `deadline`.
async fn wake_others(
    pool: &PgPool,
    target: &WakeTarget,
    delay: Duration,
    deadline: Duration,
) -> crate::error::Result<()> {
    let by = tokio::time::Instant::now() + deadline;
    let mut conn = Conn::acquire(pool, by).await?;
    conn.run(by, "waking other processes' workers", |c| {
        wakeup::wake_others(c, target, delay)
    })
    .await
}
