//! Golden files: `golden/<type>.v<version>.json`, one hand-reviewed example
//! envelope per catalogue entry. They pin the wire format: each must decode
//! into its typed variant, re-encode to the identical JSON value and validate
//! against its published schema. `SWITCHBOARD_BLESS=1` only creates missing
//! golden files (from `support/examples.rs`); it never rewrites one.

#[path = "support/common.rs"]
mod common;
#[path = "support/examples.rs"]
mod examples;

use std::collections::BTreeMap;
use std::fs;
use std::sync::Once;

use serde_json::{Value, json};
use switchboard_schemas::asyncapi::asyncapi;
use switchboard_schemas::schema::event_json_schema;
use switchboard_schemas::{Envelope, Event, EventDescriptor, catalogue};

use common::{bless, crate_path, first_difference};

fn golden_name(descriptor: &EventDescriptor) -> String {
    format!("{}.json", descriptor.id())
}

/// Every golden file, by catalogue entry; creates missing ones when blessing.
fn goldens() -> Vec<(&'static EventDescriptor, Value)> {
    static CREATE_MISSING: Once = Once::new();
    let dir = crate_path("golden");
    CREATE_MISSING.call_once(|| {
        if !bless() {
            return;
        }
        fs::create_dir_all(&dir).expect("create golden/");
        let examples: BTreeMap<String, Envelope> = examples::examples()
            .into_iter()
            .map(|e| {
                (
                    format!("{}.v{}", e.event.event_type(), e.event.version()),
                    e,
                )
            })
            .collect();
        for descriptor in catalogue() {
            let path = dir.join(golden_name(descriptor));
            if let (false, Some(example)) = (path.exists(), examples.get(&descriptor.id())) {
                // Written in wire order (not sorted) for review.
                let mut text = serde_json::to_string_pretty(example).expect("example serializes");
                text.push('\n');
                fs::write(&path, text).expect("write golden");
            }
        }
    });
    catalogue()
        .iter()
        .map(|descriptor| {
            let path = dir.join(golden_name(descriptor));
            let text = fs::read_to_string(&path).unwrap_or_else(|_| {
                panic!(
                    "missing golden/{}: add an example to tests/support/examples.rs, run with \
                     SWITCHBOARD_BLESS=1 and review the new file",
                    golden_name(descriptor)
                )
            });
            let value = serde_json::from_str(&text).expect("golden file is JSON");
            (descriptor, value)
        })
        .collect()
}

#[test]
fn no_stray_golden_files() {
    let expected: Vec<String> = catalogue().iter().map(golden_name).collect();
    for entry in fs::read_dir(crate_path("golden")).expect("read golden/") {
        let name = entry
            .expect("dir entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        assert!(
            expected.contains(&name),
            "golden/{name} matches no catalogue entry"
        );
    }
}

#[test]
fn goldens_decode_to_their_typed_variant_and_round_trip() {
    for (descriptor, golden) in goldens() {
        let name = golden_name(descriptor);
        let envelope: Envelope = serde_json::from_value(golden.clone())
            .unwrap_or_else(|error| panic!("golden/{name} does not decode: {error}"));
        assert!(
            !matches!(envelope.event, Event::Unknown { .. }),
            "golden/{name} decoded as Unknown"
        );
        assert_eq!(envelope.event.event_type(), descriptor.event_type, "{name}");
        assert_eq!(envelope.event.version(), descriptor.version, "{name}");
        assert_eq!(envelope.topic(), Some(descriptor.topic), "{name}");

        let bytes = envelope.to_json_vec().expect("encode");
        let again: Value = serde_json::from_slice(&bytes).expect("re-encoded JSON");
        if let Some(pointer) = first_difference(&golden, &again) {
            panic!("golden/{name} re-encodes differently at {pointer}");
        }
        assert_eq!(
            Envelope::from_json_slice(&bytes).expect("decode again"),
            envelope
        );
    }
}

#[test]
fn goldens_validate_against_their_json_schema() {
    for (descriptor, golden) in goldens() {
        let schema = event_json_schema(descriptor);
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("the published schema compiles");
        let errors: Vec<String> = validator
            .iter_errors(&golden)
            .map(|error| format!("{}: {error}", error.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "golden/{}: {errors:#?}",
            golden_name(descriptor)
        );
    }
}

#[test]
fn goldens_validate_against_their_asyncapi_message_payload() {
    let mut document = asyncapi();
    document["$schema"] = json!("http://json-schema.org/draft-07/schema#");
    for (descriptor, golden) in goldens() {
        // Draft 07 ignores `$ref` siblings, so the document root is just the
        // reference, resolved within the document.
        document["$ref"] = json!(format!("#/components/messages/{}/payload", descriptor.id()));
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&document)
            .expect("the AsyncAPI payload schema compiles");
        let errors: Vec<String> = validator
            .iter_errors(&golden)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "golden/{}: {errors:#?}",
            golden_name(descriptor)
        );
    }
}

#[test]
fn wrong_payload_fails_schema_validation() {
    let (descriptor, mut golden) = goldens().swap_remove(0);
    golden["payload"] = json!({ "session_id": "not-a-uuid" });
    let schema = event_json_schema(descriptor);
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("compiles");
    assert!(!validator.is_valid(&golden));
}

#[test]
fn unknown_events_round_trip_unchanged() {
    let original = json!({
        "id": "0196a5d2-7c3e-7000-8000-0000000000ff",
        "type": "message.reacted",
        "version": 3,
        "occurred_at": "2026-01-05T09:30:00.123456Z",
        "node": "node7",
        "subject": "alice@example.com",
        "causation_id": null,
        "correlation_id": "0196a5d2-7c3e-7000-8000-000000000001",
        "payload": { "message_id": "m-1", "reaction": "👍", "nested": { "list": [1, 2.5, null] } },
    });
    let envelope: Envelope = serde_json::from_value(original.clone()).expect("decodes");
    match &envelope.event {
        Event::Unknown {
            event_type,
            version,
            payload,
        } => {
            assert_eq!((event_type.as_str(), *version), ("message.reacted", 3));
            assert_eq!(payload, &original["payload"]);
        }
        other => panic!("expected Unknown, got {other:?}"),
    }
    assert_eq!(envelope.topic(), None);
    assert_eq!(serde_json::to_value(&envelope).expect("encodes"), original);

    // A future version of a known type stays Unknown, on the known topic.
    let mut future = original;
    future["type"] = json!("message.submitted");
    future["version"] = json!(99);
    let envelope: Envelope = serde_json::from_value(future.clone()).expect("decodes");
    assert!(matches!(envelope.event, Event::Unknown { .. }));
    assert_eq!(envelope.topic(), Some(switchboard_schemas::Topic::Messages));
    assert_eq!(serde_json::to_value(&envelope).expect("encodes"), future);
}

#[test]
fn additive_changes_decode() {
    for (descriptor, golden) in goldens() {
        let name = golden_name(descriptor);
        let expected: Envelope = serde_json::from_value(golden.clone()).expect("decodes");

        // A newer producer added fields to the payload and the envelope.
        let mut newer = golden.clone();
        newer["payload"]["added_in_a_later_release"] = json!({ "any": ["shape", 1] });
        newer["trace_parent"] = json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let decoded: Envelope = serde_json::from_value(newer)
            .unwrap_or_else(|error| panic!("{name} with extra fields: {error}"));
        assert_eq!(decoded, expected, "{name}");

        // An older producer left out every defaulted payload field and the
        // optional envelope fields.
        let mut older = golden;
        let schema = event_json_schema(descriptor);
        let payload_def = schema["properties"]["payload"]["$ref"]
            .as_str()
            .and_then(|pointer| pointer.strip_prefix('#'))
            .and_then(|pointer| schema.pointer(pointer))
            .expect("payload schema is a definition");
        let required: Vec<&str> = payload_def["required"]
            .as_array()
            .map(|fields| fields.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let object = older["payload"]
            .as_object_mut()
            .expect("payload is an object");
        object.retain(|field, _| required.contains(&field.as_str()));
        let envelope = older.as_object_mut().expect("envelope is an object");
        envelope.remove("causation_id");
        envelope.remove("correlation_id");
        serde_json::from_value::<Envelope>(older)
            .unwrap_or_else(|error| panic!("{name} with only required fields: {error}"));
    }
}
