//! The OpenAPI 3.1 document of the API, written here next to the handlers
//! and committed as `projections/openapi.json`; tests keep the file equal to
//! [`document`] and every route of [`super::routes`] described in it.
//! Regenerate: `SWITCHBOARD_BLESS=1 cargo test -p switchboard-projections openapi`.

use serde_json::{Value, json};

use super::params::{DEFAULT_LIMIT, MAX_LIMIT, MAX_QUERY_BYTES, MAX_TERMS};
use super::users::{MAX_PASSWORD_BYTES, MAX_TEXT_BYTES};

fn param(name: &str, description: &str, schema: &Value, required: bool) -> Value {
    json!({
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    })
}

fn address(name: &str, description: &str, required: bool) -> Value {
    param(
        name,
        description,
        &json!({"type": "string", "maxLength": 3071, "examples": ["alice@example.com"]}),
        required,
    )
}

fn time(name: &str, description: &str) -> Value {
    param(
        name,
        description,
        &json!({"type": "string", "format": "date-time"}),
        false,
    )
}

fn common_filters() -> Vec<Value> {
    vec![
        time("start", "Messages at or after this time (RFC 3339)."),
        time(
            "end",
            "Messages before this time (RFC 3339); later than start.",
        ),
        param(
            "q",
            &format!(
                "Full text: words and \"quoted phrases\" that must all occur in the body \
                 (at most {MAX_QUERY_BYTES} bytes, {MAX_TERMS} terms). Case-insensitive; on \
                 SQLite diacritics are ignored too."
            ),
            &json!({"type": "string", "maxLength": MAX_QUERY_BYTES}),
            false,
        ),
    ]
}

fn paging() -> Vec<Value> {
    vec![
        param(
            "limit",
            "Page size.",
            &json!({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}),
            false,
        ),
        param(
            "cursor",
            "The next_cursor of the previous page.",
            &json!({"type": "string"}),
            false,
        ),
    ]
}

fn problem_responses(with_400: bool) -> Value {
    let problem = |description: &str| {
        json!({
            "description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
        })
    };
    let mut r = json!({
        "401": problem("No token, or an unknown or revoked one."),
        "403": problem("The token's role may not use this operation."),
        "500": problem("The database failed."),
    });
    if with_400 {
        r["400"] = problem(
            "A parameter is missing, malformed, unknown or repeated; `parameter` names it.",
        );
    }
    r
}

fn audit_header() -> Value {
    json!({
        "switchboard-audit-seq": {
            "description": "Sequence number of the compliance log record of this query.",
            "schema": {"type": "integer"},
        }
    })
}

fn page_operation(
    operation_id: &str,
    summary: &str,
    description: &str,
    mut params: Vec<Value>,
) -> Value {
    params.extend(common_filters());
    params.extend(paging());
    let mut responses = problem_responses(true);
    responses["200"] = json!({
        "description": "One page, in time order.",
        "headers": audit_header(),
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Page"}}},
    });
    json!({
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "description": description,
            "tags": ["archive"],
            "security": [{"token": []}],
            "parameters": params,
            "responses": responses,
        }
    })
}

/// The user administration paths (`super::users`).
fn user_paths() -> Value {
    let admin = |operation_id: &str, summary: &str, body: Option<Value>, success: (&str, Value)| {
        let mut responses = problem_responses(body.is_some());
        responses["503"] = json!({
            "description": "This process does not administer users.",
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
        });
        responses[success.0] = success.1;
        let mut op = json!({
            "operationId": operation_id,
            "summary": summary,
            "tags": ["administration"],
            "security": [{"token": []}],
            "responses": responses,
        });
        if let Some(schema) = body {
            op["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": schema}},
            });
        }
        op
    };
    let problem = |description: &str| {
        json!({
            "description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
        })
    };
    let done = || {
        (
            "204",
            json!({"description": "Done; the change is on the log."}),
        )
    };
    let user_param = json!([{
        "name": "user",
        "in": "path",
        "required": true,
        "description": "Bare address of the user.",
        "schema": {"type": "string", "examples": ["alice@example.com"]},
    }]);
    let password = json!({"type": "string", "minLength": 1, "maxLength": MAX_PASSWORD_BYTES,
                          "description": "Turned into salted SCRAM keys and SIP digest secrets; never stored or logged."});
    let text = json!({"type": ["string", "null"], "maxLength": MAX_TEXT_BYTES});
    let mut list = admin(
        "listUsers",
        "List users",
        None,
        (
            "200",
            json!({
                "description": "Every user, in address order.",
                "content": {"application/json": {"schema": {
                    "type": "object",
                    "required": ["items"],
                    "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/User"}}},
                }}},
            }),
        ),
    );
    list["responses"].as_object_mut().map(|r| r.remove("400"));
    let mut add = admin(
        "addUser",
        "Provision a user",
        Some(json!({
            "type": "object",
            "required": ["user", "password"],
            "additionalProperties": false,
            "properties": {
                "user": {"type": "string", "description": "Bare address in a served domain."},
                "password": password,
                "display_name": text,
            },
        })),
        (
            "201",
            json!({
                "description": "Provisioned.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/User"}}},
            }),
        ),
    );
    add["responses"]["409"] = problem("The user exists already.");
    let with_404 = |mut op: Value| {
        op["responses"]["404"] = problem("No such user.");
        op
    };
    json!({
        "/api/v1/users": {"get": list, "post": add},
        "/api/v1/users/{user}/password": {
            "parameters": user_param,
            "put": with_404(admin(
                "setUserPassword",
                "Set a user's password",
                Some(json!({
                    "type": "object",
                    "required": ["password"],
                    "additionalProperties": false,
                    "properties": {"password": password},
                })),
                done(),
            )),
        },
        "/api/v1/users/{user}/disable": {
            "parameters": user_param,
            "post": with_404(admin(
                "disableUser",
                "Disable a user (logins fail); the body is optional",
                Some(json!({
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {"reason": text},
                })),
                done(),
            )),
        },
        "/api/v1/users/{user}/enable": {
            "parameters": user_param,
            "post": with_404(admin("enableUser", "Enable a disabled user", None, done())),
        },
        "/api/v1/users/{user}": {
            "parameters": user_param,
            "delete": with_404(admin("deleteUser", "Delete a user", None, done())),
        },
    })
}

/// The document.
pub fn document() -> Value {
    let search_filters = || {
        vec![
            address(
                "participant",
                "The owner of the archive searched (a user's own archive).",
                false,
            ),
            address(
                "peer",
                "The other side of the conversation (in a room: the sender).",
                false,
            ),
            address("room", "A room's archive; excludes participant.", false),
        ]
    };
    let mut export_params = search_filters();
    export_params.extend(common_filters());
    export_params.push(param(
        "format",
        "jsonl: one Message object per line; csv: RFC 4180 with a header line.",
        &json!({"type": "string", "enum": ["jsonl", "csv"]}),
        true,
    ));
    let mut export_responses = problem_responses(true);
    export_responses["200"] = json!({
        "description": "Every matching message up to the time of the request, streamed in time order. \
                        A transfer that ends without its final chunk was cut short by an error.",
        "headers": audit_header(),
        "content": {
            "application/x-ndjson": {"schema": {"$ref": "#/components/schemas/Message"}},
            "text/csv": {"schema": {"type": "string"}},
        },
    });
    let mut token_responses = problem_responses(false);
    token_responses["200"] = json!({
        "description": "Every token (never the token text).",
        "content": {"application/json": {"schema": {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Token"}}},
        }}},
    });
    let nullable =
        |description: &str| json!({"type": ["string", "null"], "description": description});
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Switchboard compliance API",
            "version": "1.0.0",
            "description": "Search, conversation view and export of the chat archive for compliance \
                            officers; user administration for administrators. Every archive query is \
                            recorded in the compliance log. Errors are RFC 9457 problem details.",
        },
        "tags": [
            {"name": "archive", "description": "The chat archive (compliance-officer role)."},
            {"name": "administration", "description": "Administration (administrator role)."},
            {"name": "meta", "description": "This document."},
        ],
        "paths": {
            "/api/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This OpenAPI document",
                    "tags": ["meta"],
                    "security": [],
                    "responses": {"200": {
                        "description": "The OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }},
                }
            },
            "/api/v1/archive/messages": page_operation(
                "searchMessages",
                "Search the archive",
                "Archive rows matching every given filter. A 1:1 message between two users of \
                 this deployment is in both users' archives; without participant or room it \
                 is listed once per archive (see owner and direction).",
                search_filters(),
            ),
            "/api/v1/archive/conversation": page_operation(
                "conversation",
                "The conversation between two addresses",
                "The 1:1 messages between participant and peer in both directions, each once.",
                vec![
                    address("participant", "One side.", true),
                    address("peer", "The other side.", true),
                ],
            ),
            "/api/v1/archive/export": {
                "get": {
                    "operationId": "exportMessages",
                    "summary": "Export a search's result set",
                    "tags": ["archive"],
                    "security": [{"token": []}],
                    "parameters": export_params,
                    "responses": export_responses,
                }
            },
            "/api/v1/tokens": {
                "get": {
                    "operationId": "listTokens",
                    "summary": "List API tokens",
                    "tags": ["administration"],
                    "security": [{"token": []}],
                    "responses": token_responses,
                }
            },
        },
        "components": {
            "securitySchemes": {
                "token": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `switchboard token create`.",
                }
            },
            "schemas": {
                "Message": {
                    "type": "object",
                    "required": ["archive_id", "owner", "peer", "direction", "kind", "message_id",
                                 "sender", "stanza", "at", "at_us"],
                    "properties": {
                        "archive_id": {"type": "string", "description": "Event id (UUIDv7), shared by both sides of a 1:1 message."},
                        "owner": {"type": "string", "description": "Whose archive the row is in (a user or a room)."},
                        "peer": {"type": "string", "description": "The other side (in a room: the sender)."},
                        "peer_full": nullable("The other side's full address, if known."),
                        "direction": {"type": "string", "enum": ["out", "in", "groupchat"]},
                        "kind": {"type": "string", "enum": ["chat", "normal", "headline", "groupchat"]},
                        "message_id": {"type": "string"},
                        "sender": {"type": "string", "description": "Full address of the sender."},
                        "nick": nullable("Room nickname of the sender."),
                        "thread": nullable("Thread."),
                        "subject": nullable("Subject."),
                        "body": nullable("Body."),
                        "stanza": {"type": "string", "description": "The stanza as received."},
                        "at": {"type": "string", "format": "date-time"},
                        "at_us": {"type": "integer", "description": "Microseconds since the Unix epoch."},
                    },
                },
                "Page": {
                    "type": "object",
                    "required": ["items", "next_cursor"],
                    "properties": {
                        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
                        "next_cursor": {"type": ["string", "null"], "description": "Pass as cursor for the next page; null on the last page."},
                    },
                },
                "Problem": {
                    "type": "object",
                    "description": "RFC 9457 problem details.",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string", "format": "uri-reference"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "parameter": {"type": "string", "description": "The query parameter at fault (400)."},
                    },
                },
                "User": {
                    "type": "object",
                    "required": ["user", "enabled", "display_name"],
                    "properties": {
                        "user": {"type": "string", "description": "Bare address (RFC 7622 normalised)."},
                        "enabled": {"type": "boolean", "description": "Whether logins are allowed."},
                        "display_name": {"type": ["string", "null"]},
                    },
                },
                "Token": {
                    "type": "object",
                    "required": ["id", "name", "role", "created_us", "revoked_us"],
                    "properties": {
                        "id": {"type": "string"},
                        "name": {"type": "string"},
                        "role": {"type": "string", "enum": ["compliance-officer", "administrator"]},
                        "created_us": {"type": "integer"},
                        "revoked_us": {"type": ["integer", "null"]},
                    },
                },
            },
        },
    });
    if let (Some(paths), Value::Object(users)) = (doc["paths"].as_object_mut(), user_paths()) {
        paths.extend(users);
    }
    doc
}

/// The document as served and committed: pretty JSON with a final newline.
pub fn document_text() -> String {
    let mut text = serde_json::to_string_pretty(&document()).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn openapi_json_is_committed_and_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let generated = document_text();
        if std::env::var_os("SWITCHBOARD_BLESS").is_some() {
            std::fs::write(path, &generated).expect("write openapi.json");
        }
        let committed = std::fs::read_to_string(path).expect("read projections/openapi.json");
        assert!(
            committed == generated,
            "projections/openapi.json is stale; regenerate with \
             SWITCHBOARD_BLESS=1 cargo test -p switchboard-projections openapi"
        );
    }

    #[test]
    fn every_route_is_documented_and_nothing_else() {
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented = BTreeSet::new();
        for (path, item) in paths {
            // Path-level `parameters` is not an operation.
            for method in item.as_object().expect("path item").keys() {
                if method == "parameters" {
                    continue;
                }
                documented.insert((path.clone(), method.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = crate::api::routes()
            .into_iter()
            .map(|(path, method, _)| (path.to_owned(), method.as_str().to_ascii_lowercase()))
            .collect();
        assert_eq!(documented, routed);
        // Every documented query parameter is one the handler accepts.
        let accepted = |path: &str| -> Vec<&str> {
            match path {
                "/api/v1/archive/messages" => crate::api::SEARCH_PARAMS.to_vec(),
                "/api/v1/archive/conversation" => crate::api::CONVERSATION_PARAMS.to_vec(),
                "/api/v1/archive/export" => crate::api::EXPORT_PARAMS.to_vec(),
                _ => Vec::new(),
            }
        };
        for (path, item) in paths {
            let names: BTreeSet<&str> = item["get"]["parameters"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
                .unwrap_or_default();
            let expected: BTreeSet<&str> = accepted(path).into_iter().collect();
            assert_eq!(names, expected, "{path}");
        }
    }
}
