//! A bus decorator that records produce latency and outcomes.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::{Bus, BusError, Consumer, ConsumerConfig, Delivery, TopicConfig};
use crate::metrics::{BUS_PRODUCE_LATENCY, BUS_PRODUCED};

/// Wraps a bus; every produce is timed and counted.
pub struct MeteredBus {
    inner: Arc<dyn Bus>,
    // Label lookups done once, not per produce.
    latency: prometheus::Histogram,
    ok: prometheus::IntCounter,
    failed: prometheus::IntCounter,
}

impl MeteredBus {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Bus>) -> Self {
        let backend = inner.backend();
        Self {
            latency: BUS_PRODUCE_LATENCY.with_label_values(&[backend]),
            ok: BUS_PRODUCED.with_label_values(&[backend, "ok"]),
            failed: BUS_PRODUCED.with_label_values(&[backend, "error"]),
            inner,
        }
    }
}

#[async_trait]
impl Bus for MeteredBus {
    async fn create_topics(&self, topics: &[TopicConfig]) -> Result<(), BusError> {
        self.inner.create_topics(topics).await
    }

    async fn produce(
        &self,
        topic: &str,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Delivery, BusError> {
        let started = Instant::now();
        let result = self.inner.produce(topic, key, value).await;
        self.latency.observe(started.elapsed().as_secs_f64());
        if result.is_ok() {
            self.ok.inc();
        } else {
            self.failed.inc();
        }
        result
    }

    async fn consumer(&self, config: ConsumerConfig) -> Result<Box<dyn Consumer>, BusError> {
        self.inner.consumer(config).await
    }

    async fn partitions(&self, topic: &str) -> Result<i32, BusError> {
        self.inner.partitions(topic).await
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, BusError> {
        self.inner.end_offsets(topic).await
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
}
