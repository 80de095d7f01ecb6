#!/bin/sh
# Install what tests/test_browser.py needs to drive a real browser: Debian's chromium.
# Playwright (a test extra) brings the driver only; never run `playwright install`,
# which downloads a browser. Idempotent and quick when chromium is already there.
# Never fails the build: without a browser the browser test is skipped, loudly.
set -u
for exe in "${MQ_TRIO_CHROMIUM:-}" chromium chromium-browser; do
    if [ -n "$exe" ] && command -v "$exe" >/dev/null 2>&1; then
        echo "install-browser: using $(command -v "$exe")"
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no chromium and no apt-get: the browser test will be SKIPPED" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-browser: not root and no sudo: the browser test will be SKIPPED" >&2
        exit 0
    fi
fi
echo "install-browser: installing Debian's chromium (about 25 s)"
if $SUDO apt-get update -qq && \
   DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium \
       >/dev/null; then
    echo "install-browser: installed $(command -v chromium)"
else
    echo "install-browser: apt-get failed: the browser test will be SKIPPED" >&2
fi
exit 0
