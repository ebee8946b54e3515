//! User administration over HTTP (issue 3 "Users": the operations of
//! `switchboard user add|passwd|disable|enable|delete|list`), for tokens
//! with the administrator role.
//!
//! The API only checks the request and maps outcomes to HTTP; the work is
//! done by a [`UserAdministration`] the process provides (the same executor
//! the admin socket uses, so a change is the same `user.*` audit event and
//! `user.state` record either way, with `by` naming the token). A password
//! arrives in the JSON body, is turned into salted keys by the executor and
//! is never stored, logged or put in an event.
//!
//! | method and path | success |
//! |---|---|
//! | `GET /api/v1/users` | 200 `{"items": [User]}` |
//! | `POST /api/v1/users` `{"user", "password", "display_name"?}` | 201 `User` |
//! | `PUT /api/v1/users/{user}/password` `{"password"}` | 204 |
//! | `POST /api/v1/users/{user}/disable` `{"reason"?}` | 204 |
//! | `POST /api/v1/users/{user}/enable` | 204 |
//! | `DELETE /api/v1/users/{user}` | 204 |
//!
//! Errors are problem bodies: 400 naming the field (`parameter`) for a
//! malformed body, address or password; 404 for an unknown user; 409 when
//! the user exists already; 503 when this process does not administer users.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::problem::Problem;
use super::store::Role;
use super::{ApiState, authorize};

/// Longest password accepted, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Longest display name or reason accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 1024;

/// A user as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    /// Bare address (normalised, RFC 7622).
    pub user: String,
    /// Whether logins are allowed.
    pub enabled: bool,
    /// Display name.
    pub display_name: Option<String>,
}

/// Why an operation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// A field is malformed (400, naming the field).
    #[error("{field}: {detail}")]
    Invalid {
        /// `user`, `password`, `display_name` or `reason`.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// No such user (404).
    #[error("no user {0}")]
    NotFound(String),
    /// The user exists already (409).
    #[error("user {0} already exists")]
    Exists(String),
    /// Not served now (503), e.g. while the server starts.
    #[error("{0}")]
    Unavailable(String),
    /// The change could not be stored (500; the detail is logged).
    #[error("{0}")]
    Failed(String),
}

/// The user administration a process offers to the API.
#[async_trait::async_trait]
pub trait UserAdministration: Send + Sync + 'static {
    /// Every user, in address order.
    async fn list(&self) -> Result<Vec<UserView>, AdminError>;
    /// Provisions a user; returns it as stored.
    async fn add(
        &self,
        user: &str,
        password: &str,
        display_name: Option<String>,
        by: &str,
    ) -> Result<UserView, AdminError>;
    /// Replaces a user's password.
    async fn passwd(&self, user: &str, password: &str, by: &str) -> Result<(), AdminError>;
    /// Disables (`enabled` false, with a reason) or enables a user.
    async fn set_enabled(
        &self,
        user: &str,
        enabled: bool,
        reason: Option<String>,
        by: &str,
    ) -> Result<(), AdminError>;
    /// Deletes a user.
    async fn delete(&self, user: &str, by: &str) -> Result<(), AdminError>;
}

/// The administration handle in the API's state (none: 503).
pub type Users = Option<Arc<dyn UserAdministration>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewUser {
    user: String,
    password: String,
    #[serde(default)]
    display_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewPassword {
    password: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Disable {
    #[serde(default)]
    reason: Option<String>,
}

impl From<AdminError> for Problem {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Invalid { field, detail } => Problem::invalid(field, detail),
            AdminError::NotFound(user) => Problem {
                status: StatusCode::NOT_FOUND,
                kind: "about:blank",
                title: "Not Found",
                detail: format!("no user {user}"),
                parameter: Some("user".to_owned()),
            },
            AdminError::Exists(user) => Problem {
                status: StatusCode::CONFLICT,
                kind: "about:blank",
                title: "Conflict",
                detail: format!("user {user} already exists"),
                parameter: Some("user".to_owned()),
            },
            AdminError::Unavailable(detail) => unavailable(detail),
            AdminError::Failed(detail) => {
                tracing::error!(error = %detail, "user administration failed");
                Problem {
                    detail: "the change could not be stored; nothing was changed".to_owned(),
                    ..Problem::internal()
                }
            }
        }
    }
}

fn unavailable(detail: String) -> Problem {
    Problem {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "about:blank",
        title: "Service Unavailable",
        detail,
        parameter: None,
    }
}

/// The administrator's token and the executor, or the problem to answer.
async fn admin(
    st: &ApiState,
    headers: &HeaderMap,
) -> Result<(Arc<dyn UserAdministration>, String), Problem> {
    let token = authorize(st, headers, Role::Administrator).await?;
    let users = st
        .users
        .clone()
        .ok_or_else(|| unavailable("this process does not administer users".to_owned()))?;
    Ok((users, format!("api-token:{}", token.name)))
}

/// A JSON body, or 400 naming what is wrong with it.
fn body<T>(json: Result<Json<T>, JsonRejection>) -> Result<T, Problem> {
    json.map(|Json(v)| v)
        .map_err(|e| Problem::invalid("body", e.body_text()))
}

fn password(p: &str) -> Result<(), Problem> {
    if p.is_empty() {
        return Err(Problem::invalid("password", "the password is empty"));
    }
    if p.len() > MAX_PASSWORD_BYTES {
        return Err(Problem::invalid(
            "password",
            format!("longer than {MAX_PASSWORD_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn text(field: &str, value: Option<&String>) -> Result<(), Problem> {
    match value {
        Some(v) if v.len() > MAX_TEXT_BYTES => Err(Problem::invalid(
            field,
            format!("longer than {MAX_TEXT_BYTES} bytes"),
        )),
        _ => Ok(()),
    }
}

fn outcome(result: Result<Response, Problem>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

pub(super) async fn list(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    outcome(
        async {
            let (users, _) = admin(&st, &headers).await?;
            let items = users.list().await?;
            Ok(Json(serde_json::json!({ "items": items })).into_response())
        }
        .await,
    )
}

pub(super) async fn add(
    State(st): State<ApiState>,
    headers: HeaderMap,
    json: Result<Json<NewUser>, JsonRejection>,
) -> Response {
    outcome(
        async {
            let (users, by) = admin(&st, &headers).await?;
            let new = body(json)?;
            password(&new.password)?;
            text("display_name", new.display_name.as_ref())?;
            let user = users
                .add(&new.user, &new.password, new.display_name, &by)
                .await?;
            Ok((StatusCode::CREATED, Json(user)).into_response())
        }
        .await,
    )
}

pub(super) async fn passwd(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
    json: Result<Json<NewPassword>, JsonRejection>,
) -> Response {
    outcome(
        async {
            let (users, by) = admin(&st, &headers).await?;
            let new = body(json)?;
            password(&new.password)?;
            users.passwd(&user, &new.password, &by).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

pub(super) async fn disable(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
    json: Result<Json<Disable>, JsonRejection>,
) -> Response {
    outcome(
        async {
            let (users, by) = admin(&st, &headers).await?;
            // The body is optional: no body (or no JSON type) is no reason.
            let reason = match json {
                Err(JsonRejection::MissingJsonContentType(_)) => None,
                other => body(other)?.reason,
            };
            text("reason", reason.as_ref())?;
            users.set_enabled(&user, false, reason, &by).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

pub(super) async fn enable(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Response {
    outcome(
        async {
            let (users, by) = admin(&st, &headers).await?;
            users.set_enabled(&user, true, None, &by).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

pub(super) async fn delete(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Response {
    outcome(
        async {
            let (users, by) = admin(&st, &headers).await?;
            users.delete(&user, &by).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}
