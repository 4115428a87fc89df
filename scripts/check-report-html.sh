#!/usr/bin/env bash
# Opens an HTML error map in headless Chromium (Debian's chromium package),
# fails on any console message of level warning or error or any page
# error, and saves a screenshot to look at.
#   scripts/check-report-html.sh report.html shot.png [width,height]
set -euo pipefail
page=$(realpath "$1")
shot=$2
size=${3:-1700,1500}
log=$(mktemp)
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --enable-logging=stderr --v=0 \
    --window-size="$size" --screenshot="$shot" "file://$page" 2>"$log" >/dev/null
if grep -E 'CONSOLE|Uncaught|ERROR:.*(page|render)' "$log" | grep -v -E 'dbus|gpu|viz|sandbox|Fontconfig' >&2; then
    echo "console errors opening $page" >&2
    exit 1
fi
[ -s "$shot" ] || { echo "no screenshot written" >&2; cat "$log" >&2; exit 1; }
echo "ok: $page opened without console errors; screenshot $shot"
