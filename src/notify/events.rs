//! Typed queue events for applications that react to queue activity.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use serde::Deserialize;
use serde_json::Value;
use sqlx::PgPool;
use tokio::{sync::mpsc, time::Instant};

use super::{
    Hub, NotifyChannels, channel::check_part, hub, lock, triggers::enable_created_notify, unwant,
    want,
};
use crate::{
    error::{Error, Result},
    queue::QueueName,
};

/// Something that happened to a queue, decoded from a notification.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum QueueEvent {
    /// A queue was created (a row was added to `pgmq.meta`).
    QueueCreated {
        /// The new queue.
        queue: String,
    },
    /// One message was sent (signal only; read the queue to get it).
    MessageReady {
        /// The queue.
        queue: String,
        /// The message id.
        msg_id: i64,
        /// How long until it is visible (0 unless sent with a delay).
        visible_in: Duration,
        /// In per-message mode: the message did not fit the payload budget and is not inline.
        too_big: bool,
    },
    /// One message, inline (per-message mode, when the whole event fits the byte budget).
    Message {
        /// The queue.
        queue: String,
        /// The message id.
        msg_id: i64,
        /// How long until it is visible.
        visible_in: Duration,
        /// The message body.
        message: Value,
        /// The message headers.
        headers: Option<Value>,
    },
    /// One statement sent several messages.
    BatchReady {
        /// The queue.
        queue: String,
        /// The smallest message id of the batch.
        first_msg_id: i64,
        /// How many messages.
        count: i64,
        /// How long until the earliest of them is visible.
        visible_in: Duration,
    },
    /// Messages were sent to the queue (from an on-demand trigger, which carries no details;
    /// enable [`NotifyMode::Batch`](crate::NotifyMode) or `Message` for ids and counts).
    Activity {
        /// The queue.
        queue: String,
    },
    /// The listener reconnected: events sent while it was disconnected are lost. Read the
    /// queues you care about to catch up.
    Reconnected,
}

impl QueueEvent {
    /// The queue the event is about (`None` for [`QueueEvent::Reconnected`]).
    #[must_use]
    pub fn queue(&self) -> Option<&str> {
        match self {
            Self::QueueCreated { queue }
            | Self::MessageReady { queue, .. }
            | Self::Message { queue, .. }
            | Self::BatchReady { queue, .. }
            | Self::Activity { queue } => Some(queue),
            Self::Reconnected => None,
        }
    }
}

/// The JSON payload sent by the triggers (see `migrations/0001_baseline.sql`).
#[derive(Debug, Deserialize)]
pub(crate) struct Payload {
    pub(crate) e: String,
    pub(crate) q: String,
    #[serde(default)]
    id: Option<i64>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default)]
    pub(crate) d: Option<f64>,
    #[serde(default)]
    m: Option<Value>,
    #[serde(default)]
    h: Option<Value>,
    #[serde(default)]
    big: Option<bool>,
}

impl Payload {
    pub(crate) fn delay(&self) -> Duration {
        Duration::try_from_secs_f64(self.d.unwrap_or(0.0).max(0.0)).unwrap_or(Duration::ZERO)
    }

    fn into_event(self) -> Option<QueueEvent> {
        let visible_in = self.delay();
        Some(match self.e.as_str() {
            "created" => QueueEvent::QueueCreated { queue: self.q },
            "wake" => QueueEvent::Activity { queue: self.q },
            "ready" => QueueEvent::MessageReady {
                queue: self.q,
                msg_id: self.id?,
                visible_in,
                too_big: self.big.unwrap_or(false),
            },
            "message" => QueueEvent::Message {
                queue: self.q,
                msg_id: self.id?,
                visible_in,
                message: self.m.unwrap_or(Value::Null),
                headers: self.h.filter(|h| !h.is_null()),
            },
            "batch" => QueueEvent::BatchReady {
                queue: self.q,
                first_msg_id: self.id?,
                count: self.n?,
                visible_in,
            },
            _ => return None,
        })
    }
}

/// Listener counters (shared by everything that uses the same database in the process).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    received: AtomicU64,
    parse_errors: AtomicU64,
    reconnects: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

impl Stats {
    pub(crate) fn received(&self) {
        crate::obs::notification();
        self.received.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn parse_error(&self) {
        self.parse_errors.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn reconnected(&self) {
        crate::obs::reconnect();
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn snapshot(&self) -> ListenerStats {
        ListenerStats {
            received: self.received.load(Ordering::Relaxed),
            parse_errors: self.parse_errors.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of the listener's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Notifications received on the listening connection.
    pub received: u64,
    /// Notifications whose payload was not a valid event.
    pub parse_errors: u64,
    /// Times the listening connection was re-established.
    pub reconnects: u64,
    /// Events delivered to subscribers.
    pub delivered: u64,
    /// Events dropped because a subscriber's buffer stayed full past the send timeout.
    pub dropped: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct EventSender {
    tx: mpsc::Sender<QueueEvent>,
    send_timeout: Duration,
}

impl Hub {
    /// Handles one notification: wakes the queue's workers, then delivers the event.
    pub(crate) async fn dispatch(&self, channel: &str, payload: &str) {
        if let Some(watch) = self.result_watch_if_any(channel) {
            if let Some(w) = watch {
                w.announced(payload);
            }
            return;
        }
        let parsed: Payload = match serde_json::from_str(payload) {
            Ok(p) => p,
            Err(e) => {
                self.stats.parse_error();
                tracing::debug!(channel, error = %e, "ignoring a notification that is not an event");
                return;
            }
        };
        if let Some(signal) = self.signal_if_any(&parsed.q) {
            // Our arming is answered: a worker disarms the row and, idle again, re-arms.
            signal.answered();
            let delay = parsed.delay();
            if delay > Duration::from_millis(1) {
                signal.wake_at(Instant::now() + delay);
            } else {
                signal.wake();
            }
        }
        let senders: Vec<EventSender> = lock(&self.subscribers)
            .get(channel)
            .cloned()
            .unwrap_or_default();
        if senders.is_empty() {
            return;
        }
        let Some(event) = parsed.into_event() else {
            self.stats.parse_error();
            return;
        };
        self.deliver(&senders, event).await;
    }

    async fn deliver(&self, senders: &[EventSender], event: QueueEvent) {
        for s in senders {
            if s.tx.is_closed() {
                continue;
            }
            // Backpressure: wait for room, but not forever, so one stalled subscriber cannot
            // stop the process's wake-ups.
            match tokio::time::timeout(s.send_timeout, s.tx.send(event.clone())).await {
                Ok(Ok(())) => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        lock(&self.subscribers).retain(|_, v| {
            v.retain(|s| !s.tx.is_closed());
            !v.is_empty()
        });
    }

    /// After the listening connection is (re)established.
    pub(crate) async fn after_connect(&self, reconnected: bool) {
        self.forget_armings();
        self.wake_all();
        self.results_look_at_all();
        if reconnected {
            // Once per subscriber, however many channels it listens on.
            let mut all: Vec<EventSender> = Vec::new();
            for s in lock(&self.subscribers).values().flatten() {
                if !all.iter().any(|a| a.tx.same_channel(&s.tx)) {
                    all.push(s.clone());
                }
            }
            self.deliver(&all, QueueEvent::Reconnected).await;
        }
    }
}

/// What to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Topic {
    Queue(QueueName),
    Namespace(String),
    QueueCreated,
}

/// Builds a subscription to queue events.
///
/// Events come from the notification triggers: enable them per queue with
/// [`enable_notify`](crate::enable_notify) (a worker of this crate does it for its own queue),
/// choosing [`NotifyMode::Message`](crate::NotifyMode) for per-message events with the payload
/// inline. Queue-created events are enabled by subscribing to them.
///
/// A subscription to a queue and to its namespace receives each event twice.
///
/// # Example
///
/// ```no_run
/// use futures::StreamExt;
/// use apalis_pgmq_notify::{QueueEvents, QueueName};
///
/// # async fn run(pool: sqlx::PgPool) -> Result<(), apalis_pgmq_notify::Error> {
/// let mut events = QueueEvents::new(&pool)
///     .queue(&QueueName::new("email")?)
///     .namespace("billing")
///     .queue_created()
///     .subscribe()
///     .await?;
/// while let Some(event) = events.next().await {
///     println!("{event:?}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct QueueEvents {
    pool: PgPool,
    channels: NotifyChannels,
    topics: Vec<Topic>,
    buffer: usize,
    send_timeout: Duration,
}

impl QueueEvents {
    /// A subscription with the default channels, a 1024-event buffer and a 1 s send timeout.
    #[must_use]
    pub fn new(pool: &PgPool) -> Self {
        Self {
            pool: pool.clone(),
            channels: NotifyChannels::default(),
            topics: Vec::new(),
            buffer: 1024,
            send_timeout: Duration::from_secs(1),
        }
    }

    /// Uses these channel names (they must match the ones the triggers were enabled with).
    #[must_use]
    pub fn channels(mut self, channels: NotifyChannels) -> Self {
        self.channels = channels;
        self
    }

    /// Events of one queue.
    #[must_use]
    pub fn queue(mut self, queue: &QueueName) -> Self {
        self.topics.push(Topic::Queue(queue.clone()));
        self
    }

    /// Events of every queue in a namespace.
    #[must_use]
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.topics.push(Topic::Namespace(namespace.to_owned()));
        self
    }

    /// Queue-created events.
    #[must_use]
    pub fn queue_created(mut self) -> Self {
        self.topics.push(Topic::QueueCreated);
        self
    }

    /// Buffer size: events held for a slow reader before the listener waits (default 1024).
    #[must_use]
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events;
        self
    }

    /// How long the listener waits for room in a full buffer before dropping the event and
    /// counting it in [`ListenerStats::dropped`] (default 1 s). While it waits, notifications
    /// for the whole process queue up in PostgreSQL.
    #[must_use]
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// Starts listening; resolves once every LISTEN is active.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for no topics, a zero buffer, or an invalid namespace;
    /// [`Error::Database`] if the queue-created trigger cannot be installed;
    /// [`Error::Stopped`] if the listener could not LISTEN within 10 s.
    pub async fn subscribe(self) -> Result<EventStream> {
        if self.topics.is_empty() {
            return Err(Error::Config("subscribe to at least one topic".to_owned()));
        }
        if self.buffer == 0 {
            return Err(Error::Config(
                "event buffer must hold at least one event".to_owned(),
            ));
        }
        let mut channel_names = Vec::new();
        for topic in &self.topics {
            channel_names.push(match topic {
                Topic::Queue(q) => self.channels.queue_channel(q),
                Topic::Namespace(ns) => {
                    check_part("namespace", ns, crate::queue::MAX_QUEUE_NAME_LEN)?;
                    self.channels.namespace_channel(ns)
                }
                Topic::QueueCreated => {
                    enable_created_notify(&self.pool, &self.channels).await?;
                    self.channels.created_channel()
                }
            });
        }
        channel_names.sort();
        channel_names.dedup();
        let hub = hub(&self.pool);
        let (tx, rx) = mpsc::channel(self.buffer);
        let sender = EventSender {
            tx,
            send_timeout: self.send_timeout,
        };
        {
            let mut subs = lock(&hub.subscribers);
            for c in &channel_names {
                subs.entry(c.clone()).or_default().push(sender.clone());
            }
        }
        for c in &channel_names {
            let ack = hub.listen(c.clone());
            match tokio::time::timeout(Duration::from_secs(10), ack).await {
                Ok(Ok(())) => {}
                _ => return Err(Error::Stopped("the listener could not LISTEN within 10 s")),
            }
        }
        // Announce the subscription so on-demand triggers notify, and keep it fresh.
        let owner = format!(
            "{}.ev{}",
            hub.owner,
            SUBSCRIPTIONS.fetch_add(1, Ordering::Relaxed)
        );
        for c in &channel_names {
            want(&self.pool, c, &owner, REGISTRATION_TTL.as_secs_f64(), true).await?;
        }
        // Committed: producers that cached "nobody waits" look again.
        super::wakeup::listeners_changed(&self.pool).await?;
        let refresher = {
            let (pool, owner, channels) = (self.pool.clone(), owner.clone(), channel_names.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REGISTRATION_TTL / 3).await;
                    for c in &channels {
                        if let Err(e) =
                            want(&pool, c, &owner, REGISTRATION_TTL.as_secs_f64(), true).await
                        {
                            tracing::debug!(error = %e, "could not refresh an event subscription");
                        }
                    }
                }
            })
        };
        Ok(EventStream {
            stats: hub.stats.clone(),
            _hub: hub,
            rx,
            _registration: Some(Registration {
                pool: self.pool.clone(),
                owner,
                channels: channel_names,
                refresher,
            }),
        })
    }
}

/// How long an event subscription's announcement lasts without a refresh.
const REGISTRATION_TTL: Duration = Duration::from_secs(90);

static SUBSCRIPTIONS: AtomicU64 = AtomicU64::new(0);

/// An event subscription's rows in `apalis_pgmq.listeners`.
struct Registration {
    pool: PgPool,
    owner: String,
    channels: Vec<String>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.refresher.abort();
        if tokio::runtime::Handle::try_current().is_ok() {
            let (pool, owner, channels) = (
                self.pool.clone(),
                std::mem::take(&mut self.owner),
                std::mem::take(&mut self.channels),
            );
            tokio::spawn(async move {
                for c in &channels {
                    let _ = unwant(&pool, c, &owner).await;
                }
            });
        }
    }
}

/// A stream of [`QueueEvent`]s. Dropping it ends the subscription.
pub struct EventStream {
    rx: mpsc::Receiver<QueueEvent>,
    stats: Arc<Stats>,
    _hub: Arc<Hub>,
    _registration: Option<Registration>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl EventStream {
    /// The listener's counters.
    #[must_use]
    pub fn stats(&self) -> ListenerStats {
        self.stats.snapshot()
    }
}

impl Stream for EventStream {
    type Item = QueueEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<QueueEvent>> {
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_decode_to_events() {
        let p: Payload =
            serde_json::from_str(r#"{"e":"batch","q":"a","id":5,"n":1000,"d":0}"#).expect("json");
        assert_eq!(
            p.into_event(),
            Some(QueueEvent::BatchReady {
                queue: "a".into(),
                first_msg_id: 5,
                count: 1000,
                visible_in: Duration::ZERO
            })
        );
        let p: Payload =
            serde_json::from_str(r#"{"e":"ready","q":"a","id":7,"n":1,"d":2.5}"#).expect("json");
        assert_eq!(
            p.into_event(),
            Some(QueueEvent::MessageReady {
                queue: "a".into(),
                msg_id: 7,
                visible_in: Duration::from_millis(2500),
                too_big: false
            })
        );
        let p: Payload = serde_json::from_str(
            r#"{"e":"message","q":"a","id":7,"n":1,"d":0,"m":{"x":"é"},"h":null}"#,
        )
        .expect("json");
        assert!(matches!(
            p.into_event(),
            Some(QueueEvent::Message { headers: None, .. })
        ));
        let p: Payload = serde_json::from_str(r#"{"e":"weird","q":"a"}"#).expect("json");
        assert_eq!(p.into_event(), None);
    }
}
