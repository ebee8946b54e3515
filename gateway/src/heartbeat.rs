//! Node heartbeats: a gateway node announces it is alive on the sessions
//! topic, so processors can end its sessions when it stops (the presence and
//! router processors watch for missing heartbeats). Each heartbeat carries
//! the process start time: sessions bound before it belong to an earlier
//! run of the node (a restart after kill -9 under the same node id) and are
//! ended by the router as well.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use switchboard_infra::bus::Bus;
use switchboard_schemas::events::NodeHeartbeat;
use switchboard_schemas::{Envelope, NodeId};
use tokio::sync::watch;

/// Produces a `session.node_heartbeat` event every `interval` until
/// `shutdown` turns true. `started_at` is when the process started, taken
/// before any session could bind. A failed produce is logged and retried at
/// the next tick: a missing heartbeat is exactly what the processors must
/// see.
pub async fn run(
    bus: Arc<dyn Bus>,
    topic: String,
    node: NodeId,
    interval: Duration,
    started_at: std::time::SystemTime,
    mut shutdown: watch::Receiver<bool>,
) {
    let started_at = chrono::DateTime::<chrono::Utc>::from(started_at);
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let event = NodeHeartbeat {
            node: node.clone(),
            started_at,
            interval_secs: u32::try_from(interval.as_secs()).unwrap_or(u32::MAX),
            sessions: BTreeMap::new(),
        };
        let envelope = Envelope::new(node.clone(), node.as_str(), event);
        let bytes = match envelope.to_json_vec() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "encoding heartbeat");
                continue;
            }
        };
        if let Err(e) = bus
            .produce(&topic, node.as_str().as_bytes(), Some(&bytes))
            .await
        {
            tracing::warn!(error = %e, "heartbeat not stored");
        }
    }
}
