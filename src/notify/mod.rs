//! LISTEN/NOTIFY: channel names, the insert triggers and their modes, the wake-up protocol, the
//! per-queue wake signals, the listener connection, and typed events.
//!
//! Notifications are hints: workers also keep a jittered fallback poll and wake at known
//! visibility times (see `wakeup.rs` for the protocol and why no committed job is left
//! behind). The listener and everything it feeds are owned by a [`Runtime`](crate::Runtime).

mod channel;
pub(crate) mod events;
pub(crate) mod listener;
mod signal;
mod triggers;
pub(crate) mod wakeup;

use sqlx::{PgExecutor, PgPool};

pub(crate) use channel::check_part;
pub use channel::{
    DEFAULT_NAMESPACE, DEFAULT_NAMESPACE_PATTERN, MAX_CHANNEL_LEN, MAX_PREFIX_LEN, NotifyChannels,
};
pub use events::{ListenerStats, QueueEvent};
pub(crate) use signal::{Subscription, Wake, WakeSignal};
pub(crate) use triggers::ensure_notify;
pub use triggers::{
    DEFAULT_MESSAGE_PAYLOAD_BYTES, NotifyMode, disable_notify, enable_created_notify,
    enable_notify, notify_migration_sql, notify_mode,
};

/// The default [`Config::listener_health_check`](crate::Config::listener_health_check).
pub(crate) const DEFAULT_HEALTH_CHECK_MS: u64 = 10_000;

/// Registers `owner` on `channel` for `secs` seconds: inserts notify while it is armed (every
/// insert, when `persistent`: event subscribers).
pub(crate) async fn want<'c, E: PgExecutor<'c>>(
    executor: E,
    channel: &str,
    owner: &str,
    secs: f64,
    persistent: bool,
) -> crate::error::Result<()> {
    sqlx::query(crate::sql::WANT_NOTIFY)
        .bind(channel)
        .bind(owner)
        .bind(secs)
        .bind(persistent)
        .execute(executor)
        .await?;
    Ok(())
}

/// Removes `owner`'s row on `channel` (an event subscription ending, the last worker of a queue
/// in this process stopping).
pub(crate) async fn unwant<'c, E: PgExecutor<'c>>(
    executor: E,
    channel: &str,
    owner: &str,
) -> crate::error::Result<()> {
    sqlx::query(crate::sql::UNWANT_NOTIFY)
        .bind(channel)
        .bind(owner)
        .execute(executor)
        .await?;
    Ok(())
}

/// Removes every row of `owner` (a runtime) and of its event subscriptions: the runtime stops.
pub(crate) async fn forget_owner(pool: &PgPool, owner: &str) -> crate::error::Result<u64> {
    let done = sqlx::query(crate::sql::FORGET_LISTENER_OWNER)
        .bind(owner)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
