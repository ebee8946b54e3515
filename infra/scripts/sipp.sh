#!/usr/bin/env bash
# SIPp, the independent SIP peer of the SIP end-to-end tests (tests/sip_*.rs,
# scenarios in tests/sip/): Debian's `sip-tester` package.
#
#   infra/scripts/sipp.sh [install]   install it if missing; the sipp path as the last line
#   infra/scripts/sipp.sh path        the same
#
# Installing needs root (apt-get); an existing sipp on PATH is used as it is.
set -euo pipefail

log() { echo "sipp: $*" >&2; }
die() { echo "sipp: error: $*" >&2; exit 1; }

case "${1:-install}" in
    install|path) ;;
    *) die "usage: $(basename "$0") [install|path]" ;;
esac

if ! command -v sipp >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "sipp is missing and apt-get is not available (install SIPp 3.6+)"
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "sipp is missing; installing sip-tester needs root"
        sudo="sudo"
    fi
    log "installing sip-tester"
    $sudo apt-get update -qq >&2 || log "apt-get update failed; trying the install anyway"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq sip-tester >&2
fi
command -v sipp
