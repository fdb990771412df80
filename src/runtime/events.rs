//! Event subscriptions: applications that react to queue activity get a stream of
//! [`QueueEvent`]s, fed by the runtime's listener.

use std::{
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::sync::mpsc;

use super::{
    Runtime, lock,
    maintenance::{Chore, SUBSCRIPTION_TTL},
};
use crate::{
    error::{Error, Result},
    notify::{ListenerStats, NotifyChannels, QueueEvent, check_part, enable_created_notify, want},
    queue::QueueName,
};

/// Where the listener sends one subscription's events.
#[derive(Debug, Clone)]
pub(crate) struct EventSender {
    tx: mpsc::Sender<QueueEvent>,
    send_timeout: Duration,
}

impl EventSender {
    /// Sends, waiting for room at most the send timeout (one stalled subscriber cannot stop the
    /// runtime's wake-ups); whether it was delivered.
    pub(crate) async fn deliver(&self, event: QueueEvent) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        matches!(
            tokio::time::timeout(self.send_timeout, self.tx.send(event)).await,
            Ok(Ok(()))
        )
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.tx.same_channel(&other.tx)
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
/// # async fn run(runtime: apalis_pgmq_notify::Runtime) -> Result<(), apalis_pgmq_notify::Error> {
/// let mut events = QueueEvents::new(&runtime)
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
    runtime: Runtime,
    channels: NotifyChannels,
    topics: Vec<Topic>,
    buffer: usize,
    send_timeout: Duration,
}

impl QueueEvents {
    /// A subscription, fed by `runtime`'s listener, with the default channels, a 1024-event
    /// buffer and a 1 s send timeout.
    #[must_use]
    pub fn new(runtime: &Runtime) -> Self {
        Self {
            runtime: runtime.clone(),
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
    /// [`Error::Stopped`] if the listener could not LISTEN within 10 s, or the runtime is shut
    /// down.
    pub async fn subscribe(self) -> Result<EventStream> {
        if self.topics.is_empty() {
            return Err(Error::config("topics", "subscribe to at least one topic"));
        }
        if self.buffer == 0 {
            return Err(Error::config(
                "buffer",
                "the event buffer must hold at least one event",
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
                    enable_created_notify(self.runtime.pool(), &self.channels).await?;
                    self.channels.created_channel()
                }
            });
        }
        channel_names.sort();
        channel_names.dedup();
        let inner = &self.runtime.inner;
        inner.check_running()?;
        let (tx, rx) = mpsc::channel(self.buffer);
        let sender = EventSender {
            tx,
            send_timeout: self.send_timeout,
        };
        {
            let mut subs = lock(&inner.subscribers);
            for c in &channel_names {
                subs.entry(c.clone()).or_default().push(sender.clone());
            }
        }
        for c in &channel_names {
            let ack = inner.listen(c.clone());
            match tokio::time::timeout(Duration::from_secs(10), ack).await {
                Ok(Ok(())) => {}
                _ => return Err(Error::Stopped("the listener could not LISTEN within 10 s")),
            }
        }
        // Announce the subscription so on-demand triggers notify; the maintenance service
        // keeps its rows fresh.
        let owner = format!(
            "{}.ev{}",
            inner.owner,
            SUBSCRIPTIONS.fetch_add(1, Ordering::Relaxed)
        );
        let pool = self.runtime.pool();
        for c in &channel_names {
            want(pool, c, &owner, SUBSCRIPTION_TTL.as_secs_f64(), true).await?;
        }
        // Committed: producers that cached "nobody waits" look again.
        crate::notify::wakeup::listeners_changed(pool).await?;
        inner.maintenance.subscribed(owner.clone(), channel_names);
        inner.chore(Chore::Wake);
        Ok(EventStream {
            runtime: self.runtime,
            rx,
            owner,
        })
    }
}

static SUBSCRIPTIONS: AtomicU64 = AtomicU64::new(0);

/// A stream of [`QueueEvent`]s. Dropping it ends the subscription (its rows are deleted by the
/// runtime's maintenance service); the runtime's shutdown ends it too.
pub struct EventStream {
    runtime: Runtime,
    rx: mpsc::Receiver<QueueEvent>,
    /// This subscription's owner in `apalis_pgmq.listeners`.
    owner: String,
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
        self.runtime.listener_stats()
    }
}

impl Stream for EventStream {
    type Item = QueueEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<QueueEvent>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let inner = &self.runtime.inner;
        if let Some(channels) = inner.maintenance.unsubscribed(&self.owner) {
            inner.chore(Chore::Unwant {
                owner: std::mem::take(&mut self.owner),
                channels,
            });
        }
    }
}
