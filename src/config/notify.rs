//! How [`NotifyChannels`] and [`NotifyMode`] read and write in a configuration file.
//!
//! - channels: `{ prefix = "apq.", namespace_pattern = "(?P<namespace>\\w+)_queue",
//!   default_namespace = "default" }`, each key optional, checked as
//!   [`NotifyChannels::with_prefix`] and [`NotifyChannels::namespace_pattern`] check them;
//! - mode: `"on_demand"`, `"batch"`, `"message"` (the default byte budget), or
//!   `{ message = { max_payload_bytes = 4000 } }`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de, ser::SerializeMap};

use crate::notify::{
    DEFAULT_MESSAGE_PAYLOAD_BYTES, DEFAULT_NAMESPACE, DEFAULT_NAMESPACE_PATTERN, NotifyChannels,
    NotifyMode,
};

#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ChannelsFile {
    prefix: String,
    namespace_pattern: String,
    default_namespace: String,
}

impl Default for ChannelsFile {
    fn default() -> Self {
        Self {
            prefix: NotifyChannels::default().prefix().to_owned(),
            namespace_pattern: DEFAULT_NAMESPACE_PATTERN.to_owned(),
            default_namespace: DEFAULT_NAMESPACE.to_owned(),
        }
    }
}

impl Serialize for NotifyChannels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ChannelsFile {
            prefix: self.prefix().to_owned(),
            namespace_pattern: self.pattern().to_owned(),
            default_namespace: self.default_namespace().to_owned(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for NotifyChannels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = ChannelsFile::deserialize(d)?;
        NotifyChannels::with_prefix(&f.prefix)
            .and_then(|c| c.namespace_pattern(&f.namespace_pattern, &f.default_namespace))
            .map_err(|e| de::Error::custom(e.short()))
    }
}

const MODES: &[&str] = &["on_demand", "batch", "message"];

impl Serialize for NotifyMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Self::Batch => s.serialize_str("batch"),
            Self::Message { max_payload_bytes }
                if max_payload_bytes != DEFAULT_MESSAGE_PAYLOAD_BYTES =>
            {
                struct Budget(u16);
                impl Serialize for Budget {
                    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                        let mut m = s.serialize_map(Some(1))?;
                        m.serialize_entry("max_payload_bytes", &self.0)?;
                        m.end()
                    }
                }
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("message", &Budget(max_payload_bytes))?;
                m.end()
            }
            Self::Message { .. } => s.serialize_str("message"),
            _ => s.serialize_str("on_demand"),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBudget {
    max_payload_bytes: u16,
}

impl<'de> Deserialize<'de> for NotifyMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ModeVisitor;
        impl<'de> de::Visitor<'de> for ModeVisitor {
            type Value = NotifyMode;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "\"on_demand\", \"batch\", \"message\" or { message = { max_payload_bytes = N } }",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<NotifyMode, E> {
                match v {
                    "on_demand" | "batch" | "message" => {
                        NotifyMode::from_name(Some(v), None).map_err(|e| E::custom(e.short()))
                    }
                    other => Err(E::unknown_variant(other, MODES)),
                }
            }

            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<NotifyMode, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "empty mode table; write e.g. \"on_demand\"",
                    ));
                };
                if key != "message" {
                    return Err(de::Error::custom(format!(
                        "only the message mode takes settings, got {key:?}"
                    )));
                }
                let budget: MessageBudget = map.next_value()?;
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom("a mode table names one mode"));
                }
                NotifyMode::from_name(Some("message"), Some(budget.max_payload_bytes))
                    .map_err(|e| de::Error::custom(e.short()))
            }
        }
        d.deserialize_any(ModeVisitor)
    }
}
