//! Typed queue events, decoded from the triggers' notifications, and the listener's counters.
//! Applications subscribe through [`QueueEvents`](crate::QueueEvents).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value;

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

    pub(crate) fn into_event(self) -> Option<QueueEvent> {
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
    pub(crate) delivered: AtomicU64,
    pub(crate) dropped: AtomicU64,
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
