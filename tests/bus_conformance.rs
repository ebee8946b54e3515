//! The bus conformance suite on both backends: the embedded log and a real
//! Apache Kafka broker (started by `infra/scripts/kafka.sh start`).

mod support;

use support::{EmbeddedFixture, KafkaFixture};

switchboard_infra::bus_conformance_suite!(embedded, EmbeddedFixture::new());
switchboard_infra::bus_conformance_suite!(kafka, KafkaFixture::new());
