//! apalis-pgmq-notify (work in progress)
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod migrate;
mod queue;

pub use error::{Error, Result};
pub use migrate::{MIN_PGMQ_VERSION, PgmqSource, SCHEMA, SetupReport, setup};
pub use queue::{
    DEAD_LETTER_SUFFIX, DEFAULT_MAX_PAYLOAD_BYTES, Delay, MAX_QUEUE_NAME_LEN, Message, NewMessage,
    PgmqQueue, QueueInfo, QueueMetrics, QueueName, QueueNameError, list_queues, metrics_all,
};
