//! The job headers: what this crate keeps about a job in its message's `headers`, under one
//! key ([`HEADERS_KEY`], `"apalis"`), so any PGMQ client can read and write it.
//!
//! | field | written by | meaning |
//! |---|---|---|
//! | `max_attempts` | push (`TaskBuilder::max_attempts`) | runs before the job is given up |
//! | `priority` | push (`TaskBuilder::priority`) | higher first, with `Config::priorities` |
//! | `idempotency_key` | push (`TaskBuilder::idempotency_key`) | unique while queued (unique index) |
//! | `task_id` | push (`TaskBuilder::task_id`) | the producer's id for the job |
//! | `metadata` | push (`MetadataStore`) | string pairs, given back to the handler |
//! | `result` | `push_and_wait` | keep this job's result whatever the workers' setting |
//! | `attempts`, `last_error`, `failed_at`, `failed_epoch` | a failed delivery (SQL) | runs so far, why the last one failed |
//!
//! Anything missing or malformed reads as absent: a message from another PGMQ client is a valid
//! job without headers.

use apalis_core::task::{Task, metadata::MetadataStore, task_id::TaskId};
use serde_json::{Map, Value, json};

/// The key under which apalis metadata is stored in a message's `headers`.
pub const HEADERS_KEY: &str = "apalis";

/// The apalis metadata kept in `headers.apalis`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct JobMeta {
    pub(crate) max_attempts: Option<usize>,
    /// Runs recorded by the last failed delivery (counting in-process retries).
    pub(crate) attempts: Option<usize>,
    pub(crate) priority: Option<usize>,
    pub(crate) idempotency_key: Option<String>,
    /// The id the producer gave the task (`TaskBuilder::task_id`): a number for
    /// `TaskId::Int`, a string otherwise.
    pub(crate) task_id: Option<TaskId>,
    pub(crate) metadata: MetadataStore,
}

impl JobMeta {
    /// Reads the `apalis` key of a message's headers. Anything missing or malformed is treated as
    /// absent: a message from another PGMQ client is a valid job without it.
    pub(crate) fn from_headers(headers: Option<&Value>) -> Self {
        let Some(meta) = headers
            .and_then(|h| h.get(HEADERS_KEY))
            .and_then(Value::as_object)
        else {
            return Self::default();
        };
        let num = |k: &str| {
            meta.get(k)
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
        };
        let metadata = meta
            .get("metadata")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            max_attempts: num("max_attempts"),
            attempts: num("attempts"),
            priority: num("priority"),
            idempotency_key: meta
                .get("idempotency_key")
                .and_then(Value::as_str)
                .map(str::to_owned),
            task_id: match meta.get("task_id") {
                Some(Value::Number(n)) => n.as_u64().map(TaskId::from_int),
                Some(Value::String(s)) => Some(TaskId::from_string(s.clone())),
                _ => None,
            },
            metadata: MetadataStore::from_map(metadata),
        }
    }

    /// The headers for a task being pushed, or `None` when there is nothing to record.
    pub(crate) fn headers_of<A>(task: &Task<A>) -> Option<Value> {
        let mut meta = Map::new();
        if let Some(n) = task.max_attempts() {
            meta.insert("max_attempts".into(), json!(n));
        }
        if let Some(p) = task.priority() {
            meta.insert("priority".into(), json!(p));
        }
        if let Some(k) = task.idempotency_key() {
            meta.insert("idempotency_key".into(), json!(k));
        }
        match task.task_id() {
            Some(TaskId::Int(n)) => {
                meta.insert("task_id".into(), json!(n));
            }
            Some(id) => {
                meta.insert("task_id".into(), json!(id.to_string()));
            }
            None => {}
        }
        if !task.metadata().is_empty() {
            let m: Map<String, Value> = task
                .metadata()
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            meta.insert("metadata".into(), Value::Object(m));
        }
        if meta.is_empty() {
            None
        } else {
            Some(json!({ HEADERS_KEY: meta }))
        }
    }
}

/// The idempotency key in a job's headers (`headers.apalis.idempotency_key`), if any.
pub(super) fn headers_key(headers: Option<&Value>) -> Option<String> {
    headers?
        .get(HEADERS_KEY)?
        .get("idempotency_key")?
        .as_str()
        .map(str::to_owned)
}

/// Whether a job asked for its result to be kept (`headers.apalis.result = true`, set by
/// [`push_and_wait`](crate::PgmqStorage::push_and_wait)).
pub(crate) fn wants_result(headers: Option<&Value>) -> bool {
    headers
        .and_then(|h| h.get(HEADERS_KEY))
        .and_then(|a| a.get("result"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use apalis_core::task::builder::TaskBuilder;

    #[test]
    fn job_meta_round_trips_through_headers() {
        let mut md = MetadataStore::default();
        md.insert("tenant", "acme").expect("insert");
        let task = TaskBuilder::new(Value::Null)
            .max_attempts(7)
            .priority(3)
            .idempotency_key("k-1")
            .with_metadata(md)
            .build();
        let headers = JobMeta::headers_of(&task).expect("some headers");
        let meta = JobMeta::from_headers(Some(&headers));
        assert_eq!(meta.max_attempts, Some(7));
        assert_eq!(meta.priority, Some(3));
        assert_eq!(meta.idempotency_key.as_deref(), Some("k-1"));
        assert_eq!(meta.metadata.get("tenant"), Some("acme"));
        assert!(JobMeta::headers_of(&TaskBuilder::new(()).build()).is_none());
    }

    #[test]
    fn foreign_or_malformed_headers_are_ignored() {
        for h in [
            json!({"trace": "x"}),
            json!([1, 2]),
            json!({"apalis": "nonsense"}),
            json!({"apalis": {"max_attempts": "three", "metadata": [1]}}),
        ] {
            let meta = JobMeta::from_headers(Some(&h));
            assert_eq!(meta.max_attempts, None, "{h}");
            assert!(meta.metadata.is_empty());
        }
        assert_eq!(JobMeta::from_headers(None), JobMeta::default());
    }
}
