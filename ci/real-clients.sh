#!/usr/bin/env bash
# Real clients: codes from Debian's oathtool and from pyotp (neither shares code with totpd),
# computed from the provisioning URI, against the real binary (see ci/real_clients.py).
# Installs what it needs, idempotently: oathtool with apt-get, pyotp in a venv under target/.
# Uses target/debug/totpd (built by `cargo test`), building it only if it is missing;
# REAL_CLIENTS_BIN names another binary.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# apt-get, quiet unless it fails.
apt_install() {
    local out
    if ! out=$(as_root apt-get update -qq 2>&1 &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" 2>&1); then
        echo "$out" >&2
        return 1
    fi
}

if ! command -v oathtool >/dev/null 2>&1; then
    echo "installing oathtool"
    apt_install oathtool
fi

venv=target/ci-venv
if ! "$venv/bin/python" -c 'import pyotp' >/dev/null 2>&1; then
    echo "installing pyotp"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        apt_install python3-venv
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check 'pyotp==2.12.1'
fi

bin=${REAL_CLIENTS_BIN:-${CARGO_TARGET_DIR:-target}/debug/totpd}
if [ -z "${REAL_CLIENTS_BIN:-}" ] && [ ! -x "$bin" ]; then
    cargo build --quiet --bin totpd
fi

"$venv/bin/python" ci/real_clients.py "$bin"
