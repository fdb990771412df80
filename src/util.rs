//! Small helpers shared by the backend's parts.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// 64 random bits. Not cryptographic: the standard library's per-process random hash keys
/// over a counter (claim tokens need only be unlikely to repeat, see `backend/lost.rs`).
pub(crate) fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// A random number in `[0, 1)` for jitter. Not cryptographic; seeded by the standard library's
/// per-process random hash keys, so processes started together still spread out.
pub(crate) fn random_unit() -> f64 {
    // 53 random bits as the mantissa of a double in [0, 1).
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// `base` moved up or down by a random fraction of at most `jitter`.
pub(crate) fn jittered(base: Duration, jitter: f64) -> Duration {
    let factor = 1.0 + jitter * (2.0 * random_unit() - 1.0);
    base.mul_f64(factor.max(0.0))
}

/// Delay before retrying after `failures` consecutive infrastructure errors (database down,
/// connection lost): 100 ms doubling to 10 s, with jitter. Keeps a worker from spinning.
pub(crate) fn error_backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(7);
    let base = Duration::from_millis(100) * 2u32.pow(exp);
    jittered(base.min(Duration::from_secs(10)), 0.25)
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [truncated, {} bytes in all]", &text[..end], text.len())
}

/// Text safe to store in `jsonb` and bounded: NUL characters (which `jsonb` rejects) are
/// written as the visible escape `\\u0000`, and the result is cut to at most about `max` bytes.
pub(crate) fn clean_text(text: &str, max: usize) -> String {
    if text.contains('\0') {
        truncate(&text.replace('\0', "\\u0000"), max)
    } else {
        truncate(text, max)
    }
}

/// Replaces a pool's "timed out waiting for a connection" by the reason connecting fails (one
/// direct attempt, at most 5 s): connection refused, authentication, too many clients.
pub(crate) async fn explain_pool_error(
    pool: &sqlx::PgPool,
    e: crate::error::Error,
) -> crate::error::Error {
    if !matches!(e, crate::error::Error::Database(sqlx::Error::PoolTimedOut)) {
        return e;
    }
    use sqlx::{ConnectOptions, Connection};
    let attempt = async { pool.connect_options().connect().await };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            e
        }
        Ok(Err(cause)) => match crate::error::Error::from(cause) {
            e @ (crate::error::Error::Unreachable { .. }
            | crate::error::Error::ConnectionRejected { .. }) => e,
            other => crate::error::Error::Unreachable {
                cause: other.to_string(),
            },
        },
        Err(_) => crate::error::Error::Unreachable {
            cause: "no answer from the server within 5 s".to_owned(),
        },
    }
}

/// A stop request a background service waits on, raised by its owner (the runtime). A service
/// whose owner is gone counts as asked to stop.
#[derive(Debug, Clone)]
pub(crate) struct Stop(tokio::sync::watch::Receiver<bool>);

impl Stop {
    /// A stop request and the switch that raises it.
    pub(crate) fn new() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Self(rx))
    }

    /// Resolves once stopping is requested.
    pub(crate) async fn requested(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether stopping was requested.
    pub(crate) fn is_requested(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_unit_is_in_range_and_varies() {
        let xs: Vec<f64> = (0..1000).map(|_| random_unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((0.4..0.6).contains(&mean), "mean {mean}");
    }

    #[test]
    fn error_backoff_grows_and_caps() {
        assert!(error_backoff(1) <= Duration::from_millis(125));
        assert!(error_backoff(30) <= Duration::from_millis(12_500));
        assert!(error_backoff(30) >= Duration::from_millis(7_500));
    }

    #[test]
    fn clean_text_escapes_nul_and_bounds_length() {
        assert_eq!(clean_text("a\0b", 100), "a\\u0000b");
        assert!(!clean_text(&"\0".repeat(10_000), 100).contains('\0'));
        assert!(clean_text(&"x".repeat(10_000), 100).len() < 200);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("abc", 10), "abc");
        let cut = truncate("ééé", 3);
        assert!(cut.starts_with('é') && cut.contains("truncated"));
    }
}
