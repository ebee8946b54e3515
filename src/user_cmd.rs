//! `switchboard user add|passwd|disable|enable|delete|list`.

use std::io::BufRead;

use anyhow::{Context, bail};
use clap::Subcommand;
use switchboard_gateway::xmpp::jid::BareJid;
use switchboard_infra::config::Config;
use switchboard_schemas::events::{DigestCredential, ScramCredential, ScramMechanism};

use crate::admin::{self, Request, Response};

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Provision a user; asks for the password (no echo) unless
    /// --password-stdin.
    Add {
        /// Bare address, e.g. alice@example.com (the domain must be served).
        user: String,
        /// Display name.
        #[arg(long)]
        display_name: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a user's password.
    Passwd {
        /// Bare address.
        user: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Disable a user: logins fail.
    Disable {
        /// Bare address.
        user: String,
        /// Reason, kept in the audit event.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Enable a disabled user.
    Enable {
        /// Bare address.
        user: String,
    },
    /// Delete a user.
    Delete {
        /// Bare address.
        user: String,
    },
    /// List users.
    List,
}

pub async fn run(config: &Config, cmd: UserCommand) -> anyhow::Result<()> {
    let by = format!(
        "admin-cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned())
    );
    let request = match cmd {
        UserCommand::Add {
            user,
            display_name,
            password_stdin,
        } => {
            let user = hosted_user(config, &user)?;
            let password = read_password(password_stdin, true)?;
            let credentials = credentials(config, &password)?;
            let digest = digest(config, &user, &password);
            Request::UserAdd {
                user,
                display_name,
                credentials,
                digest,
                by,
            }
        }
        UserCommand::Passwd {
            user,
            password_stdin,
        } => {
            let user = hosted_user(config, &user)?;
            let password = read_password(password_stdin, true)?;
            let credentials = credentials(config, &password)?;
            let digest = digest(config, &user, &password);
            Request::UserPasswd {
                user,
                credentials,
                digest,
                by,
            }
        }
        UserCommand::Disable { user, reason } => Request::UserDisable {
            user: hosted_user(config, &user)?,
            reason,
            by,
        },
        UserCommand::Enable { user } => Request::UserEnable {
            user: hosted_user(config, &user)?,
            by,
        },
        UserCommand::Delete { user } => Request::UserDelete {
            user: hosted_user(config, &user)?,
            by,
        },
        UserCommand::List => Request::UserList,
    };
    match admin::submit(config, request).await? {
        Response::Done { message } => println!("{message}"),
        Response::Users { users } => {
            for u in users {
                println!(
                    "{}\t{}\t{}",
                    u.user,
                    if u.enabled { "enabled" } else { "disabled" },
                    u.display_name.unwrap_or_default()
                );
            }
        }
        Response::Settings { .. } => bail!("unexpected answer to a user request"),
        Response::Error { message } => bail!("{message}"),
    }
    Ok(())
}

/// Normalises `user` (RFC 7622) and checks that its domain is served.
pub(crate) fn hosted_user(config: &Config, user: &str) -> anyhow::Result<String> {
    let jid: BareJid = user
        .parse()
        .with_context(|| format!("{user:?} is not a valid address"))?;
    if jid.local().is_none() {
        bail!("{user:?} has no user part (expected user@domain)");
    }
    if !config
        .domains
        .iter()
        .any(|d| d.eq_ignore_ascii_case(jid.domain()))
    {
        bail!(
            "{} is not a served domain (domains = {:?})",
            jid.domain(),
            config.domains
        );
    }
    Ok(jid.to_string())
}

fn read_password(from_stdin: bool, confirm: bool) -> anyhow::Result<String> {
    let password = if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        let first = rpassword::prompt_password("Password: ").context("reading the password")?;
        if confirm {
            let second = rpassword::prompt_password("Again: ").context("reading the password")?;
            if first != second {
                bail!("the passwords differ");
            }
        }
        first
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    Ok(password)
}

/// SIP digest secrets (RFC 3261 §22.4, RFC 7616) of `password` for the
/// configured realm, SHA-256 and MD5, with the localpart as the username.
pub(crate) fn digest(config: &Config, user: &str, password: &str) -> Vec<DigestCredential> {
    let default_domain = config.domains.first().map(String::as_str).unwrap_or("");
    let realm = config.sip.realm_or(default_domain);
    let username = user.split_once('@').map_or(user, |(local, _)| local);
    switchboard_gateway::sip::digest::OFFERED
        .iter()
        .map(|algorithm| DigestCredential {
            algorithm: algorithm.clone(),
            realm: realm.to_owned(),
            ha1_hex: switchboard_gateway::sip::digest::ha1(algorithm, username, realm, password),
        })
        .collect()
}

/// SCRAM-SHA-256 and SCRAM-SHA-1 keys of `password`, with fresh salts.
pub(crate) fn credentials(config: &Config, password: &str) -> anyhow::Result<Vec<ScramCredential>> {
    [ScramMechanism::ScramSha256, ScramMechanism::ScramSha1]
        .into_iter()
        .map(|m| {
            switchboard_gateway::sasl::scram::new_credentials(
                m,
                password,
                config.auth.scram_iterations,
            )
            .map_err(anyhow::Error::from)
        })
        .collect()
}
