//! How much a worker claims, and when it claims again before the last claim is used up.
//!
//! Two things limit a worker that runs jobs as fast as PostgreSQL hands them out: the round
//! trip of each claim (nothing runs while the worker waits for it) and the per-statement cost
//! of small claims. So, with [`Config::adaptive_claims`](crate::Config::adaptive_claims) on:
//!
//! - **Size.** The first claim is `fetch_batch_size`. A claim that came back full while the
//!   worker had already started everything it held (it was waiting for the claim) doubles the
//!   size, up to `max_fetch_batch_size`. A worker found full with messages still held halves it
//!   (not below `min(fetch_batch_size, 10)`).
//! - **Overlap.** While claims come back full (a backlog) and even the fastest recent claim
//!   takes [`OVERLAP_FROM`] or more (the database is far, or claims are large enough that the
//!   server's work is that long), the next claim is sent before the held messages are used up:
//!   up to [`Claims::max_reads`] claims in flight, each on its own connection, so the waits
//!   overlap instead of adding up. Small, fast claims do not overlap: concurrent small claims
//!   only slow each other down (measured next to the database with claims of 100 to 1 000 and
//!   overlap from the first claim: one at a time burned down 1.6x faster).
//! - **Bound.** Once the worker's concurrency is known (see `fetch.rs`), running jobs, held
//!   messages and claims in flight together stay within the concurrency plus an allowance:
//!   twice the messages the worker starts during one claim's round trip (measured), at most
//!   four times the concurrency. With a database next door that allowance is a handful of
//!   messages; 100 ms away it is what keeps the worker busy while the next claim travels. When
//!   the worker is full and holds more than the allowance, the excess is released at once for
//!   other workers (and the size shrinks). Before the concurrency is known (the worker never
//!   filled up), at most two claims' worth is held or in flight.
//!
//! Off: one claim of `fetch_batch_size` at a time, sent when everything held has been started,
//! and a full worker releases everything it holds (the behaviour before 0.2).

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Config;

/// With [`Config::priorities`](crate::Config::priorities), one claim in this many takes the
/// messages visible longest whatever their priority, so a steady stream of high-priority jobs
/// cannot starve the others: a low-priority job waits at most for the claims it takes to reach
/// it in visibility order, each of them eight claims apart.
pub const FAIR_EVERY: u64 = 8;

/// Most claims in flight at once for one worker.
pub(crate) const MAX_READS: usize = 4;

/// Claims overlap only when the fastest recent claim takes at least this long: the worker
/// waits long enough per claim for a second one to pay for the contention (each concurrent
/// claim skips the rows the other locked).
pub(crate) const OVERLAP_FROM: Duration = Duration::from_millis(2);

/// Claim sizing and overlap for one worker.
#[derive(Debug, Clone)]
pub(crate) struct Claims {
    adaptive: bool,
    size: usize,
    min: usize,
    max: usize,
    max_reads: usize,
    /// Smoothed round trip of a claim, in seconds.
    latency: Option<f64>,
    /// The fastest recent claim, in seconds (rises slowly if claims get slower for good).
    fastest: Option<f64>,
    /// Smoothed messages started per second.
    rate: f64,
    started: u64,
    mark: Option<(Instant, u64)>,
    /// The last claim that came back was full: more is probably waiting.
    more_waiting: bool,
    /// Claims sent so far, for the priority fairness rotation.
    sent: u64,
    /// Outcomes the completer writes per statement.
    completion_batch: usize,
    priorities: bool,
}

impl Claims {
    /// `pool_connections`: the pool's maximum size; overlapping claims use at most a quarter.
    pub(crate) fn new(config: &Config, pool_connections: u32) -> Self {
        let first = config.claims.batch_size.max(1);
        let adaptive = config.claims.adaptive;
        Self {
            adaptive,
            size: first,
            min: first.min(10),
            max: if adaptive {
                config.claims.max_batch_size.max(first)
            } else {
                first
            },
            max_reads: if adaptive {
                (pool_connections as usize / 4).clamp(1, MAX_READS)
            } else {
                1
            },
            latency: None,
            fastest: None,
            rate: 0.0,
            started: 0,
            mark: None,
            more_waiting: false,
            sent: 0,
            completion_batch: config.outcomes.batch_size,
            priorities: config.claims.priorities,
        }
    }

    /// A claim is being sent: whether it picks by priority (every claim but one in
    /// [`FAIR_EVERY`] when priorities are on).
    pub(crate) fn next_by_priority(&mut self) -> bool {
        self.sent += 1;
        self.priorities && !self.sent.is_multiple_of(FAIR_EVERY)
    }

    #[cfg(test)]
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    #[cfg(test)]
    pub(crate) fn max_reads(&self) -> usize {
        self.max_reads
    }

    /// A held message was handed to the worker.
    pub(crate) fn on_started(&mut self) {
        self.started += 1;
    }

    /// A claim of `requested` returned `got` after `latency`; `worker_waited`: nothing was held
    /// when it arrived and the worker had room.
    pub(crate) fn on_read(
        &mut self,
        now: Instant,
        requested: usize,
        got: usize,
        latency: Duration,
        worker_waited: bool,
    ) {
        let l = latency.as_secs_f64();
        self.latency = Some(self.latency.map_or(l, |s| 0.7 * s + 0.3 * l));
        self.fastest = Some(
            self.fastest
                .map_or(l, |f| if l < f { l } else { f + 0.05 * (l - f) }),
        );
        match self.mark {
            Some((at, n)) if now.duration_since(at) >= Duration::from_millis(20) => {
                let inst = (self.started - n) as f64 / now.duration_since(at).as_secs_f64();
                self.rate = 0.7 * self.rate + 0.3 * inst;
                self.mark = Some((now, self.started));
            }
            Some(_) => {}
            None => self.mark = Some((now, self.started)),
        }
        self.more_waiting = got > 0 && got >= requested;
        if self.adaptive && self.more_waiting && requested >= self.size && worker_waited {
            self.size = (self.size * 2).min(self.max);
        }
    }

    /// A claim cycle ended (the queue looked empty, or an error): start measuring afresh.
    pub(crate) fn on_idle(&mut self) {
        self.more_waiting = false;
        self.mark = None;
        self.rate = 0.0;
    }

    /// The worker was full with messages still held.
    pub(crate) fn on_saturated(&mut self) {
        if self.adaptive {
            self.size = (self.size / 2).max(self.min);
        }
    }

    /// Messages held or coming beyond the worker's concurrency: twice what it starts during one
    /// claim's round trip, at most four times its concurrency; none when claims do not adapt.
    pub(crate) fn allowance(&self, limit: Option<usize>) -> usize {
        if !self.adaptive {
            return 0;
        }
        let want = (2.0 * self.rate * self.latency.unwrap_or(0.0)).round();
        let cap = limit.map_or(self.max, |l| 4 * l);
        if want.is_finite() && want > 0.0 {
            (want as usize).min(cap)
        } else {
            0
        }
    }

    /// Room for more claimed messages: the budget minus running, held and in-flight ones.
    fn room(&self, limit: Option<usize>, in_flight: usize, held: usize, pending: usize) -> usize {
        match limit {
            Some(l) => (l + self.allowance(limit)).saturating_sub(in_flight + held + pending),
            None => (2 * self.size).saturating_sub(held + pending),
        }
    }

    /// The size of a claim the wake-up plan asked for (nothing held, nothing in flight).
    pub(crate) fn first(&self, limit: Option<usize>, in_flight: usize) -> usize {
        self.room(limit, in_flight, 0, 0).clamp(1, self.size)
    }

    /// Unwritten outcomes beyond which the worker waits for the completer before claiming
    /// more: two of the largest claims or of the completer's statements, whichever is larger.
    pub(crate) fn backlog_cap(&self) -> usize {
        2 * self.max.max(self.completion_batch)
    }

    /// Whether to send another claim now, and its size: only while claims come back full,
    /// with fewer than [`max_reads`](Self::max_reads) in flight and room for a worthwhile
    /// claim.
    pub(crate) fn another(
        &self,
        limit: Option<usize>,
        in_flight: usize,
        held: usize,
        pending: usize,
        reads: usize,
    ) -> Option<usize> {
        if !self.adaptive || !self.more_waiting || reads >= self.max_reads {
            return None;
        }
        if self.fastest.is_none_or(|f| f < OVERLAP_FROM.as_secs_f64()) {
            return None;
        }
        let room = self.room(limit, in_flight, held, pending);
        // Worth a round trip: with nothing held or coming, the room would take `2 * max_reads`
        // such claims; smaller ones would trickle.
        let open = self.room(limit, in_flight, 0, 0);
        let worthwhile = (open / (2 * self.max_reads)).clamp(1, self.size);
        (room >= worthwhile).then(|| room.min(self.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(first: usize, max: usize, pool: u32) -> Claims {
        Claims::new(
            &Config::default()
                .fetch_batch_size(first)
                .max_fetch_batch_size(max),
            pool,
        )
    }

    #[test]
    fn grows_while_full_claims_find_the_worker_waiting_and_shrinks_when_full() {
        let mut c = claims(100, 1000, 10);
        let t = Instant::now();
        let ms = Duration::from_millis(1);
        c.on_read(t, 100, 100, ms, true);
        assert_eq!(c.size(), 200);
        // The worker still held messages when the claim arrived: no growth.
        c.on_read(t, 200, 200, ms, false);
        assert_eq!(c.size(), 200);
        // A partial claim: the backlog is ending, no growth, no overlap.
        c.on_read(t, 200, 50, ms, true);
        assert_eq!(c.size(), 200);
        assert_eq!(c.another(None, 0, 0, 0, 1), None);
        for _ in 0..10 {
            let s = c.size();
            c.on_read(t, s, s, ms, true);
        }
        assert_eq!(c.size(), 1000, "capped at max_fetch_batch_size");
        for _ in 0..20 {
            c.on_saturated();
        }
        assert_eq!(c.size(), 10, "floor: min(fetch_batch_size, 10)");
    }

    #[test]
    fn fixed_claims_never_adapt_overlap_or_hold() {
        let mut c = Claims::new(
            &Config::default()
                .fetch_batch_size(100)
                .adaptive_claims(false),
            40,
        );
        let t = Instant::now();
        c.on_read(t, 100, 100, Duration::from_millis(5), true);
        c.on_saturated();
        assert_eq!(c.size(), 100);
        assert_eq!(c.max_reads(), 1);
        assert_eq!(c.another(None, 0, 0, 0, 0), None);
        assert_eq!(c.allowance(Some(10)), 0);
        assert_eq!(c.first(Some(10), 4), 6, "never beyond capacity");
        assert_eq!(c.backlog_cap(), 1000, "two completer statements of 500");
        assert_eq!(
            c.first(Some(10), 10),
            1,
            "a full worker still claims one when asked"
        );
    }

    #[test]
    fn overlap_is_bounded_by_reads_room_and_pool() {
        assert_eq!(
            claims(100, 1000, 2).max_reads(),
            1,
            "a tiny pool: no overlap"
        );
        assert_eq!(claims(100, 1000, 10).max_reads(), 2);
        assert_eq!(claims(100, 1000, 100).max_reads(), MAX_READS);
        let mut c = claims(100, 1000, 100);
        let t = Instant::now();
        // Next to the database (claims take 1 ms): no overlap, one claim at a time.
        c.on_read(t, 100, 100, Duration::from_millis(1), false);
        assert_eq!(c.another(None, 0, 0, 0, 1), None);
        // Far away (claims take 10 ms or more, even the fastest): overlap.
        let mut c = claims(100, 1000, 100);
        c.on_read(t, 100, 100, Duration::from_millis(10), false);
        // Unknown concurrency: up to two claims' worth held or in flight.
        assert_eq!(c.another(None, 0, 0, 0, 1), Some(100));
        assert_eq!(c.another(None, 0, 60, 0, 1), Some(100));
        assert_eq!(c.another(None, 0, 0, 100, 1), Some(100));
        assert_eq!(
            c.another(None, 0, 90, 100, 1),
            None,
            "two claims' worth held or coming"
        );
        assert_eq!(
            c.another(None, 0, 0, 0, MAX_READS),
            None,
            "reads in flight capped"
        );
        // Known concurrency 50, nothing measured yet (no allowance): room is 50 - running.
        assert_eq!(c.another(Some(50), 50, 0, 0, 1), None, "full");
        assert_eq!(c.another(Some(50), 10, 0, 0, 1), Some(40));
        assert_eq!(
            c.another(Some(50), 10, 38, 0, 1),
            None,
            "room too small to be worth a claim"
        );
        assert_eq!(
            c.another(Some(50), 45, 0, 0, 1),
            Some(5),
            "small, but a fair share"
        );
    }

    #[test]
    fn allowance_follows_rate_times_round_trip_and_is_capped() {
        let mut c = claims(100, 1000, 40);
        let t0 = Instant::now();
        c.on_read(t0, 100, 100, Duration::from_millis(100), false);
        // 1 000 messages started in 100 ms: 10 000/s, round trip 100 ms.
        for _ in 0..1000 {
            c.on_started();
        }
        for i in 1..=20 {
            c.on_read(
                t0 + Duration::from_millis(100 * i),
                100,
                100,
                Duration::from_millis(100),
                false,
            );
            for _ in 0..1000 {
                c.on_started();
            }
        }
        assert_eq!(
            c.allowance(Some(200)),
            800,
            "capped at four times the concurrency"
        );
        let a = c.allowance(Some(10_000));
        assert!(
            (1800..=2000).contains(&a),
            "about 2 x 10 000/s x 0.1 s, got {a}"
        );
        // Long jobs next door: nothing extra is held.
        let mut slow = claims(100, 1000, 40);
        slow.on_read(t0, 1, 1, Duration::from_millis(1), false);
        for i in 1..=10 {
            slow.on_started();
            slow.on_read(
                t0 + Duration::from_secs(i),
                1,
                1,
                Duration::from_millis(1),
                false,
            );
        }
        assert_eq!(slow.allowance(Some(10)), 0);
        slow.on_idle();
        assert_eq!(slow.allowance(Some(10)), 0);
    }
}
