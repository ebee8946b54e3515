//! `switchboard serve`: starts the roles of this process and the HTTP
//! endpoints for health, readiness and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use switchboard_gateway::emit::EventSink;
use switchboard_gateway::users::UserDirectory;
use switchboard_gateway::xmpp::server::C2sContext;
use switchboard_infra::bus::{self, TopicConfig};
use switchboard_infra::config::{Backend, Config};
use switchboard_infra::{metrics, tls};
use switchboard_schemas::NodeId;
use switchboard_schemas::topics::{Topic, full_name};
use tokio::sync::watch;

use crate::supervise::supervise;

/// The role of one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Gateways, processors, projections and the HTTP API in one process.
    All,
    /// Client-facing gateways (XMPP, SIP) only.
    Gateway,
    /// Processors (presence, routing, rosters ...) only.
    Processors,
    /// SQL projections and the compliance/administration API only.
    Projections,
}

impl Role {
    fn runs_gateway(self) -> bool {
        matches!(self, Role::All | Role::Gateway)
    }

    fn runs_processors(self) -> bool {
        matches!(self, Role::All | Role::Processors)
    }

    fn runs_projections(self) -> bool {
        matches!(self, Role::All | Role::Projections)
    }
}

/// Interval of node heartbeats.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct AppState {
    ready: Arc<AtomicBool>,
    /// Not ready while a projection catches up (SPEC.md §12).
    projections: Arc<switchboard_projections::Status>,
}

pub async fn run(config: Config, role: Role) -> anyhow::Result<()> {
    // Sessions bound before this instant belong to an earlier run of this node.
    let started_at = std::time::SystemTime::now();
    if role != Role::All && config.bus.backend == Backend::Embedded {
        anyhow::bail!(
            "--role {role:?} needs a shared bus: the embedded log serves one process; \
             set bus.backend = \"kafka\" to run roles as separate processes"
        );
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let configured = config
        .tls
        .cert_path
        .as_deref()
        .zip(config.tls.key_path.as_deref());
    let cert = tls::ensure_certificate(configured, &config.data_dir.join("tls"), &config.domains)?;
    if cert.generated {
        tracing::info!(cert = %cert.cert.display(), "generated a self-signed certificate");
    }

    let ready = Arc::new(AtomicBool::new(false));
    let projection_status = switchboard_projections::Status::new(if role.runs_projections() {
        &switchboard_projections::ProjectionKind::ALL
    } else {
        &[]
    });
    // The projections database is opened before the HTTP server: the
    // compliance API (`/api/...`) is served with it by the roles that run
    // projections.
    let projections_db = if role.runs_projections() {
        let db = switchboard_projections::open_database(&config)
            .await
            .context("opening the projections database")?;
        tracing::info!(backend = db.backend(), "projections database ready");
        Some(db)
    } else {
        None
    };
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState {
            ready: ready.clone(),
            projections: projection_status.clone(),
        });
    // User administration over HTTP uses the admin executor, made once the
    // bus is open below.
    let http_admin: Arc<std::sync::OnceLock<Arc<crate::admin::Admin>>> = Arc::default();
    if let Some(db) = &projections_db {
        let users = crate::admin_http::HttpUsers::new(http_admin.clone(), Arc::new(config.clone()));
        app = app.merge(switchboard_projections::api::router_with_users(
            db.clone(),
            Some(Arc::new(users)),
        ));
    }
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("binding the HTTP API to {}", config.http.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut http_shutdown = shutdown_rx.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.changed().await;
            })
            .await
    });

    let bus = bus::open(&config)
        .await
        .with_context(|| format!("opening the {:?} bus", config.bus.backend))?;
    bus.create_topics(&TopicConfig::catalogue(&config.bus.topic_prefix))
        .await
        .context("creating the catalogue's topics")?;
    tracing::info!(backend = bus.backend(), node = %config.node_id, ?role, "bus ready");

    let directory = UserDirectory::follow(
        bus.clone(),
        &full_name(&config.bus.topic_prefix, Topic::Users),
        Duration::from_secs(60),
    )
    .await
    .context("loading the user directory")?;
    // Live settings (`switchboard config set`): every component reads them
    // from this handle, so a change takes effect without a restart.
    // The `[messaging]` values of the file are where they start; a
    // `setting.changed` for the same key replaces them.
    let from_file = switchboard_processors::settings::LiveSettings {
        offline_enabled: config.messaging.offline_enabled,
        offline_max_per_user: u32::try_from(config.messaging.offline_max_per_user)
            .unwrap_or(u32::MAX),
        offline_max_per_node: u32::try_from(config.messaging.offline_max_per_node)
            .unwrap_or(u32::MAX),
        forking_stickiness_secs: config.messaging.sticky_timeout_secs,
        ..Default::default()
    };
    let live_settings = switchboard_processors::settings::follow_from(
        bus.clone(),
        &config.bus.topic_prefix,
        from_file,
        Duration::from_secs(60),
        shutdown_rx.clone(),
    )
    .await
    .context("loading the live settings")?;
    let admin = Arc::new(
        crate::admin::Admin::with_directory(bus.clone(), &config, directory.clone())
            .with_settings(live_settings.clone()),
    );
    let _ = http_admin.set(admin.clone());
    let socket = crate::admin::socket_path(&config);
    let admin_socket = {
        let socket = socket.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve_socket(&socket, admin).await {
                tracing::error!(error = %e, "admin socket stopped");
            }
        })
    };

    let mut tasks = Vec::new();
    if role.runs_gateway() {
        let c2s = Arc::new(C2sContext {
            domains: config
                .domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            settings: config.xmpp.clone(),
            tls: switchboard_gateway::tls::server_config(&cert.cert, &cert.key)?,
            directory: directory.clone(),
            secret: switchboard_gateway::tls::ensure_secret(&config.data_dir.join("secret"))?,
            events: EventSink::new(
                bus.clone(),
                config.bus.topic_prefix.clone(),
                NodeId::new(config.node_id.clone()),
            ),
            sessions: Default::default(),
            started: std::time::Instant::now(),
            limiter: switchboard_gateway::ratelimit::LoginLimiter::new(
                config.auth.max_failures_per_address,
                config.auth.max_failures_per_account,
                Duration::from_secs(config.auth.failure_window_secs),
            ),
        });
        for (addr, direct_tls) in [
            (config.xmpp.c2s_listen, false),
            (config.xmpp.c2s_tls_listen, true),
        ] {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the XMPP listener to {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, direct_tls, "XMPP listening");
            tasks.push(tokio::spawn(switchboard_gateway::xmpp::server::serve(
                listener,
                direct_tls,
                c2s.clone(),
                shutdown_rx.clone(),
            )));
        }
        tasks.push(supervise("deliveries consumer", shutdown_rx.clone(), {
            let (bus, c2s, shutdown) = (bus.clone(), c2s.clone(), shutdown_rx.clone());
            let topic = full_name(&config.bus.topic_prefix, Topic::Deliveries);
            let node = config.node_id.clone();
            move || {
                switchboard_gateway::xmpp::server::deliveries(
                    bus.clone(),
                    topic.clone(),
                    node.clone(),
                    c2s.clone(),
                    shutdown.clone(),
                )
            }
        }));
        // SIP on 5060 (UDP, TCP) and 5061 (TLS), SPEC.md §5.
        let sip = Arc::new(switchboard_gateway::sip::server::SipContext::new(
            c2s.domains.clone(),
            config.sip.clone(),
            directory.clone(),
            c2s.events.clone(),
            switchboard_gateway::ratelimit::LoginLimiter::new(
                config.auth.max_failures_per_address,
                config.auth.max_failures_per_account,
                Duration::from_secs(config.auth.failure_window_secs),
            ),
            c2s.secret,
        ));
        let sip_topics = switchboard_gateway::sip::server::BusTopics {
            bus: bus.clone(),
            deliveries: full_name(&config.bus.topic_prefix, Topic::Deliveries),
            presence_state: full_name(&config.bus.topic_prefix, Topic::PresenceState),
            sessions: full_name(&config.bus.topic_prefix, Topic::Sessions),
            presence: full_name(&config.bus.topic_prefix, Topic::Presence),
            roster: full_name(&config.bus.topic_prefix, Topic::Roster),
            node: config.node_id.clone(),
        };
        tasks.extend(
            switchboard_gateway::sip::server::spawn(sip, c2s.tls.clone(), sip_topics, &shutdown_rx)
                .await?,
        );
        tasks.push(tokio::spawn(switchboard_gateway::heartbeat::run(
            bus.clone(),
            full_name(&config.bus.topic_prefix, Topic::Sessions),
            NodeId::new(config.node_id.clone()),
            HEARTBEAT_INTERVAL,
            started_at,
            shutdown_rx.clone(),
        )));
    }
    if role.runs_processors() {
        let router_config = switchboard_processors::runtime::RouterConfig {
            offline_enabled: config.messaging.offline_enabled,
            offline_max_per_user: config.messaging.offline_max_per_user,
            offline_max_per_node: config.messaging.offline_max_per_node,
            sticky_timeout: Duration::from_secs(config.messaging.sticky_timeout_secs),
            node_timeout: Duration::from_secs(config.messaging.node_timeout_secs),
            // The `im.*` live settings apply from here on, over `[messaging]`.
            settings: Some(live_settings.clone()),
            ..switchboard_processors::runtime::RouterConfig::new(
                config.bus.topic_prefix.clone(),
                NodeId::new(config.node_id.clone()),
                config
                    .domains
                    .iter()
                    .map(|d| d.to_ascii_lowercase())
                    .collect(),
            )
        };
        tasks.push(supervise("router", shutdown_rx.clone(), {
            let (bus, shutdown) = (bus.clone(), shutdown_rx.clone());
            move || {
                switchboard_processors::runtime::run(
                    bus.clone(),
                    router_config.clone(),
                    shutdown.clone(),
                )
            }
        }));
        tasks.push(supervise("presence composer", shutdown_rx.clone(), {
            let (bus, settings, shutdown) =
                (bus.clone(), live_settings.clone(), shutdown_rx.clone());
            let presence_config = switchboard_processors::presence::PresenceConfig::new(
                config.bus.topic_prefix.clone(),
                NodeId::new(config.node_id.clone()),
            );
            move || {
                switchboard_processors::presence::run(
                    bus.clone(),
                    presence_config.clone(),
                    settings.clone(),
                    shutdown.clone(),
                )
            }
        }));
        // Authorization limits, following the live settings.
        let limits = switchboard_processors::settings::policy_limits(live_settings.clone());
        tasks.push(supervise("roster processor", shutdown_rx.clone(), {
            let (bus, shutdown) = (bus.clone(), shutdown_rx.clone());
            let roster_config = switchboard_processors::roster_runtime::RosterConfig {
                prefix: config.bus.topic_prefix.clone(),
                node: NodeId::new(config.node_id.clone()),
            };
            move || {
                switchboard_processors::roster_runtime::run(
                    bus.clone(),
                    roster_config.clone(),
                    limits.clone(),
                    shutdown.clone(),
                )
            }
        }));
    }
    if let Some(db) = &projections_db {
        // XEP-0313: archive queries answered from the archive projection.
        tasks.push(supervise("archive query responder", shutdown_rx.clone(), {
            let (bus, db, shutdown) = (bus.clone(), db.clone(), shutdown_rx.clone());
            let mam_config = Arc::new(switchboard_projections::mam::MamConfig::new(
                config.bus.topic_prefix.clone(),
                NodeId::new(config.node_id.clone()),
            ));
            move || {
                switchboard_projections::mam::run(
                    bus.clone(),
                    db.clone(),
                    mam_config.clone(),
                    shutdown.clone(),
                )
            }
        }));
        tasks.extend(switchboard_projections::spawn_all(
            &bus,
            db,
            &Arc::new(switchboard_projections::runner_config(&config)),
            &projection_status,
            &shutdown_rx,
        ));
    }
    ready.store(true, Ordering::Release);
    tracing::info!("switchboard is serving");

    wait_for_signal().await;
    tracing::info!("shutting down");
    ready.store(false, Ordering::Release);
    let _ = shutdown_tx.send(true);
    admin_socket.abort();
    let _ = std::fs::remove_file(&socket);
    for t in tasks {
        let _ = t.await;
    }
    http.await??;
    Ok(())
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if !state.ready.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned())
    } else if !state.projections.ready() {
        (StatusCode::SERVICE_UNAVAILABLE, state.projections.report())
    } else {
        (StatusCode::OK, "ready\n".to_owned())
    }
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(),
    )
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
