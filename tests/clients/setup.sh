#!/usr/bin/env bash
# Installs the drivers the client compatibility matrix (tests/client_matrix.rs) runs, none
# of them globally: a virtualenv with psycopg 3 and asyncpg under target/clients/venv,
# node-postgres from the committed lockfile into tests/clients/node/node_modules, and pgjdbc
# from Debian with the Java workload compiled into target/clients/java.
# Idempotent: a step whose result is up to date is skipped. Debian packages are installed
# only when missing and only as root. Exits non-zero if any driver could not be installed.
set -uo pipefail

cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OUT="${ROOT}/target/clients"
mkdir -p "${OUT}"
FAILED=()

apt_updated=0
apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: not root, cannot install $*" >&2
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [ "${apt_updated}" -eq 0 ]; then
        apt-get -o DPkg::Lock::Timeout=300 update -q || return 1
        apt_updated=1
    fi
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "$@"
}

# Re-runs a step only when its inputs changed: the stamp holds a hash of them.
stamp_ok() {
    local stamp="$1" want="$2"
    [ -f "${stamp}" ] && [ "$(cat "${stamp}")" = "${want}" ]
}

setup_python() {
    local venv="${OUT}/venv" req="${ROOT}/tests/clients/requirements.txt"
    local want
    want=$(sha256sum "${req}" | cut -d' ' -f1)
    if [ -x "${venv}/bin/python" ] && stamp_ok "${venv}/.stamp" "${want}"; then
        echo "setup: python venv up to date"
        return 0
    fi
    local py
    py=$(command -v python3) || { apt_install python3 python3-venv || return 1; py=python3; }
    rm -rf "${venv}"
    if ! "${py}" -m venv "${venv}" 2>/dev/null; then
        # Debian ships the venv module (ensurepip) separately.
        rm -rf "${venv}"
        apt_install python3-venv || return 1
        py=/usr/bin/python3
        "${py}" -m venv "${venv}" || return 1
    fi
    "${venv}/bin/python" -m pip install -q --disable-pip-version-check -r "${req}" || return 1
    echo "${want}" >"${venv}/.stamp"
    echo "setup: python venv ready: $("${venv}/bin/python" -c 'import psycopg, asyncpg; print("psycopg", psycopg.__version__, "asyncpg", asyncpg.__version__)')"
}

setup_node() {
    local dir="${ROOT}/tests/clients/node"
    if ! command -v npm >/dev/null 2>&1; then
        apt_install nodejs npm || return 1
    fi
    local want
    want=$(cat "${dir}/package-lock.json" | sha256sum | cut -d' ' -f1)
    if [ -d "${dir}/node_modules" ] && stamp_ok "${dir}/node_modules/.stamp" "${want}"; then
        echo "setup: node modules up to date"
        return 0
    fi
    (cd "${dir}" && npm ci --no-audit --no-fund --loglevel=error) || return 1
    echo "${want}" >"${dir}/node_modules/.stamp"
    echo "setup: node modules ready (node $(node --version))"
}

setup_java() {
    local jar=/usr/share/java/postgresql.jar
    if [ ! -f "${jar}" ]; then
        apt_install libpostgresql-jdbc-java || return 1
    fi
    if ! command -v javac >/dev/null 2>&1; then
        apt_install default-jdk-headless || return 1
    fi
    local src="${ROOT}/tests/clients/java/Workload.java" classes="${OUT}/java"
    local want
    want=$( (sha256sum "${src}"; readlink -f "${jar}"; javac -version 2>&1) | sha256sum | cut -d' ' -f1)
    if [ -f "${classes}/Workload.class" ] && stamp_ok "${classes}/.stamp" "${want}"; then
        echo "setup: java workload up to date"
        return 0
    fi
    rm -rf "${classes}"
    mkdir -p "${classes}"
    javac -nowarn -cp "${jar}" -d "${classes}" "${src}" || return 1
    echo "${want}" >"${classes}/.stamp"
    echo "setup: java workload compiled against $(readlink -f "${jar}")"
}

setup_postgres_clients() {
    if command -v psql >/dev/null 2>&1 && command -v pgbench >/dev/null 2>&1; then
        echo "setup: psql and pgbench present"
        return 0
    fi
    apt_install postgresql-client postgresql-contrib
}

for step in setup_python setup_node setup_java setup_postgres_clients; do
    if ! "${step}"; then
        echo "setup: ${step} failed" >&2
        FAILED+=("${step}")
    fi
done
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "setup: failed: ${FAILED[*]}" >&2
    exit 1
fi
echo "setup: all clients installed"
