//! The AsyncAPI 3.0.0 document (`schemas/asyncapi.yaml`), generated from the
//! topic catalogue and the event catalogue.
//!
//! - one channel per topic, `address: '{prefix}.<name>'` with a `prefix`
//!   parameter (default `switchboard`), Kafka channel bindings for the
//!   partition count, cleanup policy and retention (`-1` = forever);
//! - one message per catalogue entry, id `<type>.v<version>`, whose payload
//!   is the envelope with that event's payload, and whose Kafka binding
//!   documents the record key;
//! - one `send` operation per producing component and one `receive`
//!   operation per consuming component of each topic, id
//!   `<component>.<send|receive>.<topic>`;
//! - shared schemas under `components/schemas` (JSON Schema draft 07, the
//!   AsyncAPI default schema format).
//!
//! Built with `serde_json` maps (sorted keys), so the output is deterministic.

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::events::catalogue;
use crate::schema::{apply_transforms, envelope_schema, generator};
use crate::topics::{Cleanup, Component, DEFAULT_PREFIX, TopicSpec, topics};

/// The AsyncAPI binding version used for Kafka bindings.
const KAFKA_BINDING_VERSION: &str = "0.5.0";

/// Builds the AsyncAPI 3.0.0 document describing every topic and event.
pub fn asyncapi() -> Value {
    let mut generator = generator(
        SchemaSettings::draft07().with(|s| s.definitions_path = "/components/schemas".into()),
    );
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();

    for spec in topics() {
        let mut channel_messages = Map::new();
        for descriptor in catalogue().iter().filter(|d| d.topic == spec.topic) {
            let id = descriptor.id();
            let mut payload = envelope_schema(descriptor, &mut generator);
            apply_transforms(&mut generator, &mut payload);
            messages.insert(
                id.clone(),
                json!({
                    "name": descriptor.event_type,
                    "title": format!("{} v{}", descriptor.event_type, descriptor.version),
                    "summary": descriptor.summary,
                    "contentType": "application/json",
                    "payload": payload,
                    "bindings": {
                        "kafka": {
                            "key": { "type": "string", "description": spec.key },
                            "bindingVersion": KAFKA_BINDING_VERSION,
                        },
                    },
                }),
            );
            channel_messages.insert(
                id.clone(),
                json!({ "$ref": format!("#/components/messages/{id}") }),
            );
        }
        let message_refs: Vec<Value> = channel_messages
            .keys()
            .map(|id| json!({ "$ref": format!("#/channels/{}/messages/{id}", spec.name) }))
            .collect();
        for (action, components) in [("send", spec.producers), ("receive", spec.consumers)] {
            for component in components {
                operations.insert(
                    format!("{}.{action}.{}", component.as_str(), spec.name),
                    operation(spec, *component, action, &message_refs),
                );
            }
        }
        channels.insert(spec.name.to_owned(), channel(spec, &channel_messages));
    }

    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Switchboard events",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every login, presence update, message, room event and file \
                transfer of a Switchboard IM and presence deployment, as JSON envelopes on \
                Kafka topics. Record values are envelopes; record keys are the envelope \
                `subject`. Consumers select the payload schema by the envelope's `type` and \
                `version` and must skip (or pass on) pairs they do not know. Additive \
                changes keep the version; breaking changes add a new version.",
            "license": { "name": "Apache-2.0" },
        },
        "defaultContentType": "application/json",
        "servers": {
            "kafka": {
                "host": "{bootstrap}",
                "protocol": "kafka",
                "description": "The deployment's Kafka cluster.",
                "variables": {
                    "bootstrap": {
                        "default": "localhost:9092",
                        "description": "A bootstrap broker, host:port.",
                    },
                },
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": generator.take_definitions(true),
            "messages": messages,
            "parameters": {
                "prefix": {
                    "default": DEFAULT_PREFIX,
                    "description": "The cluster's topic name prefix.",
                },
            },
        },
    })
}

fn channel(spec: &TopicSpec, messages: &Map<String, Value>) -> Value {
    let mut topic_configuration = Map::new();
    topic_configuration.insert("cleanup.policy".into(), json!([spec.cleanup.as_str()]));
    if spec.cleanup == Cleanup::Delete {
        topic_configuration.insert(
            "retention.ms".into(),
            json!(spec.retention_ms.unwrap_or(-1)),
        );
    }
    json!({
        "address": format!("{{prefix}}.{}", spec.name),
        "title": spec.name,
        "description": format!("{} Key: {}", spec.description, spec.key),
        "parameters": { "prefix": { "$ref": "#/components/parameters/prefix" } },
        "messages": messages,
        "bindings": {
            "kafka": {
                "partitions": spec.partitions,
                "topicConfiguration": topic_configuration,
                "bindingVersion": KAFKA_BINDING_VERSION,
            },
        },
    })
}

fn operation(spec: &TopicSpec, component: Component, action: &str, messages: &[Value]) -> Value {
    let verb = if action == "send" {
        "produces to"
    } else {
        "consumes"
    };
    json!({
        "action": action,
        "channel": { "$ref": format!("#/channels/{}", spec.name) },
        "summary": format!("{} {verb} {}.", component.as_str(), spec.name),
        "messages": messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_and_operation_reference_resolves() {
        let document = asyncapi();
        let mut refs = Vec::new();
        collect_refs(&document, &mut refs);
        assert!(!refs.is_empty());
        for reference in refs {
            let pointer = reference.strip_prefix('#').unwrap();
            assert!(document.pointer(pointer).is_some(), "dangling {reference}");
        }
        assert_eq!(
            document["channels"].as_object().unwrap().len(),
            topics().len()
        );
        assert_eq!(
            document["components"]["messages"]
                .as_object()
                .unwrap()
                .len(),
            catalogue().len()
        );
    }

    fn collect_refs(value: &Value, refs: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(reference)) = map.get("$ref") {
                    refs.push(reference.clone());
                }
                map.values().for_each(|v| collect_refs(v, refs));
            }
            Value::Array(items) => items.iter().for_each(|v| collect_refs(v, refs)),
            _ => {}
        }
    }
}
