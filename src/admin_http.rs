//! User administration for the HTTP API (`/api/v1/users`, issue 3 "Users"):
//! the API's [`UserAdministration`] over the same [`Admin`] executor as the
//! admin socket, so the HTTP and CLI paths write the same events.

use std::sync::{Arc, OnceLock};

use switchboard_infra::config::Config;
use switchboard_projections::api::users::{AdminError, UserAdministration, UserView};

use crate::admin::{Admin, Request, Response};
use crate::user_cmd;

/// The executor and the configuration its checks need (served domains,
/// SCRAM iterations, SIP realm).
/// The executor exists once the bus is open; the HTTP API serves before
/// that (health, readiness), so until then these routes answer 503.
pub struct HttpUsers {
    admin: Arc<OnceLock<Arc<Admin>>>,
    config: Arc<Config>,
}

impl HttpUsers {
    pub fn new(admin: Arc<OnceLock<Arc<Admin>>>, config: Arc<Config>) -> Self {
        Self { admin, config }
    }

    fn admin(&self) -> Result<&Admin, AdminError> {
        self.admin
            .get()
            .map(|a| &**a)
            .ok_or_else(|| AdminError::Unavailable("the server is starting".to_owned()))
    }

    /// RFC 7622 normalisation and a served domain, or 400 naming `user`.
    fn user(&self, user: &str) -> Result<String, AdminError> {
        user_cmd::hosted_user(&self.config, user).map_err(|e| AdminError::Invalid {
            field: "user",
            detail: format!("{e:#}"),
        })
    }

    async fn existing(&self, user: &str) -> Result<String, AdminError> {
        let user = self.user(user)?;
        if self.admin()?.has_user(&user).await {
            Ok(user)
        } else {
            Err(AdminError::NotFound(user))
        }
    }

    /// SCRAM keys and digest secrets, off the async threads (PBKDF2).
    async fn secrets(
        &self,
        user: &str,
        password: &str,
    ) -> Result<
        (
            Vec<switchboard_schemas::events::ScramCredential>,
            Vec<switchboard_schemas::events::DigestCredential>,
        ),
        AdminError,
    > {
        let (config, user, password) = (self.config.clone(), user.to_owned(), password.to_owned());
        tokio::task::spawn_blocking(move || {
            let credentials = user_cmd::credentials(&config, &password)
                .map_err(|e| AdminError::Failed(format!("{e:#}")))?;
            Ok((credentials, user_cmd::digest(&config, &user, &password)))
        })
        .await
        .map_err(|e| AdminError::Failed(e.to_string()))?
    }

    async fn execute(&self, request: Request) -> Result<(), AdminError> {
        match self.admin()?.execute(request).await {
            Response::Done { .. } => Ok(()),
            Response::Error { message } => Err(AdminError::Failed(message)),
            other => Err(AdminError::Failed(format!("unexpected answer {other:?}"))),
        }
    }
}

#[async_trait::async_trait]
impl UserAdministration for HttpUsers {
    async fn list(&self) -> Result<Vec<UserView>, AdminError> {
        match self.admin()?.execute(Request::UserList).await {
            Response::Users { users } => Ok(users
                .into_iter()
                .map(|u| UserView {
                    user: u.user,
                    enabled: u.enabled,
                    display_name: u.display_name,
                })
                .collect()),
            Response::Error { message } => Err(AdminError::Failed(message)),
            other => Err(AdminError::Failed(format!("unexpected answer {other:?}"))),
        }
    }

    async fn add(
        &self,
        user: &str,
        password: &str,
        display_name: Option<String>,
        by: &str,
    ) -> Result<UserView, AdminError> {
        let user = self.user(user)?;
        if self.admin()?.has_user(&user).await {
            return Err(AdminError::Exists(user));
        }
        let (credentials, digest) = self.secrets(&user, password).await?;
        self.execute(Request::UserAdd {
            user: user.clone(),
            display_name: display_name.clone(),
            credentials,
            digest,
            by: by.to_owned(),
        })
        .await?;
        Ok(UserView {
            user,
            enabled: true,
            display_name,
        })
    }

    async fn passwd(&self, user: &str, password: &str, by: &str) -> Result<(), AdminError> {
        let user = self.existing(user).await?;
        let (credentials, digest) = self.secrets(&user, password).await?;
        self.execute(Request::UserPasswd {
            user,
            credentials,
            digest,
            by: by.to_owned(),
        })
        .await
    }

    async fn set_enabled(
        &self,
        user: &str,
        enabled: bool,
        reason: Option<String>,
        by: &str,
    ) -> Result<(), AdminError> {
        let user = self.existing(user).await?;
        let by = by.to_owned();
        self.execute(if enabled {
            Request::UserEnable { user, by }
        } else {
            Request::UserDisable { user, reason, by }
        })
        .await
    }

    async fn delete(&self, user: &str, by: &str) -> Result<(), AdminError> {
        let user = self.existing(user).await?;
        self.execute(Request::UserDelete {
            user,
            by: by.to_owned(),
        })
        .await
    }
}
