//! Prometheus metrics of the projections, named
//! `switchboard_projection_<name>_<unit>[_total]`, labelled by projection
//! (five values).

use std::sync::LazyLock;

use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use switchboard_infra::metrics::REGISTRY;

fn register<T: prometheus::core::Collector + Clone + 'static>(metric: T) -> T {
    REGISTRY
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

/// Records on the bus not yet applied by this instance's members, by
/// projection (consumer lag, SPEC.md §12).
pub static LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "switchboard_projection_lag_records",
                "Records on the bus not yet applied by a projection",
            ),
            &["projection"],
        )
        .expect("valid gauge"),
    )
});

/// Bus records applied, by projection.
pub static APPLIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "switchboard_projection_applied_records_total",
                "Bus records applied by a projection",
            ),
            &["projection"],
        )
        .expect("valid counter"),
    )
});

/// Records that are not readable events, by projection.
pub static UNDECODABLE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "switchboard_projection_undecodable_records_total",
                "Bus records that are not readable events",
            ),
            &["projection"],
        )
        .expect("valid counter"),
    )
});

/// Batches refused because a stored position had moved (another member or
/// a rebuild), by projection.
pub static CONFLICTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "switchboard_projection_position_conflicts_total",
                "Batches refused because the stored position had moved",
            ),
            &["projection"],
        )
        .expect("valid counter"),
    )
});
