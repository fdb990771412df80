//! The producer side of a worker: claims messages, holds them until the worker starts them,
//! and decides when to look again.
//!
//! It is written as one async loop per worker ([`Loop::run`]), which the worker's stream polls
//! (`Backend::poll_ready`, `poll_next`, `poll_close`): nothing is spawned. The loop asks the
//! pure [`Plan`] what to do next (read, wait for outcomes, arm, check, probe, sleep; see
//! `src/notify/wakeup.rs` for the invariant and why it holds) and runs it. Infrastructure
//! errors never reach the worker (that would stop it): they are logged and retried with
//! backoff, so a worker survives a database restart. A missing right is the exception: the
//! worker fails at start with an error naming it, rather than run jobs whose outcomes it
//! cannot write.
//!
//! The loop and the worker share [`Io`]: the messages held for the worker, what the worker
//! reports (jobs running, the capacity learned), and requests (release what a full worker
//! cannot start, close). The loop starts a new claim only once the worker has taken every
//! held message, and while claims come back full it may send the next before the held ones
//! run out (see `claims.rs`).
//!
//! Capacity: a worker should never claim messages it cannot start. The fetcher cannot see the
//! worker's concurrency limit, but it can see its effect: if `poll_ready` returned `Ready` and
//! the worker did not ask for a task before calling `poll_ready` again, the service in between
//! (the concurrency limit) said it was full. The number of tasks in flight at that moment is the
//! capacity. Held messages beyond it are released at once (`vt = now`, `read_ct` given back), and
//! later claims are limited to capacity minus tasks in flight. Until the first saturation is
//! seen, a claim is at most `fetch_batch_size`, and every claimed message is started at once.
//!
//! Shutdown: when the worker closes (or its runtime shuts down, which ends the stream), the
//! loop stops claiming, sees its claims in flight through and releases every message it holds;
//! then the close step waits until the worker's outcomes are written, removes the runtime's
//! wake-up row if it was the queue's last worker, and deletes the worker's registry row.
//!
//! Deadlines: every step that waits on the database (a claim, arming, the settle check, the
//! probe, a release) runs its statements on connections of its own within the storage's
//! statement deadline (`Config::statement_deadline`, the visibility timeout), and is abandoned
//! as soon as the loop must stop; a connection whose statement did not end is closed, never
//! handed back to the pool (`src/deadline.rs`). A step that passes its deadline fails like a
//! lost connection: the loop backs off (at most the fallback poll interval) and tries again,
//! so after the network heals a worker reads within a poll interval plus one deadline.

use crate::error::Describe;
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use apalis_core::worker::context::WorkerContext;
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use tokio::{
    sync::{Notify, oneshot, watch},
    time::{Instant, sleep_until},
};

use super::{
    Shared,
    claims::Claims,
    floor::{ClaimFloor, Sweep, Took},
    lost::LostClaims,
};
use crate::{
    deadline::Conn,
    error::{Error, Result},
    lease::Lease,
    notify::{
        Wake, WakeSignal,
        wakeup::{self, Arming, Plan, Step},
    },
    queue::{Delivery, Message},
    runtime::{
        Phase, WorkerGuard,
        maintenance::{Chore, Registration, Retention, WorkerStats},
    },
    util::error_backoff,
};

/// The longest a worker's shutdown waits for the database (releasing held messages, writing
/// pending outcomes).
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Preparing a queue for a worker is bounded by this many statement deadlines.
const PREPARE_DEADLINES: u32 = 4;

/// The longest a closing worker spends removing its rows (they expire by themselves).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Learns how many tasks the worker can run at once from when it stops asking for more.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capacity {
    /// Learned limit on tasks in flight; `None` until the worker is first seen full.
    limit: Option<usize>,
    /// Tasks in flight when `poll_ready` last returned `Ready`, if no `poll_next` followed.
    armed: Option<usize>,
    /// Most tasks ever seen running when the worker asked for another: it can run at least
    /// one more than that, whatever a later, briefer stall suggests.
    proven: usize,
}

impl Capacity {
    /// `poll_ready` is about to return `Ready` with `in_flight` tasks running. Returns `true` if
    /// the previous `Ready` was not followed by `poll_next`, i.e. the worker was full.
    pub(crate) fn observe_ready(&mut self, in_flight: usize) -> bool {
        let saturated = if let Some(full_at) = self.armed.take() {
            self.limit = Some(full_at.max(self.proven).max(1));
            true
        } else {
            false
        };
        self.armed = Some(in_flight);
        saturated
    }

    /// `poll_next` was called with `in_flight` tasks running: there is room for one more.
    pub(crate) fn observe_next(&mut self, in_flight: usize) {
        self.armed = None;
        self.proven = self.proven.max(in_flight + 1);
        if let Some(limit) = self.limit
            && in_flight >= limit
        {
            self.limit = Some(in_flight + 1);
        }
    }

    /// The learned limit on tasks in flight.
    pub(crate) fn limit(&self) -> Option<usize> {
        self.limit
    }
}

/// What the worker and its loop share.
pub(crate) struct Io {
    state: Mutex<IoState>,
    /// Raised when the worker takes a message, is found full, or closes: the loop looks again.
    changed: Notify,
    /// Raised (to every waiter) when the worker closes: a step waiting on the database is
    /// abandoned. Apart from `changed` so that waiting for it takes no wake-up from the loop.
    closing: Notify,
}

struct IoState {
    /// Claimed messages the worker has not started yet, in `msg_id` order.
    held: VecDeque<Message>,
    /// Taken from `held` because the worker was full: the loop releases them.
    to_release: Vec<Delivery>,
    /// Tasks running, as the worker last said.
    in_flight: usize,
    capacity: Capacity,
    claims: Claims,
    /// The worker closes: the loop stops claiming.
    close: bool,
    /// When the worker's shutdown must be over (releasing, writing outcomes): set when the loop
    /// first sees it must stop; one bound for the whole shutdown.
    close_by: Option<Instant>,
    /// Where the worker's registry row gets its figures, once registered.
    stats: Option<Arc<WorkerStats>>,
}

fn lock(m: &Mutex<IoState>) -> MutexGuard<'_, IoState> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Io {
    fn lock(&self) -> MutexGuard<'_, IoState> {
        lock(&self.state)
    }

    /// The bound of the worker's shutdown, fixed the first time it is asked for.
    fn close_by(&self) -> Instant {
        *self
            .lock()
            .close_by
            .get_or_insert_with(|| Instant::now() + CLOSE_TIMEOUT)
    }

    /// Tells the registry how many jobs run and the concurrency learned so far.
    fn report(s: &IoState) {
        if let Some(stats) = &s.stats {
            stats.in_flight.store(s.in_flight, Ordering::Relaxed);
            stats
                .concurrency
                .store(s.capacity.limit().unwrap_or(0), Ordering::Relaxed);
        }
    }
}

/// What the loop left for the close step.
struct Session {
    registration: Option<Registration>,
    /// Counts the worker among its queue's workers in the runtime.
    counted: Counted,
    /// Counts the worker in its runtime until the close step ends.
    _guard: WorkerGuard,
}

/// Counts a worker among the workers of its queue in the runtime (the last one removes the
/// runtime's wake-up row when it closes); uncounted when dropped.
struct Counted(Option<Arc<WakeSignal>>);

impl Counted {
    fn new(signal: Arc<WakeSignal>) -> Self {
        signal.worker_started();
        Self(Some(signal))
    }

    /// Uncounts the worker: whether it was the queue's last in the runtime.
    fn stop(mut self) -> bool {
        self.0.take().is_some_and(|s| s.worker_stopped())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.worker_stopped();
        }
    }
}

enum State {
    /// Not polled yet.
    Idle,
    Running(BoxFuture<'static, (Option<Session>, Option<Error>)>),
    /// The loop ended: the stream is over (a fatal error is reported once first).
    Ended(Option<Session>, Option<Error>),
    Closing(BoxFuture<'static, ()>),
    Closed,
}

/// Per-worker fetch state. Each clone of a storage has its own.
pub(crate) struct Fetcher {
    state: State,
    io: Option<Arc<Io>>,
    /// The worker, to stop it when its runtime shuts down (a stream that ends does not stop an
    /// apalis worker by itself).
    worker: Option<WorkerContext>,
    /// For releasing what is held if the worker is dropped without closing.
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.io.as_ref().map_or(0, |io| io.lock().held.len());
        f.debug_struct("Fetcher")
            .field("held", &held)
            .finish_non_exhaustive()
    }
}

impl Default for Fetcher {
    fn default() -> Self {
        Self {
            state: State::Idle,
            io: None,
            worker: None,
            shared: None,
        }
    }
}

impl Fetcher {
    /// Starts the loop on the first poll.
    fn start(&mut self, shared: &Arc<Shared>, worker: &WorkerContext) -> Arc<Io> {
        if let Some(io) = &self.io {
            return io.clone();
        }
        let config = &shared.config;
        let io = Arc::new(Io {
            state: Mutex::new(IoState {
                held: VecDeque::new(),
                to_release: Vec::new(),
                in_flight: 0,
                capacity: Capacity::default(),
                claims: Claims::new(config, shared.pool.options().get_max_connections()),
                close: false,
                close_by: None,
                stats: None,
            }),
            changed: Notify::new(),
            closing: Notify::new(),
        });
        let run = Loop {
            plan: Plan::new(
                config.wakeups.poll_interval,
                config.wakeups.poll_jitter,
                config.linger_polls(),
                Box::new(crate::util::random_unit),
            ),
            shared: shared.clone(),
            io: io.clone(),
            reads: FuturesUnordered::new(),
            pending: 0,
            conns: Vec::new(),
            failures: 0,
            phase: shared.runtime.inner.phase(),
        }
        .run(worker.name().to_owned(), worker.get_service().to_owned());
        self.state = State::Running(Box::pin(run));
        self.io = Some(io.clone());
        self.worker = Some(worker.clone());
        self.shared = Some(shared.clone());
        io
    }

    /// Polls the loop once, if it runs. A loop that ends without being asked to close (its
    /// runtime shuts down) stops the worker: apalis then lets running jobs finish and closes.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let State::Running(run) = &mut self.state
            && let Poll::Ready((session, error)) = run.poll_unpin(cx)
        {
            let closing = self.io.as_ref().is_some_and(|io| io.lock().close);
            if !closing
                && error.is_none()
                && let Some(w) = &self.worker
            {
                let _ = w.stop();
            }
            self.state = State::Ended(session, error);
        }
    }

    pub(crate) fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        shared: &Arc<Shared>,
        worker: &WorkerContext,
    ) -> Poll<Result<()>> {
        shared.start_background()?;
        let io = self.start(shared, worker);
        let in_flight = worker.task_count();
        {
            let mut s = io.lock();
            s.in_flight = in_flight;
            Io::report(&s);
        }
        // Take in the claims that came back even while the worker is full (apalis polls for a
        // task only when it has room): their messages are leased from the moment the claim ran,
        // and the keeper renews only what it knows of.
        self.drive(cx);
        let (excess, over) = {
            let mut s = io.lock();
            let saturated = s.capacity.observe_ready(in_flight);
            let keep = s.claims.allowance(s.capacity.limit());
            let mut excess = 0;
            if saturated && s.held.len() > keep {
                s.claims.on_saturated();
                let gone = s.held.split_off(keep);
                excess = gone.len();
                let released: Vec<Delivery> = gone
                    .iter()
                    .filter(|m| shared.leases.remove(m.msg_id, m.read_ct))
                    .map(Delivery::of)
                    .collect();
                s.to_release.extend(released);
            }
            (excess, s.held.len() > keep)
        };
        if excess > 0 {
            tracing::debug!(queue = %shared.queue.name(), in_flight, released = excess,
                "worker is full; releasing claimed messages it cannot start soon");
            io.changed.notify_one();
            self.drive(cx);
        }
        if over {
            // If the worker turns out to be full, the next poll_ready must come soon so the held
            // messages beyond the allowance are released; wake once to make sure it does.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        shared: &Arc<Shared>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Message>>> {
        let io = self.start(shared, worker);
        let in_flight = worker.task_count();
        {
            let mut s = io.lock();
            s.in_flight = in_flight;
            s.capacity.observe_next(in_flight);
            Io::report(&s);
        }
        self.drive(cx);
        let next = {
            let mut s = io.lock();
            let mut next = None;
            while let Some(m) = s.held.pop_front() {
                // Skip anything whose lease we no longer hold (lost while held).
                if shared
                    .leases
                    .get(m.msg_id)
                    .is_some_and(|l| l.read_ct == m.read_ct)
                {
                    s.claims.on_started();
                    next = Some(m);
                    break;
                }
            }
            next
        };
        if let Some(m) = next {
            io.changed.notify_one();
            return Poll::Ready(Some(Ok(m)));
        }
        match &mut self.state {
            State::Idle | State::Running(_) => Poll::Pending,
            State::Ended(_, error) => Poll::Ready(error.take().map(Err)),
            State::Closing(_) | State::Closed => Poll::Ready(None),
        }
    }

    /// Stop: the loop sees its claims through and releases what it holds; then outcomes are
    /// flushed, the arming removed if this was the queue's last worker, and the row deleted.
    pub(crate) fn poll_close(&mut self, cx: &mut Context<'_>, shared: &Arc<Shared>) -> Poll<()> {
        loop {
            match &mut self.state {
                State::Idle | State::Closed => {
                    self.state = State::Closed;
                    return Poll::Ready(());
                }
                State::Running(run) => {
                    if let Some(io) = &self.io {
                        io.lock().close = true;
                        io.changed.notify_one();
                        io.closing.notify_waiters();
                    }
                    match run.poll_unpin(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready((session, _)) => self.state = State::Ended(session, None),
                    }
                }
                State::Ended(session, _) => {
                    let session = session.take();
                    let shared = shared.clone();
                    let by = self
                        .io
                        .as_ref()
                        .map_or_else(|| Instant::now() + CLOSE_TIMEOUT, |io| io.close_by());
                    self.state = State::Closing(Box::pin(close(shared, session, by)));
                }
                State::Closing(fut) => {
                    if fut.poll_unpin(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.state = State::Closed;
                }
            }
        }
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        // A worker dropped without closing: stop renewing what it held and hand it back (the
        // runtime's maintenance service writes the release).
        let (Some(shared), Some(io)) = (self.shared.take(), self.io.take()) else {
            return;
        };
        let mut held: Vec<Delivery> = {
            let mut s = io.lock();
            let held = std::mem::take(&mut s.held);
            let mut out = std::mem::take(&mut s.to_release);
            out.extend(
                held.iter()
                    .filter(|m| shared.leases.remove(m.msg_id, m.read_ct))
                    .map(Delivery::of),
            );
            out
        };
        held.sort_unstable();
        if !held.is_empty() {
            shared.runtime.inner.chore(Chore::Release {
                queue: shared.queue.clone(),
                held,
                signal: shared.signal.clone(),
                wake: shared.wake_target(),
            });
        }
    }
}

/// Deliveries taken from `to_release` for a release that has not ended: put back if it is
/// abandoned.
struct PutBack<'a> {
    io: &'a Io,
    held: Option<Vec<Delivery>>,
}

impl Drop for PutBack<'_> {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            self.io.lock().to_release.extend(held);
        }
    }
}

/// A claim that came back.
struct ReadDone {
    requested: usize,
    /// Tasks running when it was sent.
    in_flight_at_send: usize,
    latency: Duration,
    result: Result<Vec<Message>>,
    /// The connection it ran on, unless it failed.
    conn: Option<Conn>,
}

/// A worker's loop: the state it keeps between steps.
struct Loop {
    shared: Arc<Shared>,
    io: Arc<Io>,
    plan: Plan,
    /// Claims in flight, each on its own connection.
    reads: FuturesUnordered<BoxFuture<'static, ReadDone>>,
    /// Messages asked for by the claims in flight.
    pending: usize,
    /// The connections the last claims ran on, kept while claims follow each other (each pool
    /// checkout may cost a round trip: sqlx pings a connection before handing it out).
    conns: Vec<Conn>,
    /// Consecutive infrastructure errors, for backoff.
    failures: u32,
    phase: watch::Receiver<Phase>,
}

/// Resolves when the worker pokes the loop (it took a message, was found full, or closes) or
/// the runtime's phase changes: the loop then looks again.
async fn poked(io: &Io, phase: &mut watch::Receiver<Phase>) {
    tokio::select! {
        () = io.changed.notified() => {}
        _ = phase.changed() => {}
    }
}

/// Resolves once the loop must stop (the worker closes, or the runtime shuts down or is gone):
/// a step waiting on the database is then abandoned, its connection closed (see
/// `src/deadline.rs`).
async fn stop_requested(io: &Io, phase: &mut watch::Receiver<Phase>) {
    loop {
        let notified = io.closing.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if io.lock().close || *phase.borrow() != Phase::Running {
            return;
        }
        tokio::select! {
            () = notified => {}
            changed = phase.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

impl Loop {
    /// Whether the loop must stop claiming: the worker closes, or the runtime shuts down.
    fn stopping(&self) -> bool {
        self.io.lock().close || *self.phase.borrow() != Phase::Running
    }

    async fn run(mut self, worker: String, service: String) -> (Option<Session>, Option<Error>) {
        let guard = match self.shared.runtime.inner.worker_started() {
            Ok(g) => g,
            Err(e) => return (None, Some(e)),
        };
        let (mut wake, listening) = self.shared.subscribe();
        let counted = Counted::new(self.shared.signal.clone());
        let registration = match self.prepare(listening, &worker, &service).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return (
                    Some(Session {
                        registration: None,
                        counted,
                        _guard: guard,
                    }),
                    None,
                );
            }
            Err(e) => {
                tracing::error!(queue = %self.shared.queue.name(), error = %e.describe(),
                    "worker cannot run on this queue; stopping it");
                return (None, Some(e));
            }
        };
        self.io.lock().stats = Some(registration.stats.clone());
        self.plan.on_recovered();
        // Every step that waits on the database is bounded by its statements' deadline and
        // abandoned as soon as the loop must stop, whatever the network does.
        let io = self.io.clone();
        let mut stop_phase = self.phase.clone();
        while !self.stopping() {
            tokio::select! {
                () = self.release_requested() => {}
                () = stop_requested(&io, &mut stop_phase) => continue,
            }
            // A new claim only once the worker took everything held.
            if !self.io.lock().held.is_empty() {
                let _ = poked(&self.io, &mut self.phase).await;
                continue;
            }
            match wake.take() {
                Wake::Now => self.plan.on_wake_now(),
                Wake::At(at) => self.plan.on_wake_at(at),
                Wake::Nothing => {}
            }
            let step = self.next_step();
            let now = Instant::now();
            match step {
                Step::Read => {
                    // Abandoned on stop: the claims in flight stay in `reads`, and `finish`
                    // sees them through (within their deadline and the shutdown's bound).
                    let read = tokio::select! {
                        read = self.read_cycle() => Some(read),
                        () = stop_requested(&io, &mut stop_phase) => None,
                    };
                    match read {
                        Some(Ok(found)) => {
                            self.failures = 0;
                            self.plan.on_read(now, found);
                        }
                        Some(Err(e)) => self.backoff("reading the queue", &e).await,
                        None => {}
                    }
                }
                Step::AwaitOutcomes => {
                    // Until half the bound is written (a full flush would idle the worker for
                    // no gain).
                    let below = self.io.lock().claims.backlog_cap() / 2;
                    let leases = self.shared.leases.clone();
                    tokio::select! {
                        () = leases.wait_unwritten_below(below) => {}
                        () = poked(&self.io, &mut self.phase) => {}
                    }
                }
                Step::Arm => {
                    let armed = tokio::select! {
                        armed = arm(&self.shared) => armed,
                        () = stop_requested(&io, &mut stop_phase) => continue,
                    };
                    if let Err(e) = &armed {
                        tracing::warn!(queue = %self.shared.queue.name(), error = %e.describe(),
                            "could not arm the wake-up; relying on polling until the next try");
                    }
                    self.plan.on_armed(Instant::now(), armed.is_ok());
                }
                Step::CheckSettled => {
                    let settled = tokio::select! {
                        settled = inserts_settled(&self.shared) => settled,
                        () = stop_requested(&io, &mut stop_phase) => continue,
                    };
                    match settled {
                        Ok(settled) => self.plan.on_settled(Instant::now(), settled),
                        Err(e) => {
                            let queue = self.shared.queue.name().as_str();
                            tracing::warn!(%queue, error = %e.describe(),
                                "could not check for in-flight inserts; relying on polling");
                            self.plan.on_settle_failed();
                        }
                    }
                }
                Step::Probe => {
                    let probed = tokio::select! {
                        probed = next_visible_in(&self.shared) => probed,
                        () = stop_requested(&io, &mut stop_phase) => continue,
                    };
                    match probed {
                        Ok(next) => self.plan.on_probed(Instant::now(), next),
                        Err(e) => self.backoff("reading the queue", &e).await,
                    }
                }
                Step::Sleep(until) => {
                    // Not claiming back to back: give the connections back to the pool.
                    self.conns.clear();
                    tokio::select! {
                        () = sleep_until(until) => {}
                        woken = wake.next() => match woken {
                            Wake::Now => self.plan.on_wake_now(),
                            Wake::At(at) => self.plan.on_wake_at(at),
                            Wake::Nothing => {}
                        },
                        () = poked(&self.io, &mut self.phase) => {}
                    }
                }
            }
        }
        self.finish().await;
        (
            Some(Session {
                registration: Some(registration),
                counted,
                _guard: guard,
            }),
            None,
        )
    }

    /// Asks the plan what to do next.
    fn next_step(&mut self) -> Step {
        let margin = self
            .shared
            .config
            .wakeups
            .poll_interval
            .mul_f64(wakeup::REARM_WHEN_LEFT_POLLS);
        let wants_arm = self.shared.announces() && self.shared.signal.wants_arming(margin);
        let held_back = self.shared.leases.unwritten() > self.io.lock().claims.backlog_cap();
        let step = self.plan.next(Instant::now(), wants_arm, held_back);
        if !matches!(step, Step::Read) {
            // Not claiming back to back: give the connections back to the pool.
            self.conns.clear();
        }
        step
    }

    /// Prepares the queue (retrying infrastructure errors with backoff) and registers the
    /// worker. `Ok(None)`: asked to stop first.
    async fn prepare(
        &mut self,
        mut listening: Option<oneshot::Receiver<()>>,
        worker: &str,
        service: &str,
    ) -> Result<Option<Registration>> {
        loop {
            if self.stopping() {
                return Ok(None);
            }
            // Bounded, and abandoned when asked to stop: preparing runs a few statements (and
            // may create a queue and its indexes), so it gets a few statement deadlines. (The
            // registration's own statement has the maintenance deadline.)
            let by = Instant::now() + self.shared.config.statement_deadline() * PREPARE_DEADLINES;
            let io = self.io.clone();
            let mut phase = self.phase.clone();
            let prepared = tokio::select! {
                prepared = ensure_queue(&self.shared, listening.take(), worker, service, by) => prepared,
                () = stop_requested(&io, &mut phase) => return Ok(None),
            };
            match prepared {
                Ok(r) => return Ok(Some(r)),
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    let e = if matches!(e, Error::Database(sqlx::Error::PoolTimedOut)) {
                        crate::util::explain_pool_error(&self.shared.pool, e).await
                    } else {
                        e
                    };
                    self.backoff("preparing the queue", &e).await;
                }
            }
        }
    }

    /// Logs an infrastructure error (the first, then at powers of two) and backs off, unless
    /// asked to stop meanwhile.
    async fn backoff(&mut self, what: &str, e: &Error) {
        self.failures += 1;
        // Never longer than the fallback poll: once the database answers again, the worker
        // reads within a poll interval (plus the deadline of the step in flight).
        let wait = error_backoff(self.failures).min(self.shared.config.wakeups.poll_interval);
        if self.failures == 1 || self.failures.is_power_of_two() {
            tracing::error!(queue = %self.shared.queue.name(), error = %e.describe(), failures = self.failures,
                retry_in = ?wait, "worker backend: {what} failed");
        }
        self.conns.clear();
        let until = Instant::now() + wait;
        while Instant::now() < until && !self.stopping() {
            tokio::select! {
                () = sleep_until(until) => {}
                () = poked(&self.io, &mut self.phase) => {}
            }
        }
        self.plan.on_recovered();
    }

    /// Releases what a full worker handed back.
    async fn release_requested(&mut self) {
        let held = std::mem::take(&mut self.io.lock().to_release);
        if held.is_empty() {
            return;
        }
        // Abandoned (the loop stops while the release waits on the database), they go back
        // to the list, which `finish` releases.
        let mut back = PutBack {
            io: &self.io,
            held: Some(held.clone()),
        };
        release_held(&self.shared, held).await;
        back.held = None;
    }

    /// Sends a claim of `qty` on a kept connection (or one from the pool).
    fn send(&mut self, qty: usize) {
        let (by_priority, in_flight) = {
            let mut s = self.io.lock();
            (s.claims.next_by_priority(), s.in_flight)
        };
        self.pending += qty;
        let conn = self.conns.pop();
        let shared = self.shared.clone();
        self.reads.push(Box::pin(async move {
            let started = Instant::now();
            let (result, conn) = fetch(&shared, conn, qty, by_priority).await;
            ReadDone {
                requested: qty,
                in_flight_at_send: in_flight,
                latency: started.elapsed(),
                result,
                conn,
            }
        }));
    }

    /// Takes in a claim that came back: its messages are held, its connection kept for the
    /// next claim. Returns how many it got, or its error.
    fn take_in(&mut self, done: ReadDone) -> Result<usize> {
        self.pending = self.pending.saturating_sub(done.requested);
        let messages = done.result?;
        if let Some(conn) = done.conn {
            self.conns.push(conn);
        }
        let got = messages.len();
        let mut s = self.io.lock();
        let waited = s.held.is_empty()
            && s.capacity
                .limit()
                .is_none_or(|l| done.in_flight_at_send < l);
        s.claims
            .on_read(Instant::now(), done.requested, got, done.latency, waited);
        s.held.extend(messages);
        Ok(got)
    }

    /// One read cycle: a first claim, and more while they come back full and there is room
    /// (see `claims.rs`), until every claim of the cycle is back. Whether any found messages.
    async fn read_cycle(&mut self) -> Result<bool> {
        let qty = {
            let s = self.io.lock();
            s.claims.first(s.capacity.limit(), s.in_flight)
        };
        self.send(qty);
        let mut found = false;
        let mut error = None;
        while !self.reads.is_empty() {
            tokio::select! {
                done = self.reads.next() => {
                    let Some(done) = done else { break };
                    match self.take_in(done) {
                        Ok(got) => found |= got > 0,
                        Err(e) => {
                            tracing::debug!(queue = %self.shared.queue.name(), "a claim failed");
                            error.get_or_insert(e);
                        }
                    }
                }
                () = poked(&self.io, &mut self.phase) => {}
            }
            self.release_requested().await;
            if error.is_some() || self.stopping() {
                continue;
            }
            // Outcomes lag: no claim beyond the one the plan asked for.
            if self.shared.leases.unwritten() > self.io.lock().claims.backlog_cap() {
                continue;
            }
            let another = {
                let s = self.io.lock();
                s.claims.another(
                    s.capacity.limit(),
                    s.in_flight,
                    s.held.len(),
                    self.pending,
                    self.reads.len(),
                )
            };
            if let Some(qty) = another {
                self.send(qty);
            }
        }
        if let Some(e) = error {
            self.conns.clear();
            self.io.lock().claims.on_idle();
            return Err(e);
        }
        if !found {
            self.io.lock().claims.on_idle();
        }
        Ok(found)
    }

    /// The loop stops: claims in flight are seen through (they may already have claimed rows)
    /// and everything held is released, within the shutdown's bound ([`CLOSE_TIMEOUT`] for the
    /// whole shutdown).
    async fn finish(&mut self) {
        let by = self.io.close_by();
        let work = async {
            let mut held = Vec::new();
            while let Some(done) = self.reads.next().await {
                if let Ok(messages) = done.result {
                    held.extend(
                        messages
                            .iter()
                            .filter(|m| self.shared.leases.remove(m.msg_id, m.read_ct))
                            .map(Delivery::of),
                    );
                }
            }
            {
                let mut s = self.io.lock();
                let kept = std::mem::take(&mut s.held);
                held.append(&mut s.to_release);
                held.extend(
                    kept.iter()
                        .filter(|m| self.shared.leases.remove(m.msg_id, m.read_ct))
                        .map(Delivery::of),
                );
            }
            held.sort_unstable();
            self.conns.clear();
            release_held(&self.shared, held).await;
        };
        if tokio::time::timeout_at(by, work).await.is_err() {
            tracing::error!(queue = %self.shared.queue.name(), timeout = ?CLOSE_TIMEOUT,
                "shutdown could not release held messages in time; they will be delivered again when their leases lapse");
        }
    }
}

/// The close step, after the loop: outcomes flushed, the runtime's arming removed if this was
/// the queue's last worker, the worker's row deleted; by `by` (the shutdown's bound).
async fn close(shared: Arc<Shared>, session: Option<Session>, by: Instant) {
    let queue = shared.queue.name().clone();
    if tokio::time::timeout_at(by, shared.flush_completions())
        .await
        .is_err()
    {
        tracing::error!(%queue, timeout = ?CLOSE_TIMEOUT,
            "shutdown could not write outcomes in time; their jobs will be delivered again when their leases lapse");
    }
    let Some(session) = session else { return };
    // Best effort (the rows expire by themselves): briefly, whatever the database does.
    let cleanup = async {
        if session.counted.stop() {
            remove_arming(&shared).await;
        }
        if let Some(r) = session.registration {
            r.unregister().await;
        }
    };
    let by = by.min(Instant::now() + CLEANUP_TIMEOUT);
    if tokio::time::timeout_at(by, cleanup).await.is_err() {
        tracing::debug!(%queue, "could not remove the worker's rows in time; they expire by themselves");
    }
}

/// Makes `held` visible again now (see [`super::release`]).
async fn release_held(shared: &Shared, held: Vec<Delivery>) {
    crate::lease::release(
        &shared.pool,
        &shared.queue,
        &held,
        &shared.signal,
        shared.wake_target().as_ref(),
        shared.config.statement_deadline(),
    )
    .await;
}

/// Whether inserts into the queue have settled (see `wakeup.rs`), by the statement deadline.
async fn inserts_settled(shared: &Shared) -> Result<bool> {
    let by = Instant::now() + shared.config.statement_deadline();
    let mut conn = Conn::acquire(&shared.pool, by).await?;
    let queue = shared.queue.name().as_str();
    conn.run(by, "checking for in-flight inserts", |c| {
        wakeup::inserts_settled(c, queue)
    })
    .await
}

/// The claim floor of `shared`, its lock never poisoned for good (its state is a bound that
/// is safe to forget).
fn floor(shared: &Shared) -> MutexGuard<'_, ClaimFloor> {
    shared.floor.lock().unwrap_or_else(|poisoned| {
        let mut f = poisoned.into_inner();
        f.reset();
        f
    })
}

/// The lost claims of `shared`, their lock never poisoned for good (forgetting them only
/// leaves their messages to their visibility timeout).
fn lost(shared: &Shared) -> MutexGuard<'_, LostClaims> {
    shared.lost.lock().unwrap_or_else(|poisoned| {
        let mut l = poisoned.into_inner();
        *l = LostClaims::default();
        l
    })
}

/// Whether a claim that failed with `e` may have committed without its answer reaching the
/// worker: the connection broke, or its deadline passed, after the statement was sent. (An
/// error the server sent rolled the claim back.)
fn answer_maybe_lost(e: &Error) -> bool {
    match e {
        Error::Unreachable { .. } => true,
        Error::Database(e) => e.as_database_error().is_none(),
        _ => false,
    }
}

/// Gives back the messages of the claims whose answer was lost (`lost.rs`), on `conn`, before
/// the next claim. An error that says the database is out of reach is returned (the tokens
/// stay due); for any other the tokens are given up (their messages wait out their
/// visibility timeout, as without the log) so a claim never waits on them.
async fn recover_lost(shared: &Arc<Shared>, conn: &mut Conn, by: Instant) -> Result<()> {
    let due = lost(shared).due(Instant::now());
    if due.is_empty() {
        return Ok(());
    }
    let looked = conn
        .run(by, "giving back claims whose answer was lost", |c| {
            shared.queue.recover_lost(c, &due)
        })
        .await;
    match looked {
        Ok((found, released)) => {
            lost(shared).looked(&due, &found, released.len(), Instant::now());
            if !released.is_empty() {
                tracing::info!(queue = %shared.queue.name(), released = released.len(),
                    claims = found.len(),
                    "gave back the jobs of claims whose answer was lost (they were leased to this worker, which never saw them)");
            }
            Ok(())
        }
        // Out of reach, or a server that no longer takes writes (a demoted primary): looked
        // for again after a wait (so the claims go on meanwhile), on a new connection.
        Err(e) if answer_maybe_lost(&e) || matches!(e, Error::ReadOnly { .. }) => {
            lost(shared).looked(&due, &[], 0, Instant::now());
            Err(e)
        }
        Err(e) => {
            conn.trust();
            tracing::warn!(queue = %shared.queue.name(), error = %e.describe(),
                "could not look up claims whose answer was lost; their jobs wait out their visibility timeout");
            lost(shared).give_up(&due);
            Ok(())
        }
    }
}

/// Deletes the claim log's rows whose lease has ended, beside the claims (a task of the
/// runtime's queue services, bounded by the statement deadline).
fn start_prune(shared: &Arc<Shared>) {
    let shared = shared.clone();
    shared
        .runtime
        .inner
        .clone()
        .spawn_queue_service(move |mut stop| async move {
            // However the task ends, the next prune may start.
            let _ended = PruneEnded(shared.clone());
            let by = Instant::now() + shared.config.statement_deadline();
            let prune = async {
                let mut conn = Conn::acquire(&shared.pool, by).await?;
                loop {
                    let deleted: i64 = conn
                        .run(by, "pruning the claim log", |c| {
                            sqlx::query_scalar(crate::sql::PRUNE_CLAIM_LOG).fetch_one(c)
                        })
                        .await?;
                    if deleted < crate::sql::PRUNE_CLAIM_LOG_BATCH {
                        return Ok::<_, Error>(());
                    }
                }
            };
            let pruned = tokio::select! {
                pruned = prune => pruned,
                // Shutdown: the statement is abandoned with its connection.
                () = stop.requested() => return,
            };
            if let Err(e) = pruned {
                tracing::warn!(queue = %shared.queue.name(), error = %e.describe(),
                    "could not prune apalis_pgmq.claim_log (rows past their lease); trying again in 10 s");
            }
        });
}

/// Lets the next prune of the claim log start when dropped.
struct PruneEnded(Arc<Shared>);

impl Drop for PruneEnded {
    fn drop(&mut self) {
        lost(&self.0).pruned();
    }
}

/// How long until the queue's next message becomes visible, by the statement deadline.
async fn next_visible_in(shared: &Shared) -> Result<Option<Duration>> {
    let by = Instant::now() + shared.config.statement_deadline();
    let from = floor(shared).probe_floor();
    let mut conn = Conn::acquire(&shared.pool, by).await?;
    conn.run(by, "probing the queue", |c| {
        shared.queue.next_visible_in(c, from)
    })
    .await
}

/// An arming begun and not yet written: if the step ends any other way (an error, the
/// deadline, the loop stopping), the signal learns it failed, so it is tried again.
struct PendingArm<'a> {
    signal: &'a WakeSignal,
    generation: u64,
    written: bool,
}

impl Drop for PendingArm<'_> {
    fn drop(&mut self) {
        if !self.written {
            self.signal.arm_failed(self.generation);
        }
    }
}

/// Errors that retrying cannot fix: the worker stops with them.
fn is_fatal(e: &Error) -> bool {
    matches!(
        e,
        Error::MissingPrivilege { .. }
            | Error::PermissionDenied { .. }
            | Error::Config { .. }
            | Error::NoTokioRuntime
            | Error::NotSetUp { .. }
            | Error::ConnectionRejected { .. }
            | Error::TransactionPooler { .. }
            | Error::Stopped(_)
    )
}

/// Arms the runtime's wake-up on the queue (see `wakeup.rs`). The arming is recorded before
/// the write: a notification that answers it can arrive before the write returns.
async fn arm(shared: &Shared) -> Result<()> {
    let ttl = Arming::ttl(shared.config.wakeups.poll_interval);
    let channel = shared
        .config
        .wakeups
        .channels
        .queue_channel(shared.queue.name());
    let generation = shared.signal.begin_arm(ttl);
    let mut pending = PendingArm {
        signal: &shared.signal,
        generation,
        written: false,
    };
    let owner = &shared.runtime.inner.owner;
    let by = Instant::now() + shared.config.statement_deadline();
    let mut conn = Conn::acquire(&shared.pool, by).await?;
    conn.run(by, "arming the wake-up", |c| {
        wakeup::arm(c, &channel, owner, ttl, generation)
    })
    .await?;
    pending.written = true;
    // Committed: now make producers that cached "nobody waits" look again.
    conn.run(by, "announcing the wake-up", |c| {
        wakeup::listeners_changed(c)
    })
    .await
}

/// The last worker of the queue in this runtime stopped: remove its arming row.
async fn remove_arming(shared: &Shared) {
    shared.signal.forget_arming();
    if !shared.announces() {
        return;
    }
    let channel = shared
        .config
        .wakeups
        .channels
        .queue_channel(shared.queue.name());
    let owner = &shared.runtime.inner.owner;
    let by = Instant::now() + shared.config.statement_deadline();
    let removed = async {
        let mut conn = Conn::acquire(&shared.pool, by).await?;
        conn.run(by, "removing the wake-up row", |c| {
            crate::notify::unwant(c, &channel, owner)
        })
        .await
    }
    .await;
    if let Err(e) = removed {
        tracing::debug!(queue = %shared.queue.name(), error = %e.describe(),
            "could not remove the wake-up row; it expires by itself");
    }
}

/// Creates the queue and its dead-letter queue if either is missing, installs the queue's
/// notification trigger when listening, waits (briefly) for the LISTEN to be active so no
/// notification sent after the first read is missed, and registers the worker. The statements
/// run on one connection by `by` (see `src/deadline.rs`).
async fn ensure_queue(
    shared: &Arc<Shared>,
    listening: Option<oneshot::Receiver<()>>,
    worker: &str,
    service: &str,
    by: Instant,
) -> Result<Registration> {
    // Behind a transaction pooler every statement below could run on another client's
    // session: refuse it before anything else (once per runtime). Bounded like the rest: when
    // the check gets no answer by `by`, the preparation below meets the same silence and fails.
    if let Ok(checked) = tokio::time::timeout_at(by, shared.runtime.check_sessions()).await {
        checked?;
    }
    let mut conn = Conn::acquire(&shared.pool, by).await?;
    let partitioned = conn
        .run(by, "preparing the queue", |c| prepare_queue(c, shared))
        .await?;
    drop(conn);
    if let Some(ack) = listening
        && tokio::time::timeout(Duration::from_secs(5), ack)
            .await
            .is_err()
    {
        tracing::warn!(queue = %shared.queue.name(),
            "LISTEN not active after 5 s; starting anyway with the fallback poll");
    }
    let retention = Retention {
        archive: shared.config.retention.archive,
        dead_letters: shared.config.retention.dead_letters,
        results: shared.config.results.retention,
        partitioned,
    };
    Ok(shared
        .runtime
        .inner
        .register_worker(worker, &shared.queue, service, retention)
        .await)
}

/// The statements of [`ensure_queue`], on `conn`: whether the queue is partitioned.
async fn prepare_queue(conn: &mut sqlx::PgConnection, shared: &Arc<Shared>) -> Result<bool> {
    for q in [&shared.queue, &shared.dlq] {
        if !q.tables_exist(&mut *conn).await? {
            q.create(&mut *conn).await?;
        }
    }
    // Best effort: creating an index needs the table's owner, which a worker need not be.
    if let Err(e) = shared.queue.index_dead_letters(&mut *conn).await {
        tracing::debug!(queue = %shared.queue.name(), error = %e.describe(),
            "could not index the dead letters by job id; finding a dead job by id scans them");
    }
    if shared.config.claims.priorities
        && let Err(e) = shared.queue.index_priorities(&mut *conn).await
    {
        tracing::warn!(queue = %shared.queue.name(), error = %e.describe(),
            "could not create the priority index; priority claims scan the queue until the queue's owner calls create_queue");
    }
    if let Err(e) = shared.queue.index_unique_keys(&mut *conn).await {
        tracing::debug!(queue = %shared.queue.name(), error = %e.describe(),
            "could not create the unique index on idempotency keys; pushes with a key fail until the queue's owner calls create_queue");
    }
    if let Some(missing) = shared
        .queue
        .missing_worker_right(
            &mut *conn,
            &shared.dlq,
            shared.announces(),
            shared.config.results.store,
            shared.config.claims.recover_lost,
        )
        .await?
    {
        return Err(missing);
    }
    if shared.config.wakeups.listen {
        let c = &shared.config;
        if let Err(e) = crate::notify::ensure_notify(
            &mut *conn,
            shared.queue.name(),
            &c.wakeups.channels,
            c.wakeups.mode,
        )
        .await
        {
            tracing::warn!(queue = %shared.queue.name(), error = %e.describe(),
                "could not install the notification trigger; relying on polling and other producers' notifications");
        }
    }
    shared.queue.is_partitioned(&mut *conn).await
}

/// Looks below the claim floor for a visible message, beside the claims (a task of the
/// runtime's queue services, bounded by the statement deadline): under an old snapshot this
/// walks every dead entry the floor lets the claims skip, so it must not hold a claim up.
fn start_sweep(shared: &Arc<Shared>, sweep: Sweep) {
    let shared = shared.clone();
    shared
        .runtime
        .inner
        .clone()
        .spawn_queue_service(move |mut stop| async move {
            let started = Instant::now();
            // Whatever ends the task (done, stopped, aborted, a panic), the floor learns the
            // sweep ended, so another can come.
            let mut ended = SweepEnded {
                shared: shared.clone(),
                sweep,
                started,
                found: None,
            };
            let by = started + shared.config.statement_deadline();
            let look = async {
                let mut conn = Conn::acquire(&shared.pool, by).await?;
                conn.run(by, "looking below the claim floor", |c| {
                    shared.queue.visible_below(c, sweep.floor)
                })
                .await
            };
            let found = tokio::select! {
                found = look => found,
                // Shutdown: the statement is abandoned with its connection.
                () = stop.requested() => return,
            };
            match found {
                Ok(found) => ended.found = Some(found),
                Err(e) => tracing::debug!(queue = %shared.queue.name(), error = %e.describe(),
                "could not look below the claim floor; trying again later"),
            }
        });
}

/// Reports a sweep's end to the floor when dropped; a find also wakes the queue's workers, so
/// an idle one claims (from the start) now rather than at its fallback poll.
struct SweepEnded {
    shared: Arc<Shared>,
    sweep: Sweep,
    started: Instant,
    found: Option<bool>,
}

impl Drop for SweepEnded {
    fn drop(&mut self) {
        floor(&self.shared).swept(self.sweep, self.started, Instant::now(), self.found);
        if self.found == Some(true) {
            tracing::debug!(queue = %self.shared.queue.name(), floor = %self.sweep.floor,
                "a visible job below the claim floor (a vt written in the past): claims read from the start until a new floor forms");
            self.shared.signal.wake();
        }
    }
}

/// One claim: on `conn` (or one from the pool); the claimed messages are leased in the lease
/// table before they are returned.
async fn fetch(
    shared: &Arc<Shared>,
    conn: Option<Conn>,
    qty: usize,
    by_priority: bool,
) -> (Result<Vec<Message>>, Option<Conn>) {
    let started = Instant::now();
    let vt = shared.config.leases.visibility_timeout;
    // The claim and, without a kept connection, taking one from the pool.
    let by = started + shared.config.statement_deadline();
    let mut conn = match conn {
        Some(c) => c,
        None => match Conn::acquire(&shared.pool, by).await {
            Ok(c) => c,
            Err(e) => {
                let e = crate::util::explain_pool_error(&shared.pool, e.into()).await;
                return (Err(e), None);
            }
        },
    };
    let (bound, sweep) = {
        let mut f = floor(shared);
        (f.bound(), f.sweep_due(started))
    };
    if let Some(sweep) = sweep {
        start_sweep(shared, sweep);
    }
    // Claims whose answer was lost are given back first, so this claim can take them.
    let log = shared.config.claims.recover_lost;
    if log && let Err(e) = recover_lost(shared, &mut conn, by).await {
        return (Err(e), None);
    }
    let token = log.then(LostClaims::token);
    let sent = Instant::now();
    let claimed = match conn
        .run(by, "claiming messages", |c| {
            shared
                .queue
                .claim(c, vt, qty, by_priority, bound.floor, token.as_deref())
        })
        .await
    {
        Ok(m) => m,
        // The connection may be broken (or silent): it is closed, not reused. (A failover or a
        // restart shows in the next claim's `seen`, which drops the floor.) The claim may have
        // committed all the same: its token is kept, to give its messages back.
        Err(e) => {
            if let Some(token) = token
                && answer_maybe_lost(&e)
            {
                lost(shared).lost(token, sent, vt);
            }
            return (Err(e), None);
        }
    };
    if token.is_some() && !claimed.messages.is_empty() {
        let prune = {
            let mut l = lost(shared);
            l.on_logged();
            l.prune_due(Instant::now())
        };
        if prune {
            start_prune(shared);
        }
    }
    if let Some(seen) = claimed.seen {
        let took = Took {
            asked: qty,
            got: claimed.messages.len(),
            highest: claimed
                .messages
                .iter()
                .filter_map(|m| m.visible_since)
                .max(),
        };
        floor(shared).claimed(bound, sent, Instant::now(), took, seen);
    }
    let messages = claimed.messages;
    if !messages.is_empty() {
        crate::obs::claimed(
            shared.queue.name().as_str(),
            shared.queue.metrics_kind(),
            messages.len(),
        );
        shared.leases.insert_many(messages.iter().map(|m| {
            (
                m.msg_id,
                Lease {
                    read_ct: m.read_ct,
                    // From when the claim was sent (the server's lease began later), not from
                    // before a connection was taken: a slow pool would eat the lease.
                    expires: sent + vt,
                    lost: None,
                },
            )
        }));
    }
    (Ok(messages), Some(conn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_learned_from_saturation() {
        let mut c = Capacity::default();
        assert_eq!(c.limit(), None, "unknown until the worker is first full");
        // Worker asks for tasks while 0..3 are running.
        for in_flight in 0..3 {
            assert!(!c.observe_ready(in_flight));
            c.observe_next(in_flight);
        }
        // Ready with 3 running, but no poll_next: the service was full at 3.
        assert!(!c.observe_ready(3));
        assert!(c.observe_ready(2), "second ready without next = saturated");
        assert_eq!(c.limit(), Some(3));
        c.observe_next(2);
        // The limit grows if the worker later accepts more.
        c.observe_next(3);
        assert_eq!(c.limit(), Some(4));
        // A brief stall with fewer running does not lower what the worker proved it can run.
        assert!(!c.observe_ready(1));
        assert!(c.observe_ready(1));
        assert_eq!(c.limit(), Some(4));
        // Paused worker (full at 0) still claims one when asked.
        let mut p = Capacity::default();
        p.observe_ready(0);
        assert!(p.observe_ready(0));
        assert_eq!(p.limit(), Some(1));
    }
}
