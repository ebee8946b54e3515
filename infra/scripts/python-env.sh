#!/usr/bin/env bash
# Python environment of the end-to-end tests (tests/e2e/, used by tests/xmpp_e2e.rs
# and tests/sip_e2e.rs): a venv with pinned slixmpp and pjsua2-python (PJSIP's
# Python binding; its wheels are for CPython 3.11 and 3.12 on manylinux x86_64).
#
#   infra/scripts/python-env.sh [install]   create/update the venv; logs on stderr,
#                                           the venv's python as the last stdout line
#   infra/scripts/python-env.sh path        the same, but stdout is just the python path
#   infra/scripts/python-env.sh clean       delete the venv
#
# State: ${SWITCHBOARD_INFRA_DIR:-<repo>/.infra}/venv, built with `${PYTHON:-python3} -m venv`
# (Python >= 3.11, what slixmpp 1.17 needs). A marker file records the pins and the
# interpreter; when they still match, a run only checks the venv and returns (< 1 s).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
INFRA_DIR="${SWITCHBOARD_INFRA_DIR:-$REPO_ROOT/.infra}"
VENV="$INFRA_DIR/venv"
VENV_PY="$VENV/bin/python"
MARKER="$VENV/.switchboard-python-env"
PYTHON="${PYTHON:-python3}"

# Pinned: slixmpp and its dependencies (a change here rebuilds the venv on the next run).
REQUIREMENTS=(
    "slixmpp==1.17.0"
    "aiodns==4.0.4"
    "pycares==5.2.1"
    "cffi==2.1.1"
    "pycparser==3.12"
    "pyasn1==0.6.5"
    "pyasn1_modules==0.4.2"
    "pjsua2-python==2.15.1.post1"
)

log() { echo "python-env: $*" >&2; }
die() { echo "python-env: error: $*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
usage: $(basename "$0") [install|path|clean]
  install  (default) create or update the venv; prints its python as the last line
  path     the same; prints only the python path on stdout
  clean    delete the venv
venv: $VENV
EOF
    exit 2
}

# What the venv was built from: the pins and the base interpreter.
fingerprint() {
    local base
    base="$("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.base_prefix)' 2>/dev/null)" || return 1
    printf '%s\n' "python $base" "${REQUIREMENTS[@]}"
}

ready() {
    [[ -x "$VENV_PY" && -f "$MARKER" ]] || return 1
    local want
    want="$(fingerprint)" || return 1
    [[ "$(cat "$MARKER")" == "$want" ]] || return 1
    # the base interpreter may have gone (a venv links to it); find_spec does not import
    "$VENV_PY" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("slixmpp", "pjsua2")))' >/dev/null 2>&1
}

check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "$PYTHON not found: install Python 3.11 or newer (Debian: apt-get install -y python3 python3-venv), or set PYTHON=/path/to/python3"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
        die "$PYTHON is $("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo unknown); slixmpp needs Python 3.11 or newer (set PYTHON=/path/to/python3.11+)"
    "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 ||
        die "$PYTHON has no venv/ensurepip module (Debian: apt-get install -y python3-venv)"
}

LOCKED=0
with_lock() {
    ((LOCKED)) && return 0
    LOCKED=1
    mkdir -p "$INFRA_DIR"
    exec 9>"$INFRA_DIR/.python-env.lock"
    if command -v flock >/dev/null 2>&1; then
        flock -w 600 9 || die "could not acquire $INFRA_DIR/.python-env.lock within 600 s"
    fi
}

cmd_install() {
    if ready; then
        return 0
    fi
    check_python
    with_lock
    # another run may have finished it while we waited for the lock
    if ready; then
        return 0
    fi
    if [[ -e "$VENV" ]] && ! "$VENV_PY" -c 'import sys' >/dev/null 2>&1; then
        log "removing broken venv $VENV"
        rm -rf "$VENV"
    elif [[ -x "$VENV_PY" ]]; then
        local have want
        have="$("$VENV_PY" -c 'import sys; print(sys.version.split()[0])')"
        want="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
        if [[ "$have" != "$want" ]]; then
            log "removing venv of Python $have ($PYTHON is $want)"
            rm -rf "$VENV"
        fi
    fi
    if [[ ! -x "$VENV_PY" ]]; then
        log "creating venv $VENV with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
        "$PYTHON" -m venv "$VENV" >&2 || die "'$PYTHON -m venv $VENV' failed (Debian: apt-get install -y python3-venv)"
    fi
    rm -f "$MARKER"
    log "installing ${REQUIREMENTS[*]}"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV_PY" -m pip install --quiet --no-input "${REQUIREMENTS[@]}" >&2 ||
        die "pip install into $VENV failed (is PyPI reachable? pjsua2-python has wheels for CPython 3.11 and 3.12 on x86_64 Linux only; see the pip output above)"
    "$VENV_PY" -c 'import slixmpp' >&2 || die "slixmpp does not import in $VENV"
    "$VENV_PY" -c 'import pjsua2' >&2 || die "pjsua2 does not import in $VENV"
    fingerprint >"$MARKER"
    log "ready: $VENV_PY (slixmpp $("$VENV_PY" -c 'import slixmpp; print(slixmpp.__version__)'))"
}

case "${1:-install}" in
install)
    cmd_install
    echo "$VENV_PY"
    ;;
path)
    cmd_install
    echo "$VENV_PY"
    ;;
clean)
    with_lock
    rm -rf "$VENV"
    log "removed $VENV"
    ;;
-h | --help | help) usage ;;
*) usage ;;
esac
