#!/usr/bin/env bash
# Start one site's SuperNode: it dials the SuperLink over TLS (verified with the federation CA),
# authenticates with the site's private key, which never leaves this host, and runs only apps
# signed by a publisher in trusted-entities.yaml. Runs in the foreground (exec). See deploy/README.md.
set -euo pipefail

usage() {
    cat <<USAGE
usage: $(basename "$0") [--dry-run] SITE [DATA_DIR]

  SITE                   the site's name, as registered by the coordinator (e.g. site-a)
  DATA_DIR               the site's BraTS-style folder with labels.csv [\$FEDGLIOMA_DATA]
  --dry-run              check everything, print the flower-supernode command, start nothing
Environment:
  FEDGLIOMA_SUPERLINK    SuperLink address host:port, without https:// (required),
                         e.g. fl.coordinator.org:8000; the host must be a SAN of its certificate
  FEDGLIOMA_CA           the federation CA certificate [/etc/fedglioma/ca.crt]
  FEDGLIOMA_KEY          this site's private key (mode 600) [/etc/fedglioma/sites/SITE]
  FEDGLIOMA_TRUSTED_ENTITIES
                         publishers whose signed apps this site runs (flower-supernode
                         --trusted-entities; from the coordinator) [/etc/fedglioma/trusted-entities.yaml]
  FEDGLIOMA_ACCEPT_UNSIGNED_APPS=1
                         run any app the SuperLink sends, unsigned ones too (no --trusted-entities):
                         whoever can start a run then chooses the code this host executes
  FEDGLIOMA_LOCAL_PORT   local Runtime API port, bound to 127.0.0.1; give each SuperNode on one
                         host its own [9094]
  FEDGLIOMA_WORKDIR      working directory of the ClientApps [/var/lib/fedglioma/SITE]
  FEDGLIOMA_BIN          folder holding flower-supernode [folder of 'command -v flower-supernode']
USAGE
}

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
DRY_RUN=0
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; shift; fi
[ "$#" -ge 1 ] && [ "$#" -le 2 ] || { usage >&2; exit 2; }

SITE="$1"
DATA="${2:-${FEDGLIOMA_DATA:-}}"
SUPERLINK="${FEDGLIOMA_SUPERLINK:-}"
CA="${FEDGLIOMA_CA:-/etc/fedglioma/ca.crt}"
KEY="${FEDGLIOMA_KEY:-/etc/fedglioma/sites/$SITE}"
TRUSTED="${FEDGLIOMA_TRUSTED_ENTITIES:-/etc/fedglioma/trusted-entities.yaml}"
ACCEPT_UNSIGNED="${FEDGLIOMA_ACCEPT_UNSIGNED_APPS:-0}"
LOCAL_PORT="${FEDGLIOMA_LOCAL_PORT:-9094}"
WORKDIR="${FEDGLIOMA_WORKDIR:-/var/lib/fedglioma/$SITE}"
BIN="${FEDGLIOMA_BIN:-$(dirname "$(command -v flower-supernode || echo /nonexistent/flower-supernode)")}"

[[ "$SITE" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] || die "site name '$SITE': use letters, digits, '.', '_', '-'"
[ -n "$SUPERLINK" ] || die "set FEDGLIOMA_SUPERLINK to the SuperLink's host:port (e.g. fl.coordinator.org:8000)"
[ -n "$DATA" ] || die "give the site's data folder as DATA_DIR or FEDGLIOMA_DATA"
[ -f "$DATA/labels.csv" ] || die "$DATA has no labels.csv; check the folder with 'fedglioma check-site $DATA'"
[[ "$DATA" != *'"'* ]] || die "the data path must not contain a double quote: $DATA"
[ -x "$BIN/flower-supernode" ] || die "flower-supernode not found in '$BIN'; activate the fedglioma venv or set FEDGLIOMA_BIN"
[ -r "$CA" ] || die "CA certificate $CA is missing; get ca.crt from the coordinator"
[ -r "$KEY" ] || die "private key $KEY is missing; make it here with 'fedglioma certs /etc/fedglioma --sites $SITE --site-keys-only' and send only $KEY.pub to the coordinator"
case "$(stat -c %a "$KEY")" in
    600|400) ;;
    *) die "$KEY is readable by others; run: chmod 600 $KEY" ;;
esac
case "$ACCEPT_UNSIGNED" in
    1) TRUSTED="" ;;
    0) [ -r "$TRUSTED" ] || die "$TRUSTED is missing: get trusted-entities.yaml from the coordinator ('fedglioma certs' writes it), or set FEDGLIOMA_TRUSTED_ENTITIES; FEDGLIOMA_ACCEPT_UNSIGNED_APPS=1 runs unsigned apps (then whoever can start a run chooses the code this host executes)"
       # whoever may edit the file chooses which publishers' code runs here
       [ "$(( 0$(stat -c %a "$TRUSTED") & 022 ))" = 0 ] || die "$TRUSTED is writable by others; run: chmod go-w $TRUSTED" ;;
    *) die "FEDGLIOMA_ACCEPT_UNSIGNED_APPS must be 0 or 1, not '$ACCEPT_UNSIGNED'" ;;
esac
DATA="$(cd "$DATA" && pwd)"

args=(
    --superlink "$SUPERLINK"
    --root-certificates "$CA"
    --auth-supernode-private-key "$KEY"
    --port "$LOCAL_PORT"
    --node-config "data-path=\"$DATA\" site-name=\"$SITE\""
)
if [ -n "$TRUSTED" ]; then
    args+=(--trusted-entities "$TRUSTED")
fi
echo "+ flower-supernode ${args[*]}" >&2
[ "$DRY_RUN" = 0 ] || exit 0

# the ClientApps cache preprocessed patient data in WORKDIR: readable by this user only
umask 077
mkdir -p "$WORKDIR"
cd "$WORKDIR"
export PATH="$BIN:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec "$BIN/flower-supernode" "${args[@]}"
