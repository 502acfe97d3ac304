#!/usr/bin/env bash
# Start the federation's SuperLink on the coordinator host: TLS, SuperNode authentication,
# persistent state, and no runtime installation of app dependencies. Runs in the foreground
# (exec), so systemd, compose or a terminal own the process. See deploy/README.md.
set -euo pipefail

usage() {
    cat <<USAGE
usage: $(basename "$0") [--public-behind-proxy] [--dry-run] [CERTS_DIR]

Starts flower-superlink on one port (Fleet, Control and Runtime APIs), bound to 127.0.0.1. Only
/v1/fleet/* may be reachable from the sites: the Control API (/v1/control/*: start runs, register
nodes) has no authentication in open-source Flower. Publish the Fleet API through
deploy/nginx-fleet-only.conf (see deploy/README.md).

  CERTS_DIR              folder made by 'fedglioma certs'; the SuperLink reads ca.crt, superlink.crt
                         and superlink.key from it, nothing else [\$FEDGLIOMA_CERTS or /etc/fedglioma/certs]
  --public-behind-proxy  allow a non-loopback FEDGLIOMA_HOST: you state that a proxy or firewall in
                         front lets only /v1/fleet/* and /health through [\$FEDGLIOMA_BEHIND_FLEET_PROXY=1]
  --dry-run              check everything, print the flower-superlink command, start nothing
Environment:
  FEDGLIOMA_STATE_DIR    SuperLink database (state.db, mode 600) and working directory of the
                         ServerApp (relative output paths land here) [/var/lib/fedglioma/superlink]
  FEDGLIOMA_HOST         bind address [127.0.0.1]
  FEDGLIOMA_PORT         the SuperLink port [8000]
  FEDGLIOMA_APP_HUB_URL  where the SuperLink fetches signed apps ('python -m deploy.federation' serves
                         them there while it starts a run) [http://127.0.0.1:8100/v1]
  FEDGLIOMA_BIN          folder holding flower-superlink and flower-superexec
                         [folder of 'command -v flower-superlink']
  FEDGLIOMA_LOG_FILE     also write a rotated log file here (optional)
USAGE
}

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

BEHIND_PROXY="${FEDGLIOMA_BEHIND_FLEET_PROXY:-0}"
DRY_RUN=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --public-behind-proxy) BEHIND_PROXY=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -*) usage >&2; exit 2 ;;
        *) break ;;
    esac
done
[ "$#" -le 1 ] || { usage >&2; exit 2; }

CERTS="${1:-${FEDGLIOMA_CERTS:-/etc/fedglioma/certs}}"
STATE_DIR="${FEDGLIOMA_STATE_DIR:-/var/lib/fedglioma/superlink}"
HOST="${FEDGLIOMA_HOST:-127.0.0.1}"
PORT="${FEDGLIOMA_PORT:-8000}"
HUB_URL="${FEDGLIOMA_APP_HUB_URL:-http://127.0.0.1:8100/v1}"
BIN="${FEDGLIOMA_BIN:-$(dirname "$(command -v flower-superlink || echo /nonexistent/flower-superlink)")}"

case "$BEHIND_PROXY" in 0|1) ;; *) die "FEDGLIOMA_BEHIND_FLEET_PROXY must be 0 or 1, not '$BEHIND_PROXY'" ;; esac
case "$HOST" in
    127.*|::1|localhost) ;;
    *) [ "$BEHIND_PROXY" = 1 ] || die "refusing to bind $HOST: the SuperLink serves its unauthenticated Control
API (/v1/control/*: start runs, register nodes) on the same port as the Fleet API, so a
non-loopback bind hands the federation to anyone who reaches port $PORT. Keep FEDGLIOMA_HOST=127.0.0.1
and publish only /v1/fleet/* through deploy/nginx-fleet-only.conf; if such a proxy or a firewall
that admits only the proxy is in front of $HOST:$PORT, say so with --public-behind-proxy or
FEDGLIOMA_BEHIND_FLEET_PROXY=1 (see deploy/README.md)" ;;
esac
[ -x "$BIN/flower-superlink" ] || die "flower-superlink not found in '$BIN'; activate the fedglioma venv or set FEDGLIOMA_BIN"
for f in ca.crt superlink.crt superlink.key; do
    [ -r "$CERTS/$f" ] || die "$CERTS/$f is missing or unreadable; create it with 'fedglioma certs $CERTS --san <name sites dial>'"
done
case "$(stat -c %a "$CERTS/superlink.key")" in
    600|400) ;;
    *) die "$CERTS/superlink.key is readable by others; run: chmod 600 $CERTS/superlink.key" ;;
esac
# the CA key signs certificates for any name: it must not sit where the SuperLink runs
[ ! -e "$CERTS/ca.key" ] || die "$CERTS/ca.key lies next to the SuperLink's files; run 'fedglioma certs $CERTS' to move it into $CERTS/ca-private/, and keep that folder offline"

# state.db holds runs, registered nodes and model weights; ServerApp outputs land in STATE_DIR:
# everything the SuperLink and its apps create is readable by this user only
umask 077
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
echo "+ FLWR_SUPERGRID_API_URL=$HUB_URL flower-superlink ${args[*]}" >&2
[ "$DRY_RUN" = 0 ] || exit 0

mkdir -p "$STATE_DIR"
[ ! -e "$STATE_DIR/state.db" ] || chmod 600 "$STATE_DIR/state.db"  # made by an older version
cd "$STATE_DIR"

# The SuperLink starts flower-superexec (and it flwr-serverapp) by name: this venv first on PATH.
export PATH="$BIN:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# `flwr run @publisher/app==x.y.z`: FAB and signature come from here (SuperNodes verify the signature)
export FLWR_SUPERGRID_API_URL="$HUB_URL"
exec "$BIN/flower-superlink" "${args[@]}"
