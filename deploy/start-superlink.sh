#!/usr/bin/env bash
# Start the federation's SuperLink on the coordinator host: TLS, SuperNode authentication,
# persistent state, and no runtime installation of app dependencies. Runs in the foreground
# (exec), so systemd, compose or a terminal own the process. See deploy/README.md.
set -euo pipefail

usage() {
    cat <<USAGE
usage: $(basename "$0") [CERTS_DIR]

Starts flower-superlink on one port (Fleet, Control and Runtime APIs). Only /v1/fleet/* may be
reachable from the sites; keep /v1/control/* on loopback (see deploy/README.md).

  CERTS_DIR              folder made by 'fedglioma certs' holding ca.crt, superlink.crt and
                         superlink.key [\$FEDGLIOMA_CERTS or /etc/fedglioma/certs]
Environment:
  FEDGLIOMA_STATE_DIR    SuperLink database and working directory of the ServerApp
                         (relative output paths land here) [/var/lib/fedglioma/superlink]
  FEDGLIOMA_HOST         bind address [0.0.0.0]
  FEDGLIOMA_PORT         the SuperLink port [8000]
  FEDGLIOMA_BIN          folder holding flower-superlink and flower-superexec
                         [folder of 'command -v flower-superlink']
  FEDGLIOMA_LOG_FILE     also write a rotated log file here (optional)
USAGE
}

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[ "$#" -le 1 ] || { usage >&2; exit 2; }

CERTS="${1:-${FEDGLIOMA_CERTS:-/etc/fedglioma/certs}}"
STATE_DIR="${FEDGLIOMA_STATE_DIR:-/var/lib/fedglioma/superlink}"
HOST="${FEDGLIOMA_HOST:-0.0.0.0}"
PORT="${FEDGLIOMA_PORT:-8000}"
BIN="${FEDGLIOMA_BIN:-$(dirname "$(command -v flower-superlink || echo /nonexistent/flower-superlink)")}"

[ -x "$BIN/flower-superlink" ] || die "flower-superlink not found in '$BIN'; activate the fedglioma venv or set FEDGLIOMA_BIN"
for f in ca.crt superlink.crt superlink.key; do
    [ -r "$CERTS/$f" ] || die "$CERTS/$f is missing or unreadable; create it with 'fedglioma certs $CERTS --san <name sites dial>'"
done
case "$(stat -c %a "$CERTS/superlink.key")" in
    600|400) ;;
    *) die "$CERTS/superlink.key is readable by others; run: chmod 600 $CERTS/superlink.key" ;;
esac
mkdir -p "$STATE_DIR"
cd "$STATE_DIR"

# The SuperLink starts flower-superexec (and it flwr-serverapp) by name: this venv first on PATH.
export PATH="$BIN:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

args=(
    --ssl-ca-certfile "$CERTS/ca.crt"
    --ssl-certfile "$CERTS/superlink.crt"
    --ssl-keyfile "$CERTS/superlink.key"
    --enable-supernode-auth
    --disable-runtime-dependency-installation
    --database "$STATE_DIR/state.db"
    --host "$HOST"
    --port "$PORT"
)
if [ -n "${FEDGLIOMA_LOG_FILE:-}" ]; then
    args+=(--log-file "$FEDGLIOMA_LOG_FILE")
fi
echo "+ flower-superlink ${args[*]}" >&2
exec "$BIN/flower-superlink" "${args[@]}"
