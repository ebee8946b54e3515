//! The compliance API (SPEC.md §10): archive search, conversation view and
//! streamed export over the projections database, for holders of API tokens.
//!
//! - Authentication: `Authorization: Bearer <token>` (RFC 6750 §2.1). Tokens
//!   are made by `switchboard token create` and stored as their SHA-256
//!   only ([`store`]). No or an unknown/revoked token: 401; a token whose
//!   role may not use the operation: 403. Archive operations need the
//!   compliance-officer role; token listing the administrator role.
//! - Errors are RFC 9457 problem bodies ([`problem`]); a bad query parameter
//!   is named in the `parameter` member.
//! - Every archive query is recorded in the compliance log before it is
//!   answered ([`crate::compliance::QueryAudit`]): who (token), what
//!   (operation and parameters), when. The response names the record's
//!   sequence number in `Switchboard-Audit-Seq`.
//! - Pages are keyset-paged in time order (time, then row): `next_cursor`
//!   is opaque and stays valid while rows are added.
//! - The OpenAPI 3.1 document ([`openapi`]) is served at
//!   `GET /api/openapi.json` and committed as `projections/openapi.json`.

pub mod openapi;
pub mod params;
pub mod problem;
pub mod store;
pub mod users;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};

use crate::Database;
use crate::compliance::QueryAudit;
use params::{ExportFormat, Params};
use problem::Problem;
use store::{CSV_COLUMNS, Message, Role, Search, TokenInfo};

/// Rows per database query while exporting.
const EXPORT_PAGE: i64 = 1000;
/// Encoded pages buffered ahead of a slow export client.
const EXPORT_BUFFER: usize = 4;
/// Response header naming the audit record of a query.
pub const AUDIT_HEADER: &str = "switchboard-audit-seq";

/// State of the API's handlers.
#[derive(Clone)]
pub struct ApiState {
    db: Database,
    users: users::Users,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("db", &self.db)
            .field("users", &self.users.is_some())
            .finish()
    }
}

type Pairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// Parameters of the archive search (and the export without `format`).
pub const SEARCH_PARAMS: [&str; 8] = [
    "participant",
    "peer",
    "room",
    "start",
    "end",
    "q",
    "limit",
    "cursor",
];
/// Parameters of the conversation view.
pub const CONVERSATION_PARAMS: [&str; 7] = [
    "participant",
    "peer",
    "start",
    "end",
    "q",
    "limit",
    "cursor",
];
/// Parameters of the export.
pub const EXPORT_PARAMS: [&str; 7] = ["participant", "peer", "room", "start", "end", "q", "format"];

/// Every route: path, method and handler. The router is built from this
/// list and a test checks the OpenAPI document against it.
pub fn routes() -> Vec<(&'static str, Method, MethodRouter<ApiState>)> {
    vec![
        ("/api/openapi.json", Method::GET, get(openapi_json)),
        ("/api/v1/archive/messages", Method::GET, get(messages)),
        (
            "/api/v1/archive/conversation",
            Method::GET,
            get(conversation),
        ),
        ("/api/v1/archive/export", Method::GET, get(export)),
        ("/api/v1/tokens", Method::GET, get(tokens)),
        ("/api/v1/users", Method::GET, get(users::list)),
        ("/api/v1/users", Method::POST, post(users::add)),
        (
            "/api/v1/users/{user}/password",
            Method::PUT,
            put(users::passwd),
        ),
        (
            "/api/v1/users/{user}/disable",
            Method::POST,
            post(users::disable),
        ),
        (
            "/api/v1/users/{user}/enable",
            Method::POST,
            post(users::enable),
        ),
        (
            "/api/v1/users/{user}",
            Method::DELETE,
            delete(users::delete),
        ),
    ]
}

/// The API's router over a projections database, without user
/// administration (its routes answer 503).
pub fn router(db: Database) -> Router {
    router_with_users(db, None)
}

/// The API's router, with user administration done by `users`.
pub fn router_with_users(db: Database, users: users::Users) -> Router {
    let mut router = Router::new();
    for (path, _, handler) in routes() {
        router = router.route(path, handler);
    }
    router.with_state(ApiState { db, users })
}

async fn openapi_json() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::document_text(),
    )
}

/// The token of a request, if it has the role.
async fn authorize(st: &ApiState, headers: &HeaderMap, role: Role) -> Result<TokenInfo, Problem> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(Problem::unauthorized(
            "an API token is required: Authorization: Bearer <token>",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or_else(|| Problem::unauthorized("the Authorization header must be Bearer <token>"))?;
    let info = store::authenticate(&st.db, token)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "token lookup failed");
            Problem::internal()
        })?
        .ok_or_else(|| Problem::unauthorized("the token is unknown or revoked"))?;
    if info.role != role.name() {
        return Err(Problem::forbidden(format!(
            "this operation needs the {role} role; the token {:?} has the {} role",
            info.name, info.role
        )));
    }
    Ok(info)
}

/// Authenticates, checks the parameters (`check`), then records the query
/// in the compliance log. The token is checked first (401/403 before 400);
/// a malformed request is not a query and is not recorded.
async fn admit<T>(
    st: &ApiState,
    headers: &HeaderMap,
    pairs: Pairs,
    allowed: &[&str],
    operation: &str,
    check: impl FnOnce(&Params) -> Result<T, Problem>,
) -> Result<(T, i64), Problem> {
    let token = authorize(st, headers, Role::ComplianceOfficer).await?;
    let Query(pairs) = pairs.map_err(|e| Problem::invalid("query", e.body_text()))?;
    let params = Params::new(pairs, allowed)?;
    let checked = check(&params)?;
    let audit = QueryAudit {
        token_id: token.id,
        token_name: token.name,
        role: token.role,
        operation: operation.to_owned(),
        parameters: params.audit(),
        at_us: store::now_us(),
    };
    let seq = store::append_audit(&st.db, &audit).await.map_err(|e| {
        tracing::error!(error = %e, "audit record not written; query refused");
        Problem::internal()
    })?;
    Ok((checked, seq))
}

fn audited(seq: i64, mut response: Response) -> Response {
    if let Ok(v) = HeaderValue::from_str(&seq.to_string()) {
        response.headers_mut().insert(AUDIT_HEADER, v);
    }
    response
}

async fn messages(State(st): State<ApiState>, headers: HeaderMap, pairs: Pairs) -> Response {
    page_response(
        &st,
        &headers,
        pairs,
        &SEARCH_PARAMS,
        "GET /api/v1/archive/messages",
        Params::search,
    )
    .await
}

async fn conversation(State(st): State<ApiState>, headers: HeaderMap, pairs: Pairs) -> Response {
    page_response(
        &st,
        &headers,
        pairs,
        &CONVERSATION_PARAMS,
        "GET /api/v1/archive/conversation",
        Params::conversation,
    )
    .await
}

async fn page_response(
    st: &ApiState,
    headers: &HeaderMap,
    pairs: Pairs,
    allowed: &[&str],
    operation: &str,
    select: fn(&Params) -> Result<Search, Problem>,
) -> Response {
    let answer = async {
        let ((search, limit, cursor), seq) = admit(st, headers, pairs, allowed, operation, |p| {
            Ok((select(p)?, p.limit()?, p.cursor()?))
        })
        .await?;
        let (items, next) = store::page(&st.db, &search, cursor, limit)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "archive query failed");
                Problem::internal()
            })?;
        Ok::<_, Problem>((seq, items, next))
    };
    match answer.await {
        Ok((seq, items, next)) => {
            let body = serde_json::json!({
                "items": items,
                "next_cursor": next.as_ref().map(store::Cursor::encode),
            });
            audited(seq, axum::Json(body).into_response())
        }
        Err(p) => p.into_response(),
    }
}

async fn export(State(st): State<ApiState>, headers: HeaderMap, pairs: Pairs) -> Response {
    let admitted = admit(
        &st,
        &headers,
        pairs,
        &EXPORT_PARAMS,
        "GET /api/v1/archive/export",
        |p| Ok((p.format()?, p.search()?)),
    )
    .await;
    let ((format, mut search), seq) = match admitted {
        Ok(v) => v,
        Err(p) => return p.into_response(),
    };
    // The export ends at the time it started: rows still arriving do not
    // keep it running.
    let now = store::now_us() + 1;
    search.end_us = Some(search.end_us.map_or(now, |e| e.min(now)));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(EXPORT_BUFFER);
    let db = st.db.clone();
    tokio::spawn(async move {
        if format == ExportFormat::Csv {
            let header = csv_line(CSV_COLUMNS.iter().map(|c| (*c).to_owned()));
            if tx.send(Ok(header.into_bytes())).await.is_err() {
                return;
            }
        }
        let mut cursor = None;
        loop {
            match store::page(&db, &search, cursor, EXPORT_PAGE).await {
                Ok((items, next)) => {
                    let chunk = encode(&items, format);
                    if !chunk.is_empty() && tx.send(Ok(chunk)).await.is_err() {
                        return; // the client went away
                    }
                    match next {
                        Some(c) => cursor = Some(c),
                        None => return,
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "export failed midway; the response is cut short");
                    // An error ends the body without its last chunk, so the
                    // client sees a truncated transfer, not a short result.
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let (content_type, extension) = match format {
        ExportFormat::JsonLines => ("application/x-ndjson", "jsonl"),
        ExportFormat::Csv => ("text/csv; charset=utf-8; header=present", "csv"),
    };
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"archive-export-{seq}.{extension}\""),
        )
        .body(Body::from_stream(stream));
    match response {
        Ok(r) => audited(seq, r),
        Err(_) => Problem::internal().into_response(),
    }
}

fn encode(items: &[Message], format: ExportFormat) -> Vec<u8> {
    let mut out = Vec::new();
    for m in items {
        match format {
            ExportFormat::JsonLines => {
                if serde_json::to_writer(&mut out, m).is_ok() {
                    out.push(b'\n');
                }
            }
            ExportFormat::Csv => out.extend_from_slice(csv_line(m.csv_fields()).as_bytes()),
        }
    }
    out
}

/// One RFC 4180 record: fields with a comma, quote, CR or LF are quoted
/// (quotes doubled); lines end with CRLF. Values are exported unchanged.
fn csv_line(fields: impl IntoIterator<Item = String>) -> String {
    let mut line = String::new();
    for (i, f) in fields.into_iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        if f.contains([',', '"', '\r', '\n']) {
            line.push('"');
            line.push_str(&f.replace('"', "\"\""));
            line.push('"');
        } else {
            line.push_str(&f);
        }
    }
    line.push_str("\r\n");
    line
}

async fn tokens(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    if let Err(p) = authorize(&st, &headers, Role::Administrator).await {
        return p.into_response();
    }
    match store::list_tokens(&st.db).await {
        Ok(list) => axum::Json(serde_json::json!({ "items": list })).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "token listing failed");
            Problem::internal().into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_when_needed() {
        let line = csv_line(
            ["a", "b,c", "say \"hi\"", "two\nlines", ""]
                .iter()
                .map(|s| (*s).to_owned()),
        );
        assert_eq!(line, "a,\"b,c\",\"say \"\"hi\"\"\",\"two\nlines\",\r\n");
    }
}
