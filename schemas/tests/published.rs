//! The published documents — `asyncapi.yaml` and `json/*.schema.json` — are
//! equal to what the crate generates. `SWITCHBOARD_BLESS=1` rewrites them.

#[path = "support/common.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs;

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Map, Value};
use switchboard_schemas::asyncapi::asyncapi;
use switchboard_schemas::schema::json_schemas;

use common::{bless, crate_path, first_difference, pretty};

const BLESS_HINT: &str = "regenerate with `SWITCHBOARD_BLESS=1 cargo test -p switchboard-schemas` \
                          and review the diff";

#[test]
fn json_schema_files_are_up_to_date() {
    let dir = crate_path("json");
    let generated = json_schemas();
    if bless() {
        fs::create_dir_all(&dir).expect("create json/");
        for entry in fs::read_dir(&dir).expect("read json/") {
            let path = entry.expect("dir entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.ends_with(".schema.json") && !generated.contains_key(name) {
                fs::remove_file(&path).expect("remove stale schema");
            }
        }
        for (name, schema) in &generated {
            fs::write(dir.join(name), pretty(schema)).expect("write schema");
        }
    }

    let mut committed = BTreeMap::new();
    for entry in fs::read_dir(&dir).expect("read json/") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.ends_with(".schema.json") {
            let text = fs::read_to_string(&path).expect("read schema");
            let value: Value = serde_json::from_str(&text).expect("schema file is JSON");
            committed.insert(name, value);
        }
    }

    let names = |map: &BTreeMap<String, Value>| map.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&committed),
        names(&generated),
        "json/ file set differs; {BLESS_HINT}"
    );
    for (name, schema) in &generated {
        if let Some(path) = first_difference(&committed[name], schema) {
            panic!("json/{name} differs at {path}; {BLESS_HINT}");
        }
    }
}

/// Top-level keys of the AsyncAPI document in conventional order.
const ASYNCAPI_ORDER: &[&str] = &[
    "asyncapi",
    "info",
    "defaultContentType",
    "servers",
    "channels",
    "operations",
    "components",
];

/// Serializes a map with `ASYNCAPI_ORDER` keys first (readability only; the
/// test compares parsed values).
struct Ordered<'a>(&'a Map<String, Value>);

impl Serialize for Ordered<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for key in ASYNCAPI_ORDER {
            if let Some(value) = self.0.get(*key) {
                map.serialize_entry(key, value)?;
            }
        }
        for (key, value) in self.0 {
            if !ASYNCAPI_ORDER.contains(&key.as_str()) {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

#[test]
fn asyncapi_yaml_is_up_to_date() {
    let path = crate_path("asyncapi.yaml");
    let generated = asyncapi();
    if bless() {
        let object = generated.as_object().expect("the document is an object");
        let yaml = serde_norway::to_string(&Ordered(object)).expect("serialize yaml");
        let header = "# Generated from the switchboard-schemas Rust types; do not edit.\n\
                      # Regenerate: SWITCHBOARD_BLESS=1 cargo test -p switchboard-schemas\n";
        fs::write(&path, format!("{header}{yaml}")).expect("write asyncapi.yaml");
    }
    let text = fs::read_to_string(&path).expect("read asyncapi.yaml");
    let committed: Value = serde_norway::from_str(&text).expect("asyncapi.yaml is YAML");
    if let Some(pointer) = first_difference(&committed, &generated) {
        panic!("asyncapi.yaml differs at {pointer}; {BLESS_HINT}");
    }
}

#[test]
fn asyncapi_document_is_valid_asyncapi_3() {
    let text = fs::read_to_string(crate_path("tests/data/asyncapi-3.0.0.schema.json"))
        .expect("read the AsyncAPI 3.0.0 schema");
    let meta: Value = serde_json::from_str(&text).expect("the AsyncAPI schema is JSON");
    let validator = jsonschema::validator_for(&meta).expect("the AsyncAPI schema compiles");
    let document = asyncapi();
    let errors: Vec<String> = validator
        .iter_errors(&document)
        .map(|error| format!("{}: {error}", error.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");

    // The check has teeth: AsyncAPI 2 vocabulary is rejected.
    let mut broken = document;
    broken["operations"]["router.send.messages"]["action"] = Value::from("publish");
    assert!(!validator.is_valid(&broken));
}
