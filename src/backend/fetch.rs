//! The producer side of a worker: claims messages, holds them until the worker starts them,
//! and decides when to look again.
//!
//! States: `Start` → `Ensuring` (the queue and its dead-letter queue exist) → `Idle` ⇄
//! `Fetching` / `Announcing` / `Settling` / `Probing` / `Waiting`, with `Backoff` after an
//! infrastructure error and `Closing` → `Closed` on shutdown. Errors never reach the worker
//! (that would stop it): they are logged and retried with backoff, so a worker survives a
//! database restart.
//!
//! Wake-ups: after a non-empty read the fetcher reads again before waiting. After an empty read
//! it may linger (re-read shortly) and, with on-demand notifications, arm its wake-up; just
//! before it actually waits (`Probing`) it looks up the earliest future visibility time (a
//! delayed job, a backoff), and waits until then, a notification, or the jittered fallback poll
//! interval, whichever is first.
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
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{FutureExt, future::BoxFuture};
use tokio::{
    sync::oneshot,
    time::{Instant, Sleep},
};

use super::{
    Shared,
    lease::{Lease, run_fenced},
};
use crate::{
    error::Result,
    notify::{Subscription, Wake},
    queue::Message,
    util::{error_backoff, jittered},
};

/// Learns how many tasks the worker can run at once from when it stops asking for more.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capacity {
    /// Learned limit on tasks in flight; `None` until the worker is first seen full.
    limit: Option<usize>,
    /// Tasks in flight when `poll_ready` last returned `Ready`, if no `poll_next` followed.
    armed: Option<usize>,
}

impl Capacity {
    /// `poll_ready` is about to return `Ready` with `in_flight` tasks running. Returns `true` if
    /// the previous `Ready` was not followed by `poll_next`, i.e. the worker was full.
    pub(crate) fn observe_ready(&mut self, in_flight: usize) -> bool {
        let saturated = if let Some(full_at) = self.armed.take() {
            self.limit = Some(full_at.max(1));
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
        if let Some(limit) = self.limit
            && in_flight >= limit
        {
            self.limit = Some(in_flight + 1);
        }
    }

    /// How many messages to claim now.
    pub(crate) fn claim(&self, in_flight: usize, batch: usize) -> usize {
        match self.limit {
            None => batch,
            Some(limit) => limit.saturating_sub(in_flight).clamp(1, batch),
        }
    }

    #[cfg(test)]
    pub(crate) fn limit(&self) -> Option<usize> {
        self.limit
    }
}

enum State {
    Start,
    Ensuring(BoxFuture<'static, Result<()>>),
    Idle,
    Fetching(BoxFuture<'static, Result<Vec<Message>>>),
    /// After an empty read, before waiting: when does the earliest hidden message become visible?
    Probing(BoxFuture<'static, Result<Option<Duration>>>),
    /// Announcing that a worker waits, so on-demand triggers notify; then read once more.
    Announcing(BoxFuture<'static, Result<()>>),
    /// Checking that no insert which skipped notifying is still in flight.
    Settling(BoxFuture<'static, Result<bool>>),
    Waiting(Pin<Box<Sleep>>),
    Backoff(Pin<Box<Sleep>>),
    Closing(BoxFuture<'static, ()>),
    Closed,
}

/// Per-worker fetch state. Each clone of a storage has its own.
pub(crate) struct Fetcher {
    state: State,
    /// Claimed messages the worker has not started yet, in `msg_id` order.
    buffer: VecDeque<Message>,
    /// Read again before waiting (after a non-empty read, a wake-up, or a (re)start).
    fetch_now: bool,
    /// After an empty read, how long until a hidden message becomes visible; the outer `None`
    /// until looked up (only before actually waiting, not on every read).
    next_visible_in: Option<Option<Duration>>,
    capacity: Capacity,
    /// Whether the queue is known to exist.
    ensured: bool,
    /// Consecutive infrastructure errors, for backoff.
    failures: u32,
    /// After announcing: inserts that skipped notifying may still be in flight.
    settle: Option<Settle>,
    /// Short re-reads left before arming a wake-up, after a busy period.
    linger_left: u32,
    /// Keeps the buffered messages' release on drop from needing the storage.
    shared: Option<Arc<Shared>>,
    /// Wake-ups for this queue: notifications, retries written, releases.
    wake: Option<Subscription>,
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
            fetch_now: true,
            next_visible_in: None,
            capacity: Capacity::default(),
            ensured: false,
            failures: 0,
            settle: None,
            linger_left: 0,
            shared: None,
            wake: None,
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
        if self.capacity.observe_ready(in_flight) && !self.buffer.is_empty() {
            tracing::debug!(
                queue = %shared.queue.name(),
                in_flight,
                released = self.buffer.len(),
                "worker is full; releasing claimed messages it cannot start"
            );
            self.release_buffer(shared);
        }
        if !self.buffer.is_empty() {
            // If the worker turns out to be full, the next poll_ready must come soon so the held
            // messages are released; wake once to make sure it does.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        shared: &Arc<Shared>,
        in_flight: usize,
    ) -> Poll<Option<Message>> {
        self.capacity.observe_next(in_flight);
        loop {
            if let Some(m) = self.buffer.pop_front() {
                // Skip anything whose lease we no longer hold (lost while buffered).
                if shared
                    .leases
                    .get(m.msg_id)
                    .is_some_and(|l| l.read_ct == m.read_ct)
                {
                    return Poll::Ready(Some(m));
                }
                continue;
            }
            match &mut self.state {
                State::Start => {
                    let ack = if self.wake.is_none() {
                        let (sub, ack) = shared.subscribe();
                        self.wake = Some(sub);
                        ack
                    } else {
                        None
                    };
                    self.state = State::Ensuring(Box::pin(ensure_queue(shared.clone(), ack)));
                }
                State::Ensuring(fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => {
                        self.ensured = true;
                        self.failures = 0;
                        self.fetch_now = true;
                        self.state = State::Idle;
                    }
                    Poll::Ready(Err(e)) => self.fail(shared, "preparing the queue", &e),
                },
                State::Idle => {
                    if self.fetch_now {
                        self.fetch_now = false;
                        let qty = self
                            .capacity
                            .claim(in_flight, shared.config.fetch_batch_size);
                        self.state = State::Fetching(Box::pin(fetch(shared.clone(), qty)));
                    } else if shared.announces()
                        && !shared.signal.announced_for(shared.config.poll_interval)
                    {
                        if self.linger_left > 0 {
                            // Just busy: more work is likely within milliseconds. Re-read shortly
                            // instead of arming, so a steady stream costs producers no NOTIFY.
                            self.linger_left -= 1;
                            self.state = State::Waiting(Box::pin(tokio::time::sleep(LINGER_STEP)));
                        } else {
                            self.state = State::Announcing(Box::pin(announce(shared.clone())));
                        }
                    } else if self.settle.is_some_and(|s| s.due <= Instant::now()) {
                        let shared = shared.clone();
                        self.state = State::Settling(Box::pin(async move {
                            crate::notify::inserts_settled(&shared.pool, shared.queue.name()).await
                        }));
                    } else if self.next_visible_in.is_none() {
                        let shared = shared.clone();
                        self.state = State::Probing(Box::pin(async move {
                            shared.queue.next_visible_in(&shared.pool).await
                        }));
                    } else {
                        let fallback =
                            jittered(shared.config.poll_interval, shared.config.poll_jitter);
                        let mut wait = self
                            .next_visible_in
                            .flatten()
                            .map_or(fallback, |d| d.min(fallback));
                        let now = Instant::now();
                        if let Some(due) = self.wake.as_ref().and_then(Subscription::due) {
                            wait = wait.min(due.saturating_duration_since(now));
                        }
                        if let Some(settle) = self.settle {
                            wait = wait.min(settle.due.saturating_duration_since(now));
                        }
                        self.state = State::Waiting(Box::pin(tokio::time::sleep(wait)));
                    }
                }
                State::Fetching(fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(messages)) => {
                        self.failures = 0;
                        let got = !messages.is_empty();
                        if got {
                            self.linger_left = shared.config.linger_polls();
                        }
                        self.fetch_now = got;
                        self.next_visible_in = None;
                        self.buffer.extend(messages);
                        self.state = State::Idle;
                    }
                    Poll::Ready(Err(e)) => self.fail(shared, "reading the queue", &e),
                },
                State::Probing(fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(next)) => {
                        self.next_visible_in = Some(next);
                        self.state = State::Idle;
                    }
                    Poll::Ready(Err(e)) => self.fail(shared, "reading the queue", &e),
                },
                State::Announcing(fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(result) => {
                        match result {
                            Ok(()) => {
                                // Inserts in flight before the announcement did not notify:
                                // check until they have all ended, then read once more.
                                self.settle = Some(Settle {
                                    due: Instant::now(),
                                    delay: SETTLE_FIRST,
                                });
                            }
                            Err(e) => {
                                tracing::warn!(queue = %shared.queue.name(), error = %e,
                                    "could not announce a waiting worker; relying on polling");
                                // Do not retry at once: wait as if announced.
                                shared.signal.set_announced(
                                    Instant::now() + shared.config.poll_interval * 2,
                                );
                            }
                        }
                        // With an announcement, the settle check comes first and then the
                        // read that sees everything committed before it; without, read now.
                        self.fetch_now = self.settle.is_none();
                        self.state = State::Idle;
                    }
                },
                State::Settling(fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(true)) => {
                        self.settle = None;
                        self.fetch_now = true;
                        self.state = State::Idle;
                    }
                    Poll::Ready(Ok(false)) => {
                        if let Some(s) = &mut self.settle {
                            s.delay = (s.delay * 2).min(SETTLE_MAX);
                            s.due = Instant::now() + s.delay;
                        }
                        self.state = State::Idle;
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(queue = %shared.queue.name(), error = %e,
                            "could not check for in-flight inserts; relying on polling");
                        self.settle = None;
                        self.state = State::Idle;
                    }
                },
                State::Waiting(sleep) => {
                    let wake = self.wake.as_mut().map_or(Wake::Nothing, |w| w.poll(cx));
                    match wake {
                        Wake::Now => {}
                        Wake::At(at) => {
                            if at < sleep.deadline() {
                                sleep.as_mut().reset(at);
                            }
                            continue;
                        }
                        Wake::Nothing => {
                            if sleep.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                            if self.settle.is_some_and(|s| s.due <= Instant::now()) {
                                // The settle timer, not the fallback: check, do not read.
                                self.state = State::Idle;
                                continue;
                            }
                        }
                    }
                    self.fetch_now = true;
                    self.state = State::Idle;
                }
                State::Backoff(sleep) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.fetch_now = true;
                    self.state = if self.ensured {
                        State::Idle
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
                    let in_progress = match std::mem::replace(&mut self.state, State::Closed) {
                        State::Fetching(fut) => Some(fut),
                        _ => None,
                    };
                    let held = self.take_buffer(shared);
                    let shared = shared.clone();
                    self.state = State::Closing(Box::pin(async move {
                        let mut held = held;
                        if let Some(fut) = in_progress {
                            // A read may already have claimed rows: see it through, then release them.
                            if let Ok(messages) = fut.await {
                                for m in &messages {
                                    if shared.leases.remove(m.msg_id, m.read_ct) {
                                        held.push((m.msg_id, m.read_ct));
                                    }
                                }
                            }
                        }
                        release(&shared, held).await;
                        shared.flush_completions().await;
                    }));
                }
            }
        }
    }

    fn fail(&mut self, shared: &Shared, what: &str, e: &crate::Error) {
        self.failures += 1;
        let wait = error_backoff(self.failures);
        if self.failures == 1 || self.failures.is_power_of_two() {
            tracing::error!(queue = %shared.queue.name(), error = %e, failures = self.failures,
                retry_in = ?wait, "worker backend: {what} failed");
        }
        self.state = State::Backoff(Box::pin(tokio::time::sleep(wait)));
    }

    /// Removes held messages from the lease table and returns their fencing tokens.
    fn take_buffer(&mut self, shared: &Shared) -> Vec<(i64, i32)> {
        self.buffer
            .drain(..)
            .filter(|m| shared.leases.remove(m.msg_id, m.read_ct))
            .map(|m| (m.msg_id, m.read_ct))
            .collect()
    }

    fn release_buffer(&mut self, shared: &Arc<Shared>) {
        let held = self.take_buffer(shared);
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
            if !self.buffer.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
                self.release_buffer(&shared);
            } else {
                self.take_buffer(&shared);
            }
        }
    }
}

/// When to check again for inserts that skipped notifying.
#[derive(Debug, Clone, Copy)]
struct Settle {
    due: Instant,
    delay: Duration,
}

const SETTLE_FIRST: Duration = Duration::from_millis(5);
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// Interval between re-reads while lingering after a busy period.
pub(crate) const LINGER_STEP: Duration = Duration::from_millis(2);

/// Arms this process's wake-up on the queue: the next insert notifies (once; an idle worker arms
/// again after each wake-up). Inserts already in flight did not notify: the fetcher then checks
/// until they have all ended (see `migrations/0002_notify.sql`) and reads once more, so none
/// slips through.
async fn announce(shared: Arc<Shared>) -> Result<()> {
    let ttl = shared.config.poll_interval * 2 + Duration::from_secs(5);
    let channel = shared.config.channels.queue_channel(shared.queue.name());
    // Mark armed before the write: a notification dispatched after this point (from an insert
    // that disarmed the row) clears the mark. Marking after the write could erase that clear and
    // leave every worker asleep on a disarmed row.
    shared.signal.set_announced(Instant::now() + ttl);
    if let Err(e) = crate::notify::want(
        &shared.pool,
        &channel,
        &shared.hub.owner,
        ttl.as_secs_f64(),
        false,
    )
    .await
    {
        shared.signal.clear_announced();
        return Err(e);
    }
    Ok(())
}

/// Makes held messages visible now. On failure they become visible when their lease lapses.
async fn release(shared: &Shared, held: Vec<(i64, i32)>) {
    if held.is_empty() {
        return;
    }
    match run_fenced(&shared.pool, &shared.sql.release, &held, 0.0).await {
        // Other workers of this process may be idle: they can take them now.
        Ok(_) => shared.signal.wake(),
        Err(e) => tracing::warn!(queue = %shared.queue.name(), error = %e, count = held.len(),
            "could not release held messages; they become visible when their lease lapses"),
    }
}

/// Creates the queue and its dead-letter queue if either is missing, installs the queue's
/// notification trigger when listening, and waits (briefly) for the LISTEN to be active so no
/// notification sent after the first read is missed.
async fn ensure_queue(shared: Arc<Shared>, listening: Option<oneshot::Receiver<()>>) -> Result<()> {
    for q in [&shared.queue, &shared.dlq] {
        if !q.tables_exist(&shared.pool).await? {
            q.create(&shared.pool).await?;
        }
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
    Ok(())
}

async fn fetch(shared: Arc<Shared>, qty: usize) -> Result<Vec<Message>> {
    let started = Instant::now();
    let vt = shared.config.visibility_timeout;
    let messages = shared.queue.read(&shared.pool, vt, qty).await?;
    if !messages.is_empty() {
        shared.leases.insert_many(messages.iter().map(|m| {
            (
                m.msg_id,
                Lease {
                    read_ct: m.read_ct,
                    expires: started + vt,
                },
            )
        }));
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_learned_from_saturation() {
        let mut c = Capacity::default();
        assert_eq!(c.claim(0, 100), 100, "unknown capacity: a full batch");
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
        assert_eq!(c.claim(2, 100), 1);
        assert_eq!(c.claim(0, 100), 3);
        // The limit grows if the worker later accepts more.
        c.observe_next(3);
        assert_eq!(c.limit(), Some(4));
        // Paused worker (full at 0) still claims one when asked.
        let mut p = Capacity::default();
        p.observe_ready(0);
        assert!(p.observe_ready(0));
        assert_eq!(p.limit(), Some(1));
        assert_eq!(p.claim(0, 100), 1);
    }
}
