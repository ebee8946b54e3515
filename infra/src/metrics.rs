//! Prometheus metrics of the infrastructure, named
//! `switchboard_<subsystem>_<name>_<unit>[_total]` with bounded labels.

use std::sync::LazyLock;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// The registry every crate registers into; `/metrics` serves it.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn register<T: prometheus::core::Collector + Clone + 'static>(metric: T) -> T {
    REGISTRY
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

/// Time from produce call to durable acknowledgement, by backend.
pub static BUS_PRODUCE_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "switchboard_bus_produce_latency_seconds",
                "Time from a produce call to its durable acknowledgement",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["backend"],
        )
        .expect("valid histogram"),
    )
});

/// Produce calls by backend and outcome (`ok`, `error`).
pub static BUS_PRODUCED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "switchboard_bus_produced_records_total",
                "Records produced, by outcome",
            ),
            &["backend", "outcome"],
        )
        .expect("valid counter"),
    )
});

/// Text exposition of every registered metric.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&REGISTRY.gather(), &mut out)
        .expect("text encoding");
    String::from_utf8(out).expect("utf-8 exposition")
}
