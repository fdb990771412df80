//! Claims whose answer the worker lost.
//!
//! A claim leases messages in one statement. If its answer never arrives (a failover to a
//! synchronous standby, a connection cut between the commit and the answer, a statement
//! deadline that passed while the server still ran it), the claim may have committed: its
//! messages are then leased to a worker that does not know it holds them, and nothing runs
//! them until their visibility timeout ends. So each claim carries a token of the worker's,
//! and a claim that leases messages writes them to `apalis_pgmq.claim_log` under it, in the
//! same statement (`claims.recover_lost`, migration 0004).
//!
//! [`LostClaims`] keeps the tokens of the claims whose answer did not come, and says when to
//! look them up: at the worker's next claim (the fetch loop backs off on errors by itself), and
//! for a token not found (its claim did not commit, or has not yet: a claim past its deadline
//! may still be running on the server) again after 1 s, 2 s, 4 s, ... until the claim's lease
//! would have ended anyway. The lookup makes each message of a found claim visible again if its
//! row is still the version the claim wrote (its `xmin` is the claim's transaction): a message
//! anyone touched since is left alone, so a message is never taken from a worker that holds it.
//!
//! It also says when to delete the log's rows whose lease has ended ([`LostClaims::prune_due`]):
//! only after this worker logged claims, so an idle worker sends nothing.

use std::time::Duration;

use tokio::time::Instant;

/// The most tokens kept; past it the one whose lease ends first is forgotten (its messages wait
/// out their visibility timeout, as without the log).
pub(crate) const MAX_PENDING: usize = 64;

/// The first wait before looking again for a token that was not found; it doubles.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// How often a worker that logged claims deletes the log's rows past their lease.
pub(crate) const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// A claim whose answer did not come.
#[derive(Debug, Clone)]
struct Pending {
    token: String,
    /// Past this its messages' leases have ended (from when the claim was sent): looking is of
    /// no use.
    until: Instant,
    /// When to look next.
    next: Instant,
    /// Lookups that did not find it.
    misses: u32,
}

/// The tokens of a worker's claims whose answer was lost, and when to prune the log.
#[derive(Debug, Default)]
pub(crate) struct LostClaims {
    pending: Vec<Pending>,
    /// Claims were logged since the last prune.
    logged: bool,
    last_prune: Option<Instant>,
    /// A prune is running (one at a time per worker).
    pruning: bool,
    /// Messages given back so far (for the tests).
    released: u64,
}

impl LostClaims {
    /// A new claim token: a random UUID (version 4) as text.
    pub(crate) fn token() -> String {
        let hi = crate::util::random_u64();
        let lo = crate::util::random_u64();
        // Version 4, variant 10.
        let hi = (hi & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
        let lo = (lo & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            hi & 0xffff,
            lo >> 48,
            lo & 0xffff_ffff_ffff
        )
    }

    /// The claim under `token`, sent at `sent` with leases of `lease`, got no answer.
    pub(crate) fn lost(&mut self, token: String, sent: Instant, lease: Duration) {
        if self.pending.len() >= MAX_PENDING
            && let Some(first) = self
                .pending
                .iter()
                .enumerate()
                .min_by_key(|(_, p)| p.until)
                .map(|(i, _)| i)
        {
            self.pending.swap_remove(first);
        }
        self.pending.push(Pending {
            token,
            until: sent + lease,
            next: sent,
            misses: 0,
        });
    }

    /// The tokens to look up `now`; tokens whose leases have ended are forgotten.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<String> {
        self.pending.retain(|p| p.until > now);
        self.pending
            .iter()
            .filter(|p| p.next <= now)
            .map(|p| p.token.clone())
            .collect()
    }

    /// Whether any token waits (due or not).
    #[cfg(test)]
    fn any(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The lookup of `asked` found the claims `found` (they are done with) and gave back
    /// `released` messages; the others are looked for again later. A lookup that failed is
    /// reported the same way, with nothing found: it is tried again after the same waits, so
    /// a lookup that keeps failing never holds up every claim.
    pub(crate) fn looked(
        &mut self,
        asked: &[String],
        found: &[String],
        released: usize,
        now: Instant,
    ) {
        self.released += released as u64;
        self.pending.retain(|p| !found.contains(&p.token));
        for p in &mut self.pending {
            if asked.contains(&p.token) {
                p.next = now + FIRST_RETRY * 2u32.saturating_pow(p.misses.min(16));
                p.misses += 1;
            }
        }
    }

    /// Gives up on `asked` (the lookup failed for a reason of its own, not the connection's):
    /// their messages wait out their visibility timeout.
    pub(crate) fn give_up(&mut self, asked: &[String]) {
        self.pending.retain(|p| !asked.contains(&p.token));
    }

    /// A claim was written to the log.
    pub(crate) fn on_logged(&mut self) {
        self.logged = true;
    }

    /// Whether to delete the log's rows past their lease now (claims were logged since the
    /// last time, and [`PRUNE_EVERY`] passed); if so the time is taken.
    pub(crate) fn prune_due(&mut self, now: Instant) -> bool {
        if self.pruning || !self.logged || self.last_prune.is_some_and(|t| now < t + PRUNE_EVERY) {
            return false;
        }
        self.logged = false;
        self.last_prune = Some(now);
        self.pruning = true;
        true
    }

    /// The prune [`prune_due`](Self::prune_due) started has ended (done, failed or stopped).
    pub(crate) fn pruned(&mut self) {
        self.pruning = false;
    }

    /// Messages given back so far.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn released(&self) -> u64 {
        self.released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    #[test]
    fn tokens_are_uuids_and_differ() {
        let a = LostClaims::token();
        let b = LostClaims::token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "version 4: {a}");
        assert!(
            matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
            "variant 10: {a}"
        );
        assert!(a.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn a_lost_claim_is_looked_up_at_once_then_backs_off_until_its_lease_ends() {
        let t0 = Instant::now();
        let mut l = LostClaims::default();
        l.lost("a".into(), t0, LEASE);
        assert_eq!(l.due(t0), ["a"]);
        // Not found: again after 1 s, then 2 s, then 4 s.
        l.looked(&["a".into()], &[], 0, t0);
        assert!(l.due(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(l.due(t0 + Duration::from_secs(1)), ["a"]);
        l.looked(&["a".into()], &[], 0, t0 + Duration::from_secs(1));
        assert!(l.due(t0 + Duration::from_millis(2999)).is_empty());
        assert_eq!(l.due(t0 + Duration::from_secs(3)), ["a"]);
        l.looked(&["a".into()], &[], 0, t0 + Duration::from_secs(3));
        assert!(l.due(t0 + Duration::from_millis(6999)).is_empty());
        assert_eq!(l.due(t0 + Duration::from_secs(7)), ["a"]);
        // Its lease has ended: forgotten.
        assert!(l.due(t0 + LEASE).is_empty());
        assert!(!l.any());
    }

    #[test]
    fn a_found_claim_is_done_with_and_one_given_up_is_forgotten() {
        let t0 = Instant::now();
        let mut l = LostClaims::default();
        l.lost("a".into(), t0, LEASE);
        l.lost("b".into(), t0, LEASE);
        let asked = l.due(t0);
        assert_eq!(asked, ["a", "b"]);
        // A lookup that failed (the database out of reach) changes nothing: due again.
        assert_eq!(l.due(t0), ["a", "b"]);
        l.looked(&asked, &["b".into()], 3, t0);
        assert_eq!(l.released(), 3);
        assert!(l.due(t0 + Duration::from_secs(1)) == ["a"]);
        l.give_up(&["a".into()]);
        assert!(!l.any());
    }

    #[test]
    fn pending_tokens_are_bounded_and_the_one_ending_first_goes() {
        let t0 = Instant::now();
        let mut l = LostClaims::default();
        for i in 0..MAX_PENDING {
            l.lost(format!("t{i}"), t0 + Duration::from_millis(i as u64), LEASE);
        }
        l.lost("last".into(), t0 + Duration::from_secs(1), LEASE);
        let due = l.due(t0 + Duration::from_secs(1));
        assert_eq!(due.len(), MAX_PENDING);
        assert!(!due.contains(&"t0".to_owned()), "the oldest went");
        assert!(due.contains(&"last".to_owned()));
    }

    #[test]
    fn the_log_is_pruned_only_after_claims_were_logged_and_not_more_often_than_the_interval() {
        let t0 = Instant::now();
        let mut l = LostClaims::default();
        assert!(
            !l.prune_due(t0),
            "nothing logged: an idle worker sends nothing"
        );
        l.on_logged();
        assert!(l.prune_due(t0));
        assert!(!l.prune_due(t0), "nothing logged since");
        l.on_logged();
        assert!(!l.prune_due(t0 + PRUNE_EVERY - Duration::from_millis(1)));
        assert!(!l.prune_due(t0 + PRUNE_EVERY), "the first still runs");
        l.pruned();
        assert!(l.prune_due(t0 + PRUNE_EVERY));
    }
}
