//! The bus conformance suite on both backends: the embedded log and a real
//! Apache Kafka broker (started by `infra/scripts/kafka.sh start`).

mod support;

use support::{EmbeddedFixture, KafkaFixture};

switchboard_infra::bus_conformance_suite!(embedded, EmbeddedFixture::new());
// Two records per partition in memory: consumers read from the database.
switchboard_infra::bus_conformance_suite!(embedded_small_tail, EmbeddedFixture::with_tail(2));
switchboard_infra::bus_conformance_suite!(kafka, KafkaFixture::new());
