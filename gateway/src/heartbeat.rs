//! Node heartbeats: a gateway node announces it is alive on the sessions
//! topic, so processors can end its sessions when it stops (the presence and
//! router processors watch for missing heartbeats).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use switchboard_infra::bus::Bus;
use switchboard_schemas::events::NodeHeartbeat;
use switchboard_schemas::{Envelope, NodeId};
use tokio::sync::watch;

/// Produces a `session.node_heartbeat` event every `interval` until
/// `shutdown` turns true. A failed produce is logged and retried at the next
/// tick: a missing heartbeat is exactly what the processors must see.
pub async fn run(
    bus: Arc<dyn Bus>,
    topic: String,
    node: NodeId,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let started_at = chrono::Utc::now();
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
