#!/usr/bin/env bash
# Renders a report.html written by `dyna-pruner demo` in headless Chromium (Debian package
# `chromium`) and fails when the page links a missing image, an image the browser cannot
# decode, or holds no picture at all; writes a screenshot beside it.
# Usage: scripts/check-report.sh DIR/report.html
set -euo pipefail
html=$(realpath "$1")
dir=$(dirname "$html")
shot="$dir/report-screenshot.png"
chrome=$(command -v chromium || command -v chromium-browser || true)
[ -n "$chrome" ] || { echo "check-report: no chromium found (apt-get install chromium)"; exit 2; }
links=$(grep -o '<img src="[^"]*"' "$html" | sed 's/^<img src="//; s/"$//' || true)
count=$(printf '%s\n' "$links" | grep -c . || true)
[ "$count" -gt 0 ] || { echo "check-report: $html shows no pictures"; exit 1; }
for src in $links; do
  [ -s "$dir/$src" ] || { echo "check-report: missing image $src"; exit 1; }
done
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --allow-file-access-from-files)
# The page counts the images the browser could read once loaded (body data-loaded).
loaded=$("$chrome" "${flags[@]}" --virtual-time-budget=5000 --dump-dom "file://$html" 2>/dev/null \
  | grep -o 'data-loaded="[0-9]*"' | grep -o '[0-9]*' || true)
[ "${loaded:-0}" = "$count" ] || { echo "check-report: the browser decoded ${loaded:-0} of $count images"; exit 1; }
"$chrome" "${flags[@]}" --window-size=1500,3000 --screenshot="$shot" "file://$html" 2>/dev/null
[ -s "$shot" ] || { echo "check-report: no screenshot"; exit 1; }
echo "check-report: $count images linked, $loaded decoded by $("$chrome" --version 2>/dev/null | head -1); screenshot $shot"
