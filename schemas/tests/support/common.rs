//! Helpers shared by the integration tests.

#![allow(dead_code)] // each test binary uses a subset

use std::path::PathBuf;

use serde_json::Value;

/// Whether `SWITCHBOARD_BLESS=1` asks the tests to write files.
pub fn bless() -> bool {
    std::env::var_os("SWITCHBOARD_BLESS").is_some_and(|value| value == "1")
}

/// A path inside the crate directory (`schemas/`).
pub fn crate_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Pretty JSON with a trailing newline, as the files are written.
pub fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("a value serializes");
    text.push('\n');
    text
}

/// The JSON pointer of the first difference between two values, if any.
pub fn first_difference(left: &Value, right: &Value) -> Option<String> {
    fn walk(left: &Value, right: &Value, path: &mut String) -> Option<String> {
        match (left, right) {
            (Value::Object(l), Value::Object(r)) => {
                for key in l.keys().chain(r.keys()) {
                    let len = path.len();
                    path.push('/');
                    path.push_str(&key.replace('~', "~0").replace('/', "~1"));
                    let found = match (l.get(key), r.get(key)) {
                        (Some(a), Some(b)) => walk(a, b, path),
                        _ => Some(path.clone()),
                    };
                    if found.is_some() {
                        return found;
                    }
                    path.truncate(len);
                }
                None
            }
            (Value::Array(l), Value::Array(r)) if l.len() == r.len() => {
                l.iter().zip(r).enumerate().find_map(|(index, (a, b))| {
                    let len = path.len();
                    path.push_str(&format!("/{index}"));
                    let found = walk(a, b, path);
                    path.truncate(len);
                    found
                })
            }
            _ if left == right => None,
            _ => Some(if path.is_empty() {
                "/".to_owned()
            } else {
                path.clone()
            }),
        }
    }
    walk(left, right, &mut String::new())
}
