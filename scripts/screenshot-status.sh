#!/usr/bin/env bash
# Renders the daemon's /status and /report pages in headless Chromium and saves PNG
# screenshots, so a person can look at what managers and accountants see.
#   scripts/screenshot-status.sh [OUT_DIR]      (needs Debian's chromium: apt-get install chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/screenshots}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
cargo build --release --quiet
./target/release/kopilka demo --sales 1500 --dir "$work/demo" >/dev/null
port=$((20000 + RANDOM % 20000))
cat > "$work/kopilka.toml" <<CFG
[ledger]
path = "$work/demo/kopilka.db"
[rules]
path = "$work/demo/rules.toml"
[daemon]
http_listen = "127.0.0.1:$port"
CFG
./target/release/kopilka --config "$work/kopilka.toml" run 2>"$work/run.log" &
pid=$!
for _ in $(seq 1 50); do
  curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done
for page in status report; do
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/chrome" --window-size=1200,1800 \
    --screenshot="$out/$page.png" "http://127.0.0.1:$port/$page" >/dev/null 2>&1
  echo "$out/$page.png"
done
