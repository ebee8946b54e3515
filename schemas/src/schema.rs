//! Published JSON Schema documents, generated from the Rust types.
//!
//! Layout: one self-contained JSON Schema (draft 2020-12) per catalogue entry,
//! `schemas/json/<type>.v<version>.schema.json`, describing the **whole
//! envelope** with `type` and `version` fixed (`const`) and `payload` set to
//! that event's payload schema; shared types (addresses, string enums) are in
//! `$defs`. A consumer validates a record against the file named by the
//! record's own `type` and `version`. The documents are checked in and kept
//! equal to this generator by a test (`SWITCHBOARD_BLESS=1` rewrites them).

use std::collections::BTreeMap;

use schemars::consts::meta_schemas;
use schemars::generate::SchemaSettings;
use schemars::transform::RecursiveTransform;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Value, json};

use crate::envelope::WireEnvelope;
use crate::events::{EventDescriptor, catalogue};

/// The envelope schema for `descriptor` (inline), registering the payload's
/// and shared types' definitions in `generator`.
pub fn envelope_schema(descriptor: &EventDescriptor, generator: &mut SchemaGenerator) -> Schema {
    let mut schema = WireEnvelope::<Value>::json_schema(generator);
    let payload = (descriptor.payload_schema)(generator);
    let object = schema.ensure_object();
    object.insert(
        "title".into(),
        json!(format!("{} v{}", descriptor.event_type, descriptor.version)),
    );
    object.insert("description".into(), json!(descriptor.summary));
    if let Some(Value::Object(properties)) = object.get_mut("properties") {
        for (name, value) in [
            ("type", json!(descriptor.event_type)),
            ("version", json!(descriptor.version)),
        ] {
            if let Some(Value::Object(property)) = properties.get_mut(name) {
                property.insert("const".into(), value);
            }
        }
        properties.insert("payload".into(), payload.to_value());
    }
    schema
}

/// A generator for published documents: `settings` plus unwrapping of
/// doc-comment line breaks in descriptions.
pub(crate) fn generator(settings: SchemaSettings) -> SchemaGenerator {
    settings
        .with_transform(RecursiveTransform(unwrap_descriptions as fn(&mut Schema)))
        .into_generator()
}

/// Applies the generator's transforms to a schema that is not a root or a
/// definition (those get them from schemars).
pub(crate) fn apply_transforms(generator: &mut SchemaGenerator, schema: &mut Schema) {
    for transform in generator.transforms_mut() {
        transform.transform(schema);
    }
}

/// Joins the lines of each paragraph of a `description` with spaces.
fn unwrap_descriptions(schema: &mut Schema) {
    if let Some(Value::String(description)) = schema.get_mut("description") {
        *description = description
            .split("\n\n")
            .map(|paragraph| {
                paragraph
                    .split('\n')
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n\n");
    }
}

/// The published document for one catalogue entry.
pub fn event_json_schema(descriptor: &EventDescriptor) -> Value {
    let mut generator = generator(SchemaSettings::draft2020_12());
    let mut schema = envelope_schema(descriptor, &mut generator);
    apply_transforms(&mut generator, &mut schema);
    let definitions = generator.take_definitions(true);
    let object = schema.ensure_object();
    object.insert("$schema".into(), json!(meta_schemas::DRAFT2020_12));
    if !definitions.is_empty() {
        object.insert("$defs".into(), Value::Object(definitions));
    }
    schema.to_value()
}

/// The file name of a catalogue entry's document, `<type>.v<version>.schema.json`.
pub fn json_schema_file_name(descriptor: &EventDescriptor) -> String {
    format!("{}.schema.json", descriptor.id())
}

/// Every published JSON Schema document, by file name.
pub fn json_schemas() -> BTreeMap<String, Value> {
    catalogue()
        .iter()
        .map(|descriptor| {
            (
                json_schema_file_name(descriptor),
                event_json_schema(descriptor),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_schema_fixes_type_and_version() {
        let descriptor = catalogue()
            .iter()
            .find(|d| d.event_type == "message.submitted")
            .unwrap();
        let schema = event_json_schema(descriptor);
        assert_eq!(schema["properties"]["type"]["const"], "message.submitted");
        assert_eq!(schema["properties"]["version"]["const"], 1);
        assert_eq!(
            schema["properties"]["payload"]["$ref"],
            "#/$defs/MessageSubmitted"
        );
        let required = schema["required"].as_array().unwrap();
        for field in [
            "id",
            "type",
            "version",
            "occurred_at",
            "node",
            "subject",
            "payload",
        ] {
            assert!(required.contains(&json!(field)), "{field}");
        }
        assert!(schema["$defs"]["FullJid"].is_object());
    }
}
