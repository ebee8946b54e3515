#!/usr/bin/env bash
# The whole test suite, from a fresh machine: starts Kafka and PostgreSQL
# (installing them if needed), then formatting, lints and every test.
#
#   infra/scripts/test.sh
#
# Services this script started are stopped at the end; ones already running
# are left alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

command -v cargo >/dev/null || { echo "test: error: cargo is missing (install Rust with rustup)" >&2; exit 1; }

started=()
cleanup() {
    for s in "${started[@]}"; do infra/scripts/"$s".sh stop || true; done
}
trap cleanup EXIT

# SWITCHBOARD_TEST_KAFKA=host:port uses a broker that is already running.
services=(postgres)
[ -n "${SWITCHBOARD_TEST_KAFKA:-}" ] || services+=(kafka)
for service in "${services[@]}"; do
    if ! infra/scripts/$service.sh status >/dev/null 2>&1; then
        # A broker this script starts holds only earlier runs' test topics:
        # start it empty, so the broker-restart test stays fast.
        if [ "$service" = kafka ]; then
            infra/scripts/kafka.sh reset
        else
            infra/scripts/$service.sh start
        fi
        started+=("$service")
    fi
done
# Independent client peers (slixmpp) for the end-to-end suites.
infra/scripts/python-env.sh >/dev/null
# SIPp for the SIP end-to-end suites.
infra/scripts/sipp.sh >/dev/null
export SWITCHBOARD_TEST_KAFKA="${SWITCHBOARD_TEST_KAFKA:-$(infra/scripts/kafka.sh url)}"
export SWITCHBOARD_TEST_POSTGRES="$(infra/scripts/postgres.sh url)"

echo "test: cargo fmt --check"
cargo fmt --all -- --check
echo "test: cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "test: cargo test"
cargo test --workspace --locked
