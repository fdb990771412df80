//! Acknowledgement: maps each job's outcome to a durable action on its message.
//!
//! [`AckLayer`] is the backend's middleware. It sits outside the user's middleware (retries,
//! timeouts, concurrency limits), so it sees the final result of a delivery, and maps it:
//!
//! | result | action |
//! |---|---|
//! | `Ok` (`Done`) | archive (or delete: [`DoneAction`](crate::DoneAction)) |
//! | `AbortError` (`Killed`) | delete (or archive, or dead-letter: [`KilledAction`](crate::KilledAction)) |
//! | `RetryAfterError(d)`, attempts left | visible again at now + `d` (at most 100 years) |
//! | `DeferredError`, attempts left | visible again after [`Config::defer_delay`](crate::Config::defer_delay) (default 1 s) |
//! | other error or panic, attempts left (`Failed`) | visible again at now + backoff(attempt) |
//! | any error or panic but `AbortError`, no attempts left | dead-letter (or archive, or delete: [`ExhaustedAction`](crate::ExhaustedAction)) |
//!
//! A panicking handler is caught here and counts as a failure ([`HandlerPanicked`]); the worker
//! keeps running. The action is queued to the completer, which writes outcomes in batches.

pub(crate) mod completer;

use std::{
    any::Any,
    panic::AssertUnwindSafe,
    sync::Arc,
    task::{Context, Poll},
};

use apalis_core::{
    error::{AbortError, BoxDynError, DeferredError, RetryAfterError},
    task::Task,
};
use futures::{FutureExt, future::BoxFuture};
use serde_json::json;
use tower::{Layer, Service};

use crate::{
    config::{Config, DoneAction, ExhaustedAction, KilledAction},
    lease::LeaseTable,
    queue::{
        Action, Delivery, MAX_DELAY, MessageInfo, Outcome, QueueName, StoredResult, wants_result,
    },
    util::{clean_text, random_unit},
};
use completer::CompleterHandle;

/// What the ack layer needs of a storage: its configuration, its leases and its completer.
/// Shared by every clone of the storage and every worker's ack layer.
pub(crate) struct AckContext {
    /// The queue, for logs.
    pub(crate) queue: QueueName,
    /// Outcome mapping, default max attempts, backoff.
    pub(crate) config: Config,
    /// The deliveries this process holds; a running job watches its lease here.
    pub(crate) leases: Arc<LeaseTable>,
    /// Started by the first worker (it needs a tokio runtime).
    pub(crate) completer: std::sync::OnceLock<CompleterHandle>,
}

impl AckContext {
    /// Queues an outcome for the completer.
    pub(crate) fn complete(&self, completion: Outcome) {
        // Counted before it is sent: the completer may write it before this line returns.
        self.leases.outcome_queued();
        let sent = self.completer.get().is_some_and(|c| c.complete(completion));
        if !sent {
            self.leases.outcomes_written(1);
            tracing::error!(queue = %self.queue,
                "the completer is not running; an outcome was dropped (the message will be redelivered)");
        }
    }

    /// Waits until every outcome queued so far is written.
    pub(crate) async fn flush(&self) {
        if let Some(c) = self.completer.get() {
            c.flush().await;
        }
    }
}

impl StoredResult {
    /// The result of a delivery that finished the job. The output is kept as JSON when it
    /// encodes, fits `max_bytes` and holds no NUL character (which `jsonb` refuses); otherwise
    /// the result says why it is missing, and the job's outcome is written as usual.
    pub(crate) fn of<Res: serde::Serialize>(
        job_id: String,
        result: Result<&Res, &BoxDynError>,
        max_bytes: usize,
        awaited: bool,
    ) -> Self {
        let (status, value, error) = match result {
            Ok(res) => match encode_result(res, max_bytes) {
                Ok(v) => ("Done", Some(v), None),
                Err(why) => ("Done", None, Some(why)),
            },
            Err(e) if e.is::<AbortError>() => ("Killed", None, Some(error_text(&**e))),
            Err(e) => ("Failed", None, Some(error_text(&**e))),
        };
        Self {
            job_id,
            status,
            value,
            error,
            awaited,
        }
    }
}

/// A handler's output as JSON text, or why it cannot be kept.
fn encode_result<Res: serde::Serialize>(res: &Res, max_bytes: usize) -> Result<String, String> {
    let value = serde_json::to_value(res)
        .map_err(|e| format!("the job's result could not be encoded as JSON: {e}"))?;
    if has_nul(&value) {
        return Err(
            "the job's result holds a NUL character, which PostgreSQL's jsonb cannot store"
                .to_owned(),
        );
    }
    let text = value.to_string();
    if text.len() > max_bytes {
        return Err(format!(
            "the job's result ({} bytes as JSON) is larger than max_payload_bytes ({max_bytes}); it was not kept",
            text.len()
        ));
    }
    Ok(text)
}

fn has_nul(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Longest error text kept in a dead-letter record, in bytes.
pub(crate) const MAX_ERROR_TEXT: usize = 4096;

/// The error a delivery ends with when its handler panicked.
#[derive(Debug, Clone, thiserror::Error)]
#[error("job handler panicked: {message}")]
pub struct HandlerPanicked {
    /// The panic message, when it was a string.
    pub message: String,
}

impl HandlerPanicked {
    fn from_payload(payload: &(dyn Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        Self { message }
    }
}

/// The error a delivery ends with when this process lost its lease while the handler ran
/// (renewals failed until shortly before the lease could lapse). The handler's future was
/// dropped at that point and no outcome was written: the message is delivered again.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the lease on message {msg_id} was lost (it could not be renewed); the job was stopped and will be delivered again"
)]
pub struct LeaseLost {
    /// The message whose lease was lost.
    pub msg_id: i64,
}

/// The backend middleware that writes job outcomes. Built by the worker from
/// [`PgmqStorage`](crate::PgmqStorage); you do not add it yourself.
#[derive(Clone)]
pub struct AckLayer {
    shared: Arc<AckContext>,
}

impl std::fmt::Debug for AckLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckLayer")
            .field("queue", &self.shared.queue)
            .finish()
    }
}

impl AckLayer {
    pub(crate) fn new(shared: Arc<AckContext>) -> Self {
        Self { shared }
    }
}

impl<S> Layer<S> for AckLayer {
    type Service = AckService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AckService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service built by [`AckLayer`].
#[derive(Clone)]
pub struct AckService<S> {
    inner: S,
    shared: Arc<AckContext>,
}

impl<S> std::fmt::Debug for AckService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckService")
            .field("queue", &self.shared.queue)
            .finish()
    }
}

impl<S, Args, Res> Service<Task<Args>> for AckService<S>
where
    S: Service<Task<Args>, Response = Res>,
    S::Error: Into<BoxDynError>,
    S::Future: Send + 'static,
    Res: serde::Serialize + Send + 'static,
{
    type Response = Res;
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<Res, BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<Args>) -> Self::Future {
        let info = task.data().get::<MessageInfo>().cloned();
        let delivery = info.as_ref().map(|m| (m.msg_id, m.read_ct));
        // Whose result to keep, if any: the id apalis sees (the producer's, or the message's).
        let keep_result = info.as_ref().and_then(|m| {
            let awaited = wants_result(m.headers.as_ref());
            (self.shared.config.results.store || awaited).then(|| {
                let id = task
                    .task_id()
                    .map_or_else(|| m.msg_id.to_string(), ToString::to_string);
                (id, awaited)
            })
        });
        let worker = task
            .data()
            .get::<apalis_core::worker::context::WorkerContext>()
            .map(|w| w.name().to_owned())
            .unwrap_or_default();
        let queue_name = self.shared.queue.as_str().to_owned();
        let kind = self.shared.config.metrics.kind_label().map(str::to_owned);
        let span = tracing::info_span!(
            "job",
            queue = %queue_name,
            msg_id = delivery.map(|d| d.0),
            attempt = delivery.map(|d| d.1),
            worker = %worker,
        );
        if let Some(m) = &info {
            let waited = (chrono::Utc::now() - m.visible_since)
                .num_microseconds()
                .unwrap_or(0);
            crate::obs::pickup_latency(&queue_name, kind.as_deref(), waited.max(0) as f64 / 1e6);
        }
        let started = std::time::Instant::now();
        let max_attempts = task
            .max_attempts()
            .unwrap_or(self.shared.config.retries.max_attempts as usize);
        // Shared with the task's clones: after the call it holds the runs reached, including
        // in-process (tower) retries.
        let attempt_counter = task.raw_attempt().clone();
        let inner = &mut self.inner;
        let call = std::panic::catch_unwind(AssertUnwindSafe(move || inner.call(task)));
        let shared = self.shared.clone();
        let lost = delivery.and_then(|(msg_id, read_ct)| shared.leases.watch(msg_id, read_ct));
        // If this future is dropped before the job ends (the worker was dropped, not shut down),
        // stop renewing the lease so the message becomes visible again when it lapses.
        let mut guard = delivery.map(|(msg_id, read_ct)| AbandonGuard {
            shared: shared.clone(),
            msg_id,
            read_ct,
            armed: true,
        });
        Box::pin(tracing::Instrument::instrument(
            async move {
                let run = async move {
                    match call {
                        Ok(fut) => match AssertUnwindSafe(fut).catch_unwind().await {
                            Ok(result) => result.map_err(Into::into),
                            Err(payload) => {
                                Err(Box::new(HandlerPanicked::from_payload(&*payload))
                                    as BoxDynError)
                            }
                        },
                        Err(payload) => {
                            Err(Box::new(HandlerPanicked::from_payload(&*payload)) as BoxDynError)
                        }
                    }
                };
                let result: Result<Res, BoxDynError> = match (&lost, delivery) {
                    (Some(flag), Some((msg_id, read_ct))) => {
                        tokio::select! {
                            // The flag first: a lease lost between `watch` and the first poll
                            // must stop the job before the handler is ever polled.
                            biased;
                            () = flag.lost() => {
                                // The lease is gone: stop the job (its future is dropped here) and
                                // write nothing; the message is delivered again.
                                tracing::error!(queue = %shared.queue, msg_id, attempt = read_ct,
                                    "lease lost while the job ran; the job was stopped");
                                crate::obs::leases_lost(shared.queue.as_str(), shared.config.metrics.kind_label(), 1);
                                if let Some(g) = guard.as_mut() {
                                    g.armed = false;
                                }
                                return Err(Box::new(LeaseLost { msg_id }) as BoxDynError);
                            }
                            r = run => r,
                        }
                    }
                    (None, Some((msg_id, read_ct))) => {
                        // The lease was declared lost before the job started (its renewal could
                        // not be proved in time, e.g. a claim whose connection took long to
                        // come): another worker may hold the message by now. Not run, nothing
                        // written; the message is delivered again.
                        drop(run);
                        tracing::error!(queue = %shared.queue, msg_id, attempt = read_ct,
                            "lease lost before the job started; the job was not run");
                        crate::obs::leases_lost(
                            shared.queue.as_str(),
                            shared.config.metrics.kind_label(),
                            1,
                        );
                        if let Some(g) = guard.as_mut() {
                            g.armed = false;
                        }
                        return Err(Box::new(LeaseLost { msg_id }) as BoxDynError);
                    }
                    _ => run.await,
                };
                if let Some(g) = guard.as_mut() {
                    g.armed = false;
                }
                match delivery {
                    Some((msg_id, read_ct)) => {
                        let runs = i32::try_from(attempt_counter.current())
                            .unwrap_or(i32::MAX)
                            .max(read_ct);
                        let action = decide(
                            &shared.config,
                            result.as_ref().err(),
                            runs,
                            max_attempts,
                            random_unit(),
                        );
                        crate::obs::job_duration(
                            &queue_name,
                            kind.as_deref(),
                            started.elapsed().as_secs_f64(),
                        );
                        log_outcome(&queue_name, kind.as_deref(), &action, result.as_ref().err());
                        let error = match (&action, result.as_ref().err()) {
                            (Action::Retry { .. }, Some(e)) => Some(error_text(&**e)),
                            _ => None,
                        };
                        let stored =
                            keep_result
                                .filter(|_| action.finishes())
                                .map(|(job_id, awaited)| {
                                    StoredResult::of(
                                        job_id,
                                        result.as_ref(),
                                        shared.config.pushes.max_payload_bytes,
                                        awaited,
                                    )
                                });
                        shared.complete(Outcome {
                            delivery: Delivery { msg_id, read_ct },
                            action,
                            attempts: runs,
                            error,
                            result: stored,
                        });
                    }
                    None => tracing::error!(
                        "a task without PGMQ message info reached the ack layer; its outcome is not recorded"
                    ),
                }
                result
            },
            span,
        ))
    }
}

/// Logs (in the job's span) and counts what became of a delivery.
fn log_outcome(queue: &str, kind: Option<&str>, action: &Action, error: Option<&BoxDynError>) {
    let Some(error) = error else {
        tracing::debug!("job done");
        crate::obs::done(queue, kind);
        return;
    };
    if error.is::<AbortError>() {
        tracing::info!(error = %error, "job killed");
        crate::obs::killed(queue, kind);
    }
    match action {
        Action::Retry { delay } => {
            tracing::debug!(error = %error, retry_in = ?delay, "job failed; retry scheduled");
            crate::obs::retried(queue, kind);
        }
        Action::DeadLetter { info } => {
            let reason = info
                .get("reason")
                .and_then(|r| r.as_str())
                .unwrap_or("failed");
            // Counted where the dead letter is written (the completer), with every other reason.
            tracing::warn!(error = %error, reason, "job moved to the dead-letter queue");
        }
        Action::Archive | Action::Delete if !error.is::<AbortError>() => {
            tracing::warn!(error = %error, "job failed with no attempts left; given up");
        }
        Action::Archive | Action::Delete => {}
    }
}

/// Drops the lease of a delivery whose future was dropped before it finished.
struct AbandonGuard {
    shared: Arc<AckContext>,
    msg_id: i64,
    read_ct: i32,
    armed: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.leases.remove(self.msg_id, self.read_ct);
        }
    }
}

/// The error's text with its sources, as stored in dead-letter records.
pub(crate) fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    clean_text(&text, MAX_ERROR_TEXT)
}

/// What a job that used up its attempts becomes.
fn exhausted_action(config: &Config, dead_letter: Action) -> Action {
    match config.outcomes.on_exhausted {
        ExhaustedAction::Archive => Action::Archive,
        ExhaustedAction::Delete => Action::Delete,
        _ => dead_letter,
    }
}

/// Maps the result of a delivery to an action. `runs` is how many times the job has run so far
/// (PGMQ's `read_ct`, or more when in-process retries ran it again); `unit` is a random number
/// in `[0, 1)` for jitter.
pub(crate) fn decide(
    config: &Config,
    error: Option<&BoxDynError>,
    runs: i32,
    max_attempts: usize,
    unit: f64,
) -> Action {
    let Some(error) = error else {
        return match config.outcomes.on_done {
            DoneAction::Delete => Action::Delete,
            _ => Action::Archive,
        };
    };
    let dead = |reason: &str| Action::DeadLetter {
        info: json!({ "reason": reason, "error": error_text(&**error) }),
    };
    if error.is::<AbortError>() {
        return match config.outcomes.on_killed {
            KilledAction::Archive => Action::Archive,
            KilledAction::DeadLetter => dead("killed"),
            _ => Action::Delete,
        };
    }
    // Every delivery is a run, whatever ended it: a retry-after or a deferral uses up an
    // attempt too, so no job runs more than `max_attempts` times.
    let attempt = usize::try_from(runs.max(1)).unwrap_or(1);
    let exhausted = attempt >= max_attempts;
    if let Some(retry) = error.downcast_ref::<RetryAfterError>() {
        if exhausted {
            return exhausted_action(config, dead("retry_after_exhausted"));
        }
        return Action::Retry {
            delay: retry.get_duration().min(MAX_DELAY),
        };
    }
    if error.is::<DeferredError>() {
        if exhausted {
            return exhausted_action(config, dead("deferred_exhausted"));
        }
        return Action::Retry {
            delay: config.retries.defer_delay,
        };
    }
    if exhausted {
        return exhausted_action(config, dead("failed"));
    }
    let attempt = u32::try_from(attempt).unwrap_or(u32::MAX);
    Action::Retry {
        delay: config.retries.backoff.delay(attempt, unit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backoff;
    use std::time::Duration;

    fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> BoxDynError {
        Box::new(e)
    }

    #[test]
    fn outcome_mapping() {
        let c = Config::default()
            .max_attempts(3)
            .backoff(Backoff::default().jitter(0.0));
        assert_eq!(decide(&c, None, 1, 3, 0.5), Action::Archive);
        assert_eq!(
            decide(&c.clone().on_done(DoneAction::Delete), None, 1, 3, 0.5),
            Action::Delete
        );
        let io = || boxed(std::io::Error::other("boom"));
        assert_eq!(
            decide(&c, Some(&io()), 1, 3, 0.5),
            Action::Retry {
                delay: Duration::from_secs(1)
            }
        );
        assert_eq!(
            decide(&c, Some(&io()), 2, 3, 0.5),
            Action::Retry {
                delay: Duration::from_secs(2)
            }
        );
        match decide(&c, Some(&io()), 3, 3, 0.5) {
            Action::DeadLetter { info } => {
                assert_eq!(info["reason"], "failed");
                assert_eq!(info["error"], "boom");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decide(
                &c.clone().on_exhausted(ExhaustedAction::Archive),
                Some(&io()),
                3,
                3,
                0.5
            ),
            Action::Archive
        );
        let abort = boxed(AbortError::new("stop"));
        assert_eq!(decide(&c, Some(&abort), 1, 3, 0.5), Action::Delete);
        assert!(matches!(
            decide(
                &c.clone().on_killed(KilledAction::DeadLetter),
                Some(&abort),
                1,
                3,
                0.5
            ),
            Action::DeadLetter { .. }
        ));
        let later = boxed(RetryAfterError::new("later", Duration::from_secs(42)));
        assert_eq!(
            decide(&c, Some(&later), 2, 3, 0.5),
            Action::Retry {
                delay: Duration::from_secs(42)
            }
        );
        match decide(&c, Some(&later), 3, 3, 0.5) {
            Action::DeadLetter { info } => assert_eq!(info["reason"], "retry_after_exhausted"),
            other => panic!("a retry-after uses up attempts too: {other:?}"),
        }
        let huge = boxed(RetryAfterError::new(
            "never",
            Duration::from_secs(10_000_000_000_000),
        ));
        assert_eq!(
            decide(&c, Some(&huge), 1, 3, 0.5),
            Action::Retry { delay: MAX_DELAY },
            "clamped to what PostgreSQL stores"
        );
        let deferred = boxed(DeferredError::new("now"));
        assert_eq!(
            decide(&c, Some(&deferred), 1, 3, 0.5),
            Action::Retry {
                delay: Duration::from_secs(1)
            },
            "a deferral waits the defer delay"
        );
        match decide(&c, Some(&deferred), 3, 3, 0.5) {
            Action::DeadLetter { info } => assert_eq!(info["reason"], "deferred_exhausted"),
            other => panic!("a deferral uses up attempts too: {other:?}"),
        }
        let nul = boxed(std::io::Error::other("bad\0text"));
        match decide(&c, Some(&nul), 3, 3, 0.5) {
            Action::DeadLetter { info } => {
                assert_eq!(info["error"], "bad\\u0000text", "NUL escaped for jsonb")
            }
            other => panic!("{other:?}"),
        }
        let panicked = boxed(HandlerPanicked {
            message: "oops".into(),
        });
        assert!(matches!(
            decide(&c, Some(&panicked), 1, 3, 0.5),
            Action::Retry { .. }
        ));
    }

    #[test]
    fn error_text_includes_sources_and_is_bounded() {
        let e = AbortError::new(std::io::Error::other("disk full"));
        let text = error_text(&e);
        assert!(text.contains("disk full"), "{text}");
        let long = std::io::Error::other("x".repeat(10_000));
        assert!(error_text(&long).len() < 4200);
    }

    /// The three orders in which the lease keeper and a job's start can meet, forced one by one
    /// with the keeper's own step (`declare_lost`) on a real [`LeaseTable`] and the real ack
    /// service. Nothing here touches a database: a job that is not run writes nothing, and the
    /// checks are that nothing was queued for the completer.
    mod lease_race {
        use super::*;
        use crate::lease::Lease;
        use apalis_core::task::builder::TaskBuilder;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::{sync::Notify, time::Instant};

        /// A handler that counts the times its future is first polled and the times it ends,
        /// and waits for `go` before it ends.
        #[derive(Clone, Default)]
        struct Handler {
            started: Arc<AtomicUsize>,
            ended: Arc<AtomicUsize>,
            go: Arc<Notify>,
            wait: bool,
        }

        impl Service<Task<String>> for Handler {
            type Response = String;
            type Error = BoxDynError;
            type Future = BoxFuture<'static, Result<String, BoxDynError>>;

            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, _: Task<String>) -> Self::Future {
                let h = self.clone();
                Box::pin(async move {
                    h.started.fetch_add(1, Ordering::SeqCst);
                    if h.wait {
                        h.go.notified().await;
                    }
                    h.ended.fetch_add(1, Ordering::SeqCst);
                    Ok("done".to_owned())
                })
            }
        }

        struct Setup {
            leases: Arc<LeaseTable>,
            service: AckService<Handler>,
            handler: Handler,
            /// What the ack layer queued for the completer.
            outcomes: tokio::sync::mpsc::UnboundedReceiver<Outcome>,
        }

        fn setup(wait: bool) -> Setup {
            let leases = Arc::new(LeaseTable::default());
            let queue = QueueName::new("lease_race").unwrap_or_else(|e| panic!("{e}"));
            let (completer, outcomes) = completer::CompleterHandle::channel();
            let ctx = Arc::new(AckContext {
                queue,
                config: Config::default(),
                leases: leases.clone(),
                completer: std::sync::OnceLock::from(completer),
            });
            let handler = Handler {
                wait,
                ..Handler::default()
            };
            let service = AckLayer::new(ctx).layer(handler.clone());
            Setup {
                leases,
                service,
                handler,
                outcomes,
            }
        }

        /// Message 7, read once, claimed: its lease in the table with a local deadline of
        /// `expires`.
        fn claim(leases: &LeaseTable, expires: Instant) {
            leases.insert_many([(
                7,
                Lease {
                    read_ct: 1,
                    expires,
                    lost: None,
                },
            )]);
        }

        fn delivery() -> Task<String> {
            let now = chrono::Utc::now();
            TaskBuilder::new("job".to_owned())
                .data(MessageInfo {
                    queue: QueueName::new("lease_race").unwrap_or_else(|e| panic!("{e}")),
                    msg_id: 7,
                    read_ct: 1,
                    enqueued_at: now,
                    vt: now,
                    visible_since: now,
                    headers: None,
                })
                .build()
        }

        async fn start(
            service: &mut AckService<Handler>,
        ) -> BoxFuture<'static, Result<String, BoxDynError>> {
            futures::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            service.call(delivery())
        }

        const MARGIN: Duration = Duration::from_millis(100);

        #[tokio::test]
        async fn a_lease_declared_lost_before_the_job_starts_stops_it_from_running() {
            let mut s = setup(false);
            // The claim's answer came after the lease's local deadline (a slow pool, a slow
            // network): the keeper runs first and drops the lease...
            claim(&s.leases, Instant::now());
            assert_eq!(s.leases.declare_lost(Instant::now(), MARGIN), 1);
            // ...then the worker hands the job to the ack layer.
            let result = start(&mut s.service).await.await;
            let err = result
                .err()
                .unwrap_or_else(|| panic!("the job ran without its lease"));
            assert!(err.is::<LeaseLost>(), "{err}");
            assert_eq!(
                s.handler.started.load(Ordering::SeqCst),
                0,
                "the handler's future was never polled"
            );
            assert_no_outcome(&mut s).await;
        }

        /// Nothing reached the completer (a flush answered after anything queued before it).
        async fn assert_no_outcome(s: &mut Setup) {
            s.service.shared.flush().await;
            assert!(s.outcomes.try_recv().is_err(), "no outcome was queued");
            assert_eq!(s.leases.unwritten(), 0);
        }

        #[tokio::test]
        async fn a_lease_declared_lost_after_the_call_but_before_the_first_poll_stops_the_job() {
            let mut s = setup(false);
            claim(&s.leases, Instant::now() + Duration::from_secs(60));
            // The worker hands the job over while the lease is held...
            let job = start(&mut s.service).await;
            // ...and the keeper drops it before the job's future is first polled.
            assert_eq!(
                s.leases
                    .declare_lost(Instant::now() + Duration::from_secs(61), MARGIN),
                1
            );
            let err = job
                .await
                .err()
                .unwrap_or_else(|| panic!("the job ran without its lease"));
            assert!(err.is::<LeaseLost>(), "{err}");
            assert_eq!(s.handler.started.load(Ordering::SeqCst), 0, "never polled");
            assert_no_outcome(&mut s).await;
        }

        #[tokio::test]
        async fn a_lease_declared_lost_while_the_job_runs_stops_it() {
            let mut s = setup(true);
            claim(&s.leases, Instant::now() + Duration::from_secs(60));
            let mut job = start(&mut s.service).await;
            // Run the job until its handler waits.
            assert!(futures::poll!(job.as_mut()).is_pending());
            assert_eq!(s.handler.started.load(Ordering::SeqCst), 1);
            // The keeper finds the deadline passed (as if renewals had failed for a minute).
            assert_eq!(
                s.leases
                    .declare_lost(Instant::now() + Duration::from_secs(61), MARGIN),
                1
            );
            let err = job
                .await
                .err()
                .unwrap_or_else(|| panic!("the job ended without its lease"));
            assert!(err.is::<LeaseLost>(), "{err}");
            assert_eq!(
                s.handler.ended.load(Ordering::SeqCst),
                0,
                "stopped before it ended"
            );
            assert_eq!(s.leases.unwritten(), 0, "no outcome was queued");
        }

        #[tokio::test]
        async fn a_held_lease_lets_the_job_run() {
            let mut s = setup(false);
            claim(&s.leases, Instant::now() + Duration::from_secs(60));
            let out = start(&mut s.service).await.await;
            assert_eq!(out.ok().as_deref(), Some("done"));
            assert_eq!(s.handler.ended.load(Ordering::SeqCst), 1);
            // Its outcome went to the completer: archive this delivery. The lease stays until
            // the outcome is written.
            s.service.shared.flush().await;
            let outcome = s
                .outcomes
                .try_recv()
                .unwrap_or_else(|e| panic!("no outcome: {e}"));
            assert_eq!(
                outcome.delivery,
                Delivery {
                    msg_id: 7,
                    read_ct: 1
                }
            );
            assert_eq!(outcome.action, Action::Archive);
            assert!(s.outcomes.try_recv().is_err(), "one outcome");
            assert_eq!(s.leases.get(7).map(|l| l.read_ct), Some(1));
        }
    }
}
