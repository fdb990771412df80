//! The producer side of a worker: claims messages, holds them until the worker starts them,
//! and decides when to look again.
//!
//! States: `Start` → `Ensuring` (the queue and its dead-letter queue exist, the role has the
//! rights a worker needs) → `Ready` ⇄ `Reading` / `Arming` / `Settling` / `Probing` /
//! `Sleeping`, with `Backoff` after an infrastructure error and `Closing` → `Closed` on
//! shutdown. Which step comes next is decided by the wake-up protocol's
//! [`Plan`](crate::notify::wakeup::Plan) (see `src/notify/wakeup.rs` for the invariant and why
//! it holds); this file only runs the steps. Infrastructure errors never reach the worker (that
//! would stop it): they are logged and retried with backoff, so a worker survives a database
//! restart. A missing right is the exception: the worker fails at start with an error naming
//! it, rather than run jobs whose outcomes it cannot write.
//!
//! Capacity: a worker should never claim messages it cannot start. The fetcher cannot see the
//! worker's concurrency limit, but it can see its effect: if `poll_ready` returned `Ready` and
//! the worker did not ask for a task before calling `poll_ready` again, the service in between
//! (the concurrency limit) said it was full. The number of tasks in flight at that moment is the
//! capacity. Held messages beyond it are released at once (`vt = now`, `read_ct` given back), and
//! later claims are limited to capacity minus tasks in flight. Until the first saturation is
//! seen, a claim is at most `fetch_batch_size`, and every claimed message is started at once.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use apalis_core::worker::context::WorkerContext;
use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use sqlx::{Postgres, pool::PoolConnection};
use tokio::{
    sync::oneshot,
    time::{Instant, Sleep, sleep_until},
};

use super::{Shared, claims::Claims, lease::Lease};
use crate::{
    error::Result,
    notify::{
        Subscription, Wake,
        registry::Registration,
        wakeup::{self, Plan, Step},
    },
    queue::{Delivery, Message},
    util::error_backoff,
};

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

enum State {
    Start,
    Ensuring(BoxFuture<'static, Result<Registration>>),
    /// Between steps: ask the plan what to do.
    Ready,
    /// Claims are in flight (in `Fetcher::reads`); more may be sent while they come back full.
    Reading,
    Arming(BoxFuture<'static, Result<()>>),
    Settling(BoxFuture<'static, Result<bool>>),
    Probing(BoxFuture<'static, Result<Option<Duration>>>),
    /// Outcomes are written more slowly than jobs finish: wait for the completer before
    /// claiming more, so unwritten outcomes (and the leases they keep) stay bounded.
    Draining(BoxFuture<'static, ()>),
    Sleeping(Pin<Box<Sleep>>),
    Backoff(Pin<Box<Sleep>>),
    Closing(BoxFuture<'static, ()>),
    Closed,
}

/// Per-worker fetch state. Each clone of a storage has its own.
pub(crate) struct Fetcher {
    state: State,
    /// Claimed messages the worker has not started yet, in `msg_id` order.
    buffer: VecDeque<Message>,
    /// When to read, arm, check and sleep; `None` until the worker first polls (it needs the
    /// configuration).
    plan: Option<Plan>,
    capacity: Capacity,
    /// Claim sizes and overlap; `None` until the worker first polls.
    claims: Option<Claims>,
    /// Claims in flight and the connections they run on.
    inflight: InFlight,
    /// Whether the last claim of this cycle found anything, and whether one failed.
    cycle_found: bool,
    cycle_error: Option<crate::Error>,
    /// Whether the queue is known to exist.
    ensured: bool,
    /// Consecutive infrastructure errors, for backoff.
    failures: u32,
    /// Keeps the buffered messages' release on drop from needing the storage.
    shared: Option<Arc<Shared>>,
    /// Wake-ups for this queue: notifications, retries written, releases.
    wake: Option<Subscription>,
    /// This worker's row in the worker registry.
    registration: Option<Registration>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("buffered", &self.buffer.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Default for Fetcher {
    fn default() -> Self {
        Self {
            state: State::Start,
            buffer: VecDeque::new(),
            plan: None,
            capacity: Capacity::default(),
            claims: None,
            inflight: InFlight::default(),
            cycle_found: false,
            cycle_error: None,
            ensured: false,
            failures: 0,
            shared: None,
            wake: None,
            registration: None,
        }
    }
}

impl Fetcher {
    pub(crate) fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        shared: &Arc<Shared>,
        in_flight: usize,
    ) -> Poll<Result<()>> {
        if let Err(e) = shared.start_background() {
            return Poll::Ready(Err(e));
        }
        if self.shared.is_none() {
            self.shared = Some(shared.clone());
        }
        self.report(in_flight);
        // Take in the claims that came back even while the worker is full (apalis polls for a
        // task only when it has room): their messages are leased from the moment the claim ran,
        // and the keeper renews only what it knows of.
        if !self.inflight.reads.is_empty() {
            self.drive_reads(cx, shared);
        }
        let saturated = self.capacity.observe_ready(in_flight);
        let keep = self.keep();
        if saturated && self.buffer.len() > keep {
            tracing::debug!(
                queue = %shared.queue.name(),
                in_flight,
                released = self.buffer.len() - keep,
                "worker is full; releasing claimed messages it cannot start soon"
            );
            if let Some(c) = self.claims.as_mut() {
                c.on_saturated();
            }
            self.release_buffer(shared, keep);
        }
        if self.buffer.len() > self.keep() {
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
        let in_flight = worker.task_count();
        self.capacity.observe_next(in_flight);
        self.report(in_flight);
        let config = &shared.config;
        if self.plan.is_none() {
            self.plan = Some(Plan::new(
                config.poll_interval,
                config.poll_jitter,
                config.linger_polls(),
            ));
            self.claims = Some(Claims::new(
                config,
                shared.pool.options().get_max_connections(),
            ));
        }
        loop {
            self.drive_reads(cx, shared);
            self.read_more(shared, in_flight);
            if let Some(m) = self.buffer.pop_front() {
                // Skip anything whose lease we no longer hold (lost while buffered).
                if shared
                    .leases
                    .get(m.msg_id)
                    .is_some_and(|l| l.read_ct == m.read_ct)
                {
                    if let Some(c) = self.claims.as_mut() {
                        c.on_started();
                    }
                    return Poll::Ready(Some(Ok(m)));
                }
                continue;
            }
            let (Some(plan), Some(claims)) = (self.plan.as_mut(), self.claims.as_mut()) else {
                return Poll::Pending;
            };
            let now = Instant::now();
            match &mut self.state {
                State::Start => {
                    let ack = if self.wake.is_none() {
                        let (sub, ack) = shared.subscribe();
                        shared.signal.worker_started();
                        shared.signal.disarm_with(crate::notify::Disarmer {
                            pool: shared.pool.clone(),
                            channel: shared.config.channels.queue_channel(shared.queue.name()),
                            owner: shared.hub.owner.clone(),
                        });
                        self.wake = Some(sub);
                        ack
                    } else {
                        None
                    };
                    self.state = State::Ensuring(Box::pin(ensure_queue(
                        shared.clone(),
                        ack,
                        worker.name().to_owned(),
                        worker.get_service().to_owned(),
                    )));
                }
                State::Ensuring(fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(registration)) => {
                        registration
                            .stats
                            .in_flight
                            .store(in_flight, Ordering::Relaxed);
                        self.registration = Some(registration);
                        self.ensured = true;
                        self.failures = 0;
                        plan.on_recovered();
                        self.state = State::Ready;
                    }
                    Poll::Ready(Err(e)) if is_fatal(&e) => {
                        tracing::error!(queue = %shared.queue.name(), error = %e,
                            "worker cannot run on this queue; stopping it");
                        self.state = State::Closed;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Poll::Ready(Err(e)) => {
                        self.state = fail(&mut self.failures, shared, "preparing the queue", &e);
                        if matches!(e, crate::Error::Database(sqlx::Error::PoolTimedOut)) {
                            let pool = shared.pool.clone();
                            let queue = shared.queue.name().clone();
                            tokio::spawn(async move {
                                let e = crate::util::explain_pool_error(&pool, e).await;
                                tracing::error!(%queue, error = %e, "worker cannot reach the database");
                            });
                        }
                    }
                },
                State::Ready => {
                    match self.wake.as_mut().map_or(Wake::Nothing, |w| w.poll(cx)) {
                        Wake::Now => plan.on_wake_now(),
                        Wake::At(at) => plan.on_wake_at(at),
                        Wake::Nothing => {}
                    }
                    let margin = config.poll_interval.mul_f64(wakeup::REARM_WHEN_LEFT_POLLS);
                    let wants_arm = shared.announces() && !shared.signal.armed_for(margin);
                    let step = plan.next(now, wants_arm);
                    let lagging = shared.leases.unwritten() > claims.backlog_cap();
                    if !matches!(step, Step::Read) || lagging {
                        // Not claiming back to back: give the connections back to the pool.
                        self.inflight.conns.clear();
                    }
                    self.state = match step {
                        Step::Read if lagging => {
                            // Until half the backlog is written (a full flush would idle the
                            // worker for no gain).
                            let shared = shared.clone();
                            let below = claims.backlog_cap() / 2;
                            State::Draining(Box::pin(async move {
                                shared.leases.wait_unwritten_below(below).await;
                            }))
                        }
                        Step::Read => {
                            let qty = claims.first(self.capacity.limit(), in_flight);
                            self.cycle_found = false;
                            self.inflight
                                .send(shared, qty, claims.next_by_priority(), in_flight);
                            State::Reading
                        }
                        Step::Arm => State::Arming(Box::pin(arm(shared.clone()))),
                        Step::CheckSettled => {
                            let shared = shared.clone();
                            State::Settling(Box::pin(async move {
                                wakeup::inserts_settled(&shared.pool, shared.queue.name().as_str())
                                    .await
                            }))
                        }
                        Step::Probe => {
                            let shared = shared.clone();
                            State::Probing(Box::pin(async move {
                                shared.queue.next_visible_in(&shared.pool).await
                            }))
                        }
                        Step::Sleep(until) => State::Sleeping(Box::pin(sleep_until(until))),
                    };
                }
                State::Reading => {
                    if !self.inflight.reads.is_empty() {
                        return Poll::Pending;
                    }
                    // Every claim of this cycle is back (their messages, if any, are held).
                    if let Some(e) = self.cycle_error.take() {
                        self.inflight.conns.clear();
                        claims.on_idle();
                        self.state = fail(&mut self.failures, shared, "reading the queue", &e);
                    } else {
                        self.failures = 0;
                        if !self.cycle_found {
                            claims.on_idle();
                        }
                        plan.on_read(now, self.cycle_found);
                        self.state = State::Ready;
                    }
                }
                State::Arming(fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(result) => {
                        if let Err(e) = &result {
                            tracing::warn!(queue = %shared.queue.name(), error = %e,
                                "could not arm the wake-up; relying on polling until the next try");
                        }
                        plan.on_armed(now, result.is_ok());
                        self.state = State::Ready;
                    }
                },
                State::Settling(fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(settled)) => {
                        plan.on_settled(now, settled);
                        self.state = State::Ready;
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(queue = %shared.queue.name(), error = %e,
                            "could not check for in-flight inserts; relying on polling");
                        plan.on_settle_failed();
                        self.state = State::Ready;
                    }
                },
                State::Probing(fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(next)) => {
                        plan.on_probed(now, next);
                        self.state = State::Ready;
                    }
                    Poll::Ready(Err(e)) => {
                        self.state = fail(&mut self.failures, shared, "reading the queue", &e);
                    }
                },
                State::Draining(fut) => {
                    if fut.poll_unpin(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Nothing else happened meanwhile: the plan still wants to read.
                    self.state = State::Ready;
                }
                State::Sleeping(sleep) => {
                    let woken = self.wake.as_mut().map_or(Wake::Nothing, |w| w.poll(cx));
                    match woken {
                        Wake::Now => plan.on_wake_now(),
                        Wake::At(at) => plan.on_wake_at(at),
                        Wake::Nothing => {
                            if sleep.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                        }
                    }
                    self.state = State::Ready;
                }
                State::Backoff(sleep) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    plan.on_recovered();
                    self.state = if self.ensured {
                        State::Ready
                    } else {
                        State::Start
                    };
                }
                State::Closing(_) | State::Closed => return Poll::Ready(None),
            }
        }
    }

    /// Stop: finish a read in progress, release everything held, flush pending outcomes.
    pub(crate) fn poll_close(&mut self, cx: &mut Context<'_>, shared: &Arc<Shared>) -> Poll<()> {
        loop {
            match &mut self.state {
                State::Closed => return Poll::Ready(()),
                State::Closing(fut) => {
                    if fut.poll_unpin(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.state = State::Closed;
                }
                _ => {
                    self.state = State::Closed;
                    let in_progress = std::mem::take(&mut self.inflight).reads;
                    let held = self.take_buffer(shared);
                    let last = self.wake.take().is_some() && shared.signal.worker_stopped();
                    let registration = self.registration.take();
                    let shared = shared.clone();
                    self.state = State::Closing(Box::pin(async move {
                        let queue = shared.queue.name().clone();
                        let work = async move {
                            let mut held = held;
                            // Claims in flight may already have claimed rows: see them through,
                            // then release what they got.
                            let done: Vec<ReadDone> = in_progress.collect().await;
                            for d in done {
                                if let Ok(messages) = d.result {
                                    for m in &messages {
                                        if shared.leases.remove(m.msg_id, m.read_ct) {
                                            held.push(Delivery::of(m));
                                        }
                                    }
                                }
                            }
                            release(&shared, held).await;
                            shared.flush_completions().await;
                            if last {
                                remove_arming(&shared).await;
                            }
                            if let Some(r) = registration {
                                r.unregister().await;
                            }
                        };
                        // Whatever the database does, shutdown ends: what could not be written
                        // is delivered again when its lease lapses.
                        if tokio::time::timeout(CLOSE_TIMEOUT, work).await.is_err() {
                            tracing::error!(%queue, timeout = ?CLOSE_TIMEOUT,
                                "shutdown could not release held messages or write outcomes in time; they will be delivered again when their leases lapse");
                        }
                    }));
                }
            }
        }
    }

    /// Messages a full worker may keep holding (see `claims.rs`).
    fn keep(&self) -> usize {
        self.claims
            .as_ref()
            .map_or(0, |c| c.allowance(self.capacity.limit()))
    }

    /// Takes in whatever claims came back: their messages are held, their connections kept for
    /// the next claim, their errors remembered until the cycle ends.
    fn drive_reads(&mut self, cx: &mut Context<'_>, shared: &Shared) {
        while let Poll::Ready(Some(done)) = self.inflight.reads.poll_next_unpin(cx) {
            self.inflight.pending = self.inflight.pending.saturating_sub(done.requested);
            match done.result {
                Ok(messages) => {
                    if let Some(conn) = done.conn {
                        self.inflight.conns.push(conn);
                    }
                    let got = messages.len();
                    let waited = self.buffer.is_empty()
                        && self
                            .capacity
                            .limit()
                            .is_none_or(|l| done.in_flight_at_send < l);
                    if let Some(c) = self.claims.as_mut() {
                        c.on_read(Instant::now(), done.requested, got, done.latency, waited);
                    }
                    self.cycle_found |= got > 0;
                    self.buffer.extend(messages);
                }
                Err(e) => {
                    if self.cycle_error.is_none() {
                        self.cycle_error = Some(e);
                    }
                    tracing::debug!(queue = %shared.queue.name(), "a claim failed");
                }
            }
        }
    }

    /// While claims come back full, sends the next before the held messages run out.
    fn read_more(&mut self, shared: &Arc<Shared>, in_flight: usize) {
        if !matches!(self.state, State::Reading) || self.cycle_error.is_some() {
            return;
        }
        let Some(claims) = self.claims.as_mut() else {
            return;
        };
        if shared.leases.unwritten() > claims.backlog_cap() {
            // Outcomes lag: no claim beyond the one the plan asks for (which waits for them).
            return;
        }
        if let Some(qty) = claims.another(
            self.capacity.limit(),
            in_flight,
            self.buffer.len(),
            self.inflight.pending,
            self.inflight.reads.len(),
        ) {
            self.inflight
                .send(shared, qty, claims.next_by_priority(), in_flight);
        }
    }

    /// Tells the worker registry how many jobs run and the concurrency learned so far.
    fn report(&self, in_flight: usize) {
        if let Some(r) = &self.registration {
            r.stats.in_flight.store(in_flight, Ordering::Relaxed);
            r.stats
                .concurrency
                .store(self.capacity.limit.unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// Removes held messages from the lease table and returns their fencing tokens.
    fn take_buffer(&mut self, shared: &Shared) -> Vec<Delivery> {
        self.buffer
            .drain(..)
            .filter(|m| shared.leases.remove(m.msg_id, m.read_ct))
            .map(|m| Delivery::of(&m))
            .collect()
    }

    /// Releases held messages beyond the first `keep`.
    fn release_buffer(&mut self, shared: &Arc<Shared>, keep: usize) {
        let excess = self.buffer.split_off(keep.min(self.buffer.len()));
        let held: Vec<Delivery> = excess
            .iter()
            .filter(|m| shared.leases.remove(m.msg_id, m.read_ct))
            .map(Delivery::of)
            .collect();
        if held.is_empty() {
            return;
        }
        let shared = shared.clone();
        tokio::spawn(async move { release(&shared, held).await });
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        // A worker dropped without closing: stop renewing what it held and hand it back.
        if let Some(shared) = self.shared.take() {
            if self.wake.take().is_some() {
                shared.signal.worker_stopped();
            }
            if !self.buffer.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
                self.release_buffer(&shared, 0);
            } else {
                self.take_buffer(&shared);
            }
        }
    }
}

/// The longest a worker's shutdown waits for the database (releasing held messages, writing
/// pending outcomes).
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Logs an infrastructure error (the first, then at powers of two) and backs off.
fn fail(failures: &mut u32, shared: &Shared, what: &str, e: &crate::Error) -> State {
    *failures += 1;
    let wait = error_backoff(*failures);
    if *failures == 1 || failures.is_power_of_two() {
        tracing::error!(queue = %shared.queue.name(), error = %e, failures = *failures,
            retry_in = ?wait, "worker backend: {what} failed");
    }
    State::Backoff(Box::pin(tokio::time::sleep(wait)))
}

/// Errors that retrying cannot fix: the worker stops with them.
fn is_fatal(e: &crate::Error) -> bool {
    match e {
        crate::Error::MissingPrivilege { .. }
        | crate::Error::Config(_)
        | crate::Error::NotSetUp { .. } => true,
        crate::Error::Database(d) => crate::util::sqlstate(d).as_deref() == Some("42501"),
        _ => false,
    }
}

/// Arms this process's wake-up on the queue (see `wakeup.rs`). The arming is recorded before
/// the write: a notification that answers it can arrive before the write returns.
async fn arm(shared: Arc<Shared>) -> Result<()> {
    let ttl = shared.config.poll_interval * wakeup::ARM_TTL_POLLS + Duration::from_secs(5);
    let channel = shared.config.channels.queue_channel(shared.queue.name());
    let generation = shared.signal.begin_arm(Instant::now() + ttl);
    let armed = wakeup::arm(&shared.pool, &channel, &shared.hub.owner, ttl, generation).await;
    if armed.is_err() {
        shared.signal.arm_failed(generation);
        return armed;
    }
    // Committed: now make producers that cached "nobody waits" look again.
    wakeup::listeners_changed(&shared.pool).await
}

/// The last worker of the queue in this process stopped: remove its arming row.
async fn remove_arming(shared: &Shared) {
    shared.signal.forget_arming();
    if !shared.announces() {
        return;
    }
    let channel = shared.config.channels.queue_channel(shared.queue.name());
    if let Err(e) = crate::notify::unwant(&shared.pool, &channel, &shared.hub.owner).await {
        tracing::debug!(queue = %shared.queue.name(), error = %e,
            "could not remove the wake-up row; it expires by itself");
    }
}

/// Makes held messages visible now. On failure they become visible when their lease lapses.
async fn release(shared: &Shared, held: Vec<Delivery>) {
    if held.is_empty() {
        return;
    }
    let count = held.len();
    match shared.queue.release(&shared.pool, &held).await {
        Ok(_) => {
            tracing::debug!(queue = %shared.queue.name(), count, "released claimed messages");
            crate::obs::released(shared.queue.name().as_str(), count);
            // Idle workers of this process and of others can take them now.
            shared.signal.wake();
            shared.wake_others(Duration::ZERO).await;
        }
        Err(e) => tracing::warn!(queue = %shared.queue.name(), error = %e, count,
            "could not release held messages; they become visible when their lease lapses"),
    }
}

/// Creates the queue and its dead-letter queue if either is missing, installs the queue's
/// notification trigger when listening, and waits (briefly) for the LISTEN to be active so no
/// notification sent after the first read is missed.
async fn ensure_queue(
    shared: Arc<Shared>,
    listening: Option<oneshot::Receiver<()>>,
    worker: String,
    service: String,
) -> Result<Registration> {
    for q in [&shared.queue, &shared.dlq] {
        if !q.tables_exist(&shared.pool).await? {
            q.create(&shared.pool).await?;
        }
    }
    // Best effort: creating an index needs the table's owner, which a worker need not be.
    if let Err(e) = shared.queue.index_dead_letters(&shared.pool).await {
        tracing::debug!(queue = %shared.queue.name(), error = %e,
            "could not index the dead letters by job id; finding a dead job by id scans them");
    }
    if shared.config.priorities
        && let Err(e) = shared.queue.index_priorities(&shared.pool).await
    {
        tracing::warn!(queue = %shared.queue.name(), error = %e,
            "could not create the priority index; priority claims scan the queue until the queue's owner calls create_queue");
    }
    if let Err(e) = shared.queue.index_unique_keys(&shared.pool).await {
        tracing::debug!(queue = %shared.queue.name(), error = %e,
            "could not create the unique index on idempotency keys; pushes with a key fail until the queue's owner calls create_queue");
    }
    if let Some(missing) = shared
        .queue
        .missing_worker_right(
            &shared.pool,
            &shared.dlq,
            shared.announces(),
            shared.config.store_results,
        )
        .await?
    {
        return Err(missing);
    }
    if shared.config.listen {
        let c = &shared.config;
        if let Err(e) = crate::notify::ensure_notify(
            &shared.pool,
            shared.queue.name(),
            &c.channels,
            c.notify_mode,
        )
        .await
        {
            tracing::warn!(queue = %shared.queue.name(), error = %e,
                "could not install the notification trigger; relying on polling and other producers' notifications");
        }
    }
    if let Some(ack) = listening
        && tokio::time::timeout(Duration::from_secs(5), ack)
            .await
            .is_err()
    {
        tracing::warn!(queue = %shared.queue.name(),
            "LISTEN not active after 5 s; starting anyway with the fallback poll");
    }
    let retention = crate::notify::registry::Retention {
        archive: shared.config.archive_retention,
        dead_letters: shared.config.dead_letter_retention,
        results: shared.config.result_retention,
        partitioned: shared.queue.is_partitioned(&shared.pool).await?,
    };
    Ok(shared
        .hub
        .register_worker(&shared.pool, &worker, &shared.queue, &service, retention)
        .await)
}

/// A claim that came back.
struct ReadDone {
    requested: usize,
    /// Tasks running when it was sent.
    in_flight_at_send: usize,
    latency: Duration,
    result: Result<Vec<Message>>,
    /// The connection it ran on, unless it failed.
    conn: Option<PoolConnection<Postgres>>,
}

/// Claims in flight, each on its own connection, and the connections the last claims ran on,
/// kept while claims follow each other (each pool checkout may cost a round trip: sqlx pings a
/// connection before handing it out).
#[derive(Default)]
struct InFlight {
    reads: FuturesUnordered<BoxFuture<'static, ReadDone>>,
    /// Messages asked for by the claims in flight.
    pending: usize,
    conns: Vec<PoolConnection<Postgres>>,
}

impl InFlight {
    /// Sends a claim of `qty` on a kept connection (or one from the pool).
    fn send(&mut self, shared: &Arc<Shared>, qty: usize, by_priority: bool, in_flight: usize) {
        self.pending += qty;
        let conn = self.conns.pop();
        let shared = shared.clone();
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
}

async fn fetch(
    shared: &Shared,
    conn: Option<PoolConnection<Postgres>>,
    qty: usize,
    by_priority: bool,
) -> (Result<Vec<Message>>, Option<PoolConnection<Postgres>>) {
    let started = Instant::now();
    let vt = shared.config.visibility_timeout;
    let mut conn = match conn {
        Some(c) => c,
        None => match shared.pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                let e = crate::util::explain_pool_error(&shared.pool, e.into()).await;
                return (Err(e), None);
            }
        },
    };
    let messages = match shared.queue.claim(&mut *conn, vt, qty, by_priority).await {
        Ok(m) => m,
        // The connection may be broken: let it go.
        Err(e) => return (Err(e), None),
    };
    if !messages.is_empty() {
        crate::obs::claimed(shared.queue.name().as_str(), messages.len());
        shared.leases.insert_many(messages.iter().map(|m| {
            (
                m.msg_id,
                Lease {
                    read_ct: m.read_ct,
                    expires: started + vt,
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
