//! Producing events: every client action becomes an [`Envelope`] on its
//! topic, keyed by its subject, before the client hears it was accepted.

use std::sync::Arc;

use switchboard_infra::bus::{Bus, BusError};
use switchboard_schemas::topics::full_name;
use switchboard_schemas::{Envelope, Event, NodeId};

/// Errors while emitting.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// The event has no topic (an unknown event).
    #[error("event {0} has no topic")]
    NoTopic(String),
    /// Encoding failed.
    #[error(transparent)]
    Encode(#[from] switchboard_schemas::EnvelopeError),
    /// The bus did not store it.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Produces events of this node under a topic prefix.
#[derive(Clone)]
pub struct EventSink {
    bus: Arc<dyn Bus>,
    prefix: String,
    node: NodeId,
}

impl EventSink {
    /// A sink for `node` writing to `<prefix>.<topic>`.
    pub fn new(bus: Arc<dyn Bus>, prefix: impl Into<String>, node: NodeId) -> Self {
        Self {
            bus,
            prefix: prefix.into(),
            node,
        }
    }

    /// Stores `event` about `subject`; returns once it is durable.
    pub async fn emit(
        &self,
        subject: &str,
        event: impl Into<Event>,
    ) -> Result<Envelope, EmitError> {
        let envelope = Envelope::new(self.node.clone(), subject, event);
        self.store(envelope).await
    }

    async fn store(&self, envelope: Envelope) -> Result<Envelope, EmitError> {
        let topic = envelope
            .topic()
            .ok_or_else(|| EmitError::NoTopic(envelope.event.event_type().to_owned()))?;
        let bytes = envelope.to_json_vec()?;
        self.bus
            .produce(
                &full_name(&self.prefix, topic),
                envelope.subject.as_bytes(),
                Some(&bytes),
            )
            .await?;
        Ok(envelope)
    }

    /// The node events are attributed to.
    pub fn node(&self) -> &NodeId {
        &self.node
    }
}
