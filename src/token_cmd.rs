//! `switchboard token create|revoke|list`: API tokens of the compliance API,
//! written straight to the projections database (no server needed). A new
//! token is printed once; the database keeps only its SHA-256.

use anyhow::Context;
use clap::Subcommand;
use switchboard_infra::config::Config;
use switchboard_projections::api::store::{self, Role};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (it is not shown again).
    Create {
        /// compliance-officer (archive search and export) or administrator.
        #[arg(long)]
        role: String,
        /// Who holds the token (unique; recorded with every query).
        #[arg(long)]
        name: String,
    },
    /// Revoke a token by name; it stops working at once.
    Revoke {
        /// The token's name.
        name: String,
    },
    /// List tokens (names, roles, times; never the tokens).
    List,
}

pub async fn run(config: &Config, cmd: TokenCommand) -> anyhow::Result<()> {
    // Check the arguments before touching the database.
    let role = match &cmd {
        TokenCommand::Create { role, .. } => Some(role.parse::<Role>()?),
        _ => None,
    };
    let db = switchboard_projections::open_database(config)
        .await
        .context("opening the projections database")?;
    let result = async {
        match cmd {
            TokenCommand::Create { name, .. } => {
                let role = role.context("role checked above")?;
                let (token, info) = store::create_token(&db, &name, role).await?;
                eprintln!(
                    "created token {:?} ({}); store it now, it is not shown again",
                    info.name, info.role
                );
                println!("{token}");
            }
            TokenCommand::Revoke { name } => {
                let info = store::revoke_token(&db, &name).await?;
                println!("revoked token {:?} ({})", info.name, info.role);
            }
            TokenCommand::List => {
                for t in store::list_tokens(&db).await? {
                    let revoked = t
                        .revoked_us
                        .map(|r| format!("revoked {}", store::rfc3339(r)))
                        .unwrap_or_else(|| "active".to_owned());
                    println!(
                        "{}\t{}\t{}\tcreated {}\t{revoked}",
                        t.name,
                        t.role,
                        t.id,
                        store::rfc3339(t.created_us)
                    );
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    db.close().await;
    result
}
