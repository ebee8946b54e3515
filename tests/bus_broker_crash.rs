//! Kill -9 of the Kafka broker while producing: nothing acknowledged is lost.
//! A test binary of its own, because it restarts the broker other tests use.
//! (On the embedded log the broker is the producing process, which the
//! conformance suite's producer crash covers.)

mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_kill9_loses_no_ack() {
    let fixture = support::KafkaFixture::new().await;
    tokio::time::timeout(
        std::time::Duration::from_secs(300),
        switchboard_infra::bus::conformance::broker_kill9_loses_no_ack(&fixture),
    )
    .await
    .expect("timed out");
}
