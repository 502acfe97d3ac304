#!/usr/bin/env bash
# Register every site's public key with the SuperLink (coordinator only). Site names come from
# the file names: sites/site-a.pub registers as "site-a". Keys already registered are reported
# and skipped. Run it on the SuperLink host: the Control API must only be reachable there.
set -euo pipefail

usage() {
    cat <<USAGE
usage: $(basename "$0") [PUBKEY_DIR] [CONNECTION]

  PUBKEY_DIR     folder of <site>.pub files [\$FEDGLIOMA_CERTS/sites or /etc/fedglioma/certs/sites]
  CONNECTION     flwr connection in \$FLWR_HOME/config.toml (default ~/.flwr/config.toml)
                 [\$FEDGLIOMA_CONNECTION or fedglioma]
Environment:
  FEDGLIOMA_BIN  folder holding flwr [folder of 'command -v flwr']
USAGE
}

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[ "$#" -le 2 ] || { usage >&2; exit 2; }

DIR="${1:-${FEDGLIOMA_CERTS:-/etc/fedglioma/certs}/sites}"
CONNECTION="${2:-${FEDGLIOMA_CONNECTION:-fedglioma}}"
BIN="${FEDGLIOMA_BIN:-$(dirname "$(command -v flwr || echo /nonexistent/flwr)")}"
[ -x "$BIN/flwr" ] || die "flwr not found in '$BIN'; activate the fedglioma venv or set FEDGLIOMA_BIN"
[ -d "$DIR" ] || die "$DIR is not a folder of <site>.pub files"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

shopt -s nullglob
keys=("$DIR"/*.pub)
[ "${#keys[@]}" -gt 0 ] || die "no .pub files in $DIR"

failed=0
for pub in "${keys[@]}"; do
    site="$(basename "$pub" .pub)"
    # flwr exits 0 even when registration fails: read its JSON answer instead
    out="$("$BIN/flwr" supernode register "$pub" "$CONNECTION" --name "$site" --format json 2>&1 || true)"
    if grep -q '"success": true' <<<"$out"; then
        node_id="$(sed -n 's/.*"node-id": *"\{0,1\}\([0-9]*\).*/\1/p' <<<"$out" | head -n1)"
        echo "registered   $site  node-id $node_id"
    elif grep -q 'already in use' <<<"$out"; then
        echo "already      $site  (this key is registered; 'flwr supernode list $CONNECTION' shows the nodes)"
    else
        echo "FAILED       $site: $out" >&2
        failed=1
    fi
done
for f in "$DIR"/*; do
    if [ -f "$f" ] && grep -q "PRIVATE KEY" "$f" 2>/dev/null; then
        echo "warning: $f is a private key; site private keys belong on their site only" >&2
    fi
done
exit "$failed"
