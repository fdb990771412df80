#!/usr/bin/env bash
# The web board in a real browser: starts the `board` example (apalis-board's API and embedded
# UI over two queues whose workers succeed, retry and give up), opens it in headless Chromium
# (Debian's package, installed when missing) driven by playwright-core (from npm), and checks
# the rendered pages: queues and counts, a queue's failed jobs, a job's detail with its error,
# the worker list. Screenshots are kept in target/board-check/ (a build artifact).
#
# Needs DATABASE_URL (scripts/test.sh provides one; or run it under scripts/with-pg.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?DATABASE_URL must be set; run scripts/test.sh, or scripts/with-pg.sh scripts/board-check.sh}"

if ! command -v chromium >/dev/null 2>&1; then
  echo "[board-check] installing Debian's chromium" >&2
  as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >&2
fi
if [ ! -d scripts/board-check/node_modules/playwright-core ]; then
  (cd scripts/board-check && npm install --no-audit --no-fund --silent >&2)
fi

target="${CARGO_TARGET_DIR:-target}"
out="$target/board-check"
mkdir -p "$out"
. scripts/lib/cargo-flags.sh
cargo build -q "${SUITE_FLAGS[@]}" --example board
log="$out/board.log"
"$target/debug/examples/board" >"$log" 2>&1 &
board=$!
trap 'kill "$board" 2>/dev/null || true; wait "$board" 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 300); do
  url=$(grep -o 'http://127.0.0.1:[0-9]*/' "$log" | head -1 || true)
  [ -n "$url" ] && break
  if ! kill -0 "$board" 2>/dev/null; then cat "$log" >&2; echo "[board-check] the board exited" >&2; exit 1; fi
  sleep 0.1
done
[ -n "$url" ] || { cat "$log" >&2; echo "[board-check] no URL from the board" >&2; exit 1; }
echo "[board-check] board at $url"
node scripts/board-check/check.mjs "${url%/}" "$out"
echo "[board-check] screenshots in $out"
