//! Wake signals: how workers learn that a queue may have work, now or at a known time.
//!
//! One [`WakeSignal`] exists per queue in a runtime. It is raised by the shared
//! listener when a notification arrives or after it reconnects, by the completer when it sets a
//! retry's visibility time, and when held messages are released. It also holds this process's
//! arming of the queue's wake-up (the protocol is in `wakeup.rs`). Each worker holds a
//! [`Subscription`] and polls it while it waits.

use std::{
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Waker},
};

use tokio::time::Instant;

use super::wakeup::Arming;

/// What a subscription saw since it last looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Nothing new.
    Nothing,
    /// Work may be available now.
    Now,
    /// Work becomes available at this time.
    At(Instant),
}

#[derive(Debug, Default)]
pub(crate) struct WakeSignal {
    /// Bumped for "work may be available now".
    now: AtomicU64,
    /// Bumped when `due` moves earlier.
    due_gen: AtomicU64,
    /// The earliest time work is known to become visible (may be in the past: then stale).
    due: Mutex<Option<Instant>>,
    /// Waiting subscribers.
    wakers: Mutex<Vec<Waker>>,
    /// This runtime's arming of the queue's wake-up in `apalis_pgmq.listeners` (see
    /// `wakeup.rs`): on-demand triggers notify while it is armed.
    arming: Mutex<Arming>,
    /// The channel this process's arming row is on, to disarm it when a notification answers
    /// it: set by the first worker of the queue in the runtime.
    arming_channel: Mutex<Option<String>>,
    /// Workers of this queue in the process (their fetchers), to remove the arming with the last.
    workers: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl WakeSignal {
    /// Work may be available now: wake every waiting subscriber.
    pub(crate) fn wake(&self) {
        self.now.fetch_add(1, Ordering::SeqCst);
        self.wake_all();
    }

    /// Work becomes available at `at`: subscribers sleeping past it shorten their sleep.
    pub(crate) fn wake_at(&self, at: Instant) {
        {
            let mut due = lock(&self.due);
            let now = Instant::now();
            let earlier = match *due {
                Some(d) if d > now => at < d,
                _ => true,
            };
            if !earlier {
                return;
            }
            *due = Some(at);
        }
        self.due_gen.fetch_add(1, Ordering::SeqCst);
        self.wake_all();
    }

    /// The earliest known future time work becomes visible.
    #[cfg(test)]
    pub(crate) fn due(&self) -> Option<Instant> {
        lock(&self.due).filter(|d| *d > Instant::now())
    }

    /// Whether an idle worker should arm: no arming, or one that ends within `margin`.
    pub(crate) fn wants_arming(&self, margin: std::time::Duration) -> bool {
        lock(&self.arming).wanted(Instant::now(), margin)
    }

    /// Records an arming for `ttl` (before it is written: a notification answering it may
    /// arrive before the write returns) and returns its generation.
    pub(crate) fn begin_arm(&self, ttl: std::time::Duration) -> u64 {
        lock(&self.arming).begin(Instant::now(), ttl)
    }

    /// The arming of `generation` could not be written.
    pub(crate) fn arm_failed(&self, generation: u64) {
        lock(&self.arming).failed(generation);
    }

    /// Sets the channel the arming row is on (once per queue and runtime).
    pub(crate) fn arm_on(&self, channel: String) {
        lock(&self.arming_channel).get_or_insert(channel);
    }

    /// A wake-up notification arrived: the arming is answered. Returns the row to disarm (its
    /// channel and generation), which the runtime disarms at once in the background (so a busy
    /// queue stops costing producers notifications even while every worker is full); an idle
    /// worker arms again with a new generation. A late disarm matches only the generation it
    /// answered.
    pub(crate) fn answered(&self) -> Option<(String, u64)> {
        let generation = lock(&self.arming).answered()?;
        let channel = lock(&self.arming_channel).clone()?;
        Some((channel, generation))
    }

    /// Forgets the arming (after a reconnect the row may be gone or stale), so an idle worker
    /// arms again with a new generation.
    pub(crate) fn forget_arming(&self) {
        lock(&self.arming).forget();
    }

    /// A worker of this queue starts.
    pub(crate) fn worker_started(&self) {
        self.workers.fetch_add(1, Ordering::SeqCst);
    }

    /// A worker of this queue stops; `true` if it was the last in the process.
    pub(crate) fn worker_stopped(&self) -> bool {
        self.workers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok_and(|before| before == 1)
    }

    fn wake_all(&self) {
        let wakers = std::mem::take(&mut *lock(&self.wakers));
        for w in wakers {
            w.wake();
        }
    }

    /// A new subscription that sees only what happens from now on.
    pub(crate) fn subscribe(self: &std::sync::Arc<Self>) -> Subscription {
        Subscription {
            seen_now: self.now.load(Ordering::SeqCst),
            seen_due: self.due_gen.load(Ordering::SeqCst),
            signal: self.clone(),
        }
    }
}

/// A worker's view of a [`WakeSignal`].
pub(crate) struct Subscription {
    signal: std::sync::Arc<WakeSignal>,
    seen_now: u64,
    seen_due: u64,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    fn check(&mut self) -> Wake {
        let now = self.signal.now.load(Ordering::SeqCst);
        if now != self.seen_now {
            self.seen_now = now;
            self.seen_due = self.signal.due_gen.load(Ordering::SeqCst);
            return Wake::Now;
        }
        let due_gen = self.signal.due_gen.load(Ordering::SeqCst);
        if due_gen != self.seen_due {
            self.seen_due = due_gen;
            return match *lock(&self.signal.due) {
                Some(at) if at > Instant::now() => Wake::At(at),
                Some(_) => Wake::Now,
                None => Wake::Nothing,
            };
        }
        Wake::Nothing
    }

    /// What happened since the last look, without waiting.
    pub(crate) fn take(&mut self) -> Wake {
        self.check()
    }

    /// Waits until something happens.
    pub(crate) async fn next(&mut self) -> Wake {
        std::future::poll_fn(|cx| match self.poll(cx) {
            Wake::Nothing => std::task::Poll::Pending,
            seen => std::task::Poll::Ready(seen),
        })
        .await
    }

    /// What happened since the last poll; registers the waker when nothing did.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Wake {
        let seen = self.check();
        if seen != Wake::Nothing {
            return seen;
        }
        {
            let mut wakers = lock(&self.signal.wakers);
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
        }
        // Raised between the check and the registration: report it now.
        self.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{sync::Arc, time::Duration};

    fn noop_cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[tokio::test]
    async fn wake_now_and_at() {
        let signal = Arc::new(WakeSignal::default());
        let mut a = signal.subscribe();
        let mut cx = noop_cx();
        assert_eq!(a.poll(&mut cx), Wake::Nothing);
        signal.wake();
        assert_eq!(a.poll(&mut cx), Wake::Now);
        assert_eq!(a.poll(&mut cx), Wake::Nothing);
        let later = Instant::now() + Duration::from_secs(60);
        signal.wake_at(later);
        assert_eq!(a.poll(&mut cx), Wake::At(later));
        // A later time does not replace an earlier pending one.
        signal.wake_at(later + Duration::from_secs(1));
        assert_eq!(a.poll(&mut cx), Wake::Nothing);
        assert_eq!(signal.due(), Some(later));
        let sooner = Instant::now() + Duration::from_secs(5);
        signal.wake_at(sooner);
        assert_eq!(a.poll(&mut cx), Wake::At(sooner));
        // A subscription made later does not see earlier wakes.
        let mut b = signal.subscribe();
        assert_eq!(b.poll(&mut cx), Wake::Nothing);
    }
}
