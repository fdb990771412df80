//! apalis-pgmq-notify (work in progress)
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod ack;
mod backend;
mod config;
mod config_file;
mod error;
mod migrate;
mod notify;
mod queue;
mod util;

pub use ack::{AckLayer, AckService, HandlerPanicked};
pub use backend::{HEADERS_KEY, MessageInfo, PgmqStorage};
pub use config::{Backoff, Config, DoneAction, ExhaustedAction, KilledAction};
pub use config_file::ConfigFile;
pub use error::{Error, Result};
pub use migrate::{MIN_PGMQ_VERSION, PgmqSource, SCHEMA, SetupReport, setup};
pub use notify::{
    DEFAULT_MESSAGE_PAYLOAD_BYTES, DEFAULT_NAMESPACE, DEFAULT_NAMESPACE_PATTERN, EventStream,
    ListenerStats, MAX_CHANNEL_LEN, MAX_PREFIX_LEN, NotifyChannels, NotifyMode, QueueEvent,
    QueueEvents, disable_notify, enable_created_notify, enable_notify, notify_migration_sql,
    notify_mode,
};
pub use queue::{
    DEAD_LETTER_SUFFIX, DEFAULT_MAX_PAYLOAD_BYTES, Delay, MAX_QUEUE_NAME_LEN, Message, NewMessage,
    PgmqQueue, QueueInfo, QueueMetrics, QueueName, QueueNameError, list_queues, metrics_all,
};
