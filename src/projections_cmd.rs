//! `switchboard replay`, `switchboard compliance verify` and `switchboard
//! projections run`: the projections from the command line.
//!
//! On the embedded bus these need the server stopped (the log is held by one
//! process). On Kafka they run beside the servers: a replay resets the
//! projection's rows and positions in one transaction and the group's
//! members (this command and any running server) rebuild it.

use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use switchboard_infra::bus::{self, TopicConfig};
use switchboard_infra::config::Config;
use switchboard_projections::{ProjectionKind, Status, runner};

#[derive(Debug, Subcommand)]
pub enum ComplianceCommand {
    /// Check the compliance log's hash chain; names the first bad record and
    /// exits with status 1 when a record was edited or deleted.
    Verify,
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Run the projections (all, or those named) without the rest of the
    /// server.
    Run {
        /// Projections to run (rosters, sessions, archive, files, compliance);
        /// all when none are named.
        projections: Vec<String>,
        /// Stop once the positions reach the ends the topics had at start.
        #[arg(long)]
        until_caught_up: bool,
    },
}

fn kinds(names: &[String]) -> anyhow::Result<Vec<ProjectionKind>> {
    if names.is_empty() {
        return Ok(ProjectionKind::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| n.parse().map_err(anyhow::Error::from))
        .collect()
}

async fn open(
    config: &Config,
) -> anyhow::Result<(Arc<dyn bus::Bus>, switchboard_projections::Database)> {
    let bus = bus::open(config)
        .await
        .with_context(|| format!("opening the {:?} bus", config.bus.backend))?;
    bus.create_topics(&TopicConfig::catalogue(&config.bus.topic_prefix))
        .await
        .context("creating the catalogue's topics")?;
    let db = switchboard_projections::open_database(config)
        .await
        .context("opening the projections database")?;
    Ok((bus, db))
}

/// `switchboard replay PROJECTION`: drops one projection's rows and
/// positions and rebuilds it from the log, up to the log's end at start.
pub async fn replay(config: &Config, projection: &str) -> anyhow::Result<()> {
    let kind: ProjectionKind = projection.parse()?;
    let (bus, db) = open(config).await?;
    let runner_config = Arc::new(switchboard_projections::runner_config(config));
    let started = std::time::Instant::now();
    db.reset(kind, &kind.group(&config.bus.topic_prefix))
        .await
        .with_context(|| format!("emptying projection {kind}"))?;
    let reached = runner::catch_up(bus, db.clone(), kind, runner_config)
        .await
        .with_context(|| format!("rebuilding projection {kind}"))?;
    let rows = db.snapshot(kind).await?.len();
    let records: i64 = reached.positions.values().sum();
    println!(
        "replayed {kind}: {records} records read, {rows} rows, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    db.close().await;
    Ok(())
}

/// `switchboard compliance ...`.
pub async fn compliance(config: &Config, cmd: ComplianceCommand) -> anyhow::Result<()> {
    match cmd {
        ComplianceCommand::Verify => {
            let db = switchboard_projections::open_database(config)
                .await
                .context("opening the projections database")?;
            let v = db.verify_compliance().await?;
            db.close().await;
            match v.broken {
                None => {
                    println!(
                        "compliance log intact: {} records, head {}",
                        v.records, v.head_hash
                    );
                    Ok(())
                }
                Some(b) => {
                    println!(
                        "compliance log broken at record {}: {b} ({} records before it verified)",
                        b.seq(),
                        v.records
                    );
                    anyhow::bail!("compliance log broken at record {}", b.seq())
                }
            }
        }
    }
}

/// `switchboard projections ...`.
pub async fn projections(config: &Config, cmd: ProjectionsCommand) -> anyhow::Result<()> {
    match cmd {
        ProjectionsCommand::Run {
            projections,
            until_caught_up,
        } => {
            let kinds = kinds(&projections)?;
            let (bus, db) = open(config).await?;
            let runner_config = Arc::new(switchboard_projections::runner_config(config));
            if until_caught_up {
                for kind in kinds {
                    let reached =
                        runner::catch_up(bus.clone(), db.clone(), kind, runner_config.clone())
                            .await
                            .with_context(|| format!("running projection {kind}"))?;
                    let records: i64 = reached.positions.values().sum();
                    println!("caught up {kind}: position sum {records}");
                }
            } else {
                let status = Status::new(&kinds);
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                let tasks = switchboard_projections::spawn_all(
                    &bus,
                    &db,
                    &runner_config,
                    &status,
                    &stop_rx,
                );
                tokio::signal::ctrl_c().await.ok();
                let _ = stop_tx.send(true);
                for t in tasks {
                    let _ = t.await;
                }
            }
            db.close().await;
            Ok(())
        }
    }
}
