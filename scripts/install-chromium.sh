#!/usr/bin/env bash
# Installs Debian's `chromium` package for the UI tests (syncflow_dagster_tests/test_ui.py),
# which Playwright drives through executable_path=/usr/bin/chromium. Nothing here (nor
# anywhere in the project) downloads a browser build: `playwright install` is never run.
#
# Idempotent: does nothing when /usr/bin/chromium already exists. Quiet: apt's output is
# kept in a log that is printed only on failure. Bounded: every apt step has a timeout
# (CHROMIUM_INSTALL_TIMEOUT seconds each, default 900). Needs root (or passwordless sudo).
set -euo pipefail

CHROMIUM_BIN="/usr/bin/chromium"
STEP_TIMEOUT="${CHROMIUM_INSTALL_TIMEOUT:-900}"

if [ -x "$CHROMIUM_BIN" ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "install-chromium: $CHROMIUM_BIN is missing and this user cannot run apt-get (need root)" >&2
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: apt-get not found; install Debian's chromium package by hand" >&2
  exit 1
fi

LOG="$(mktemp -t install-chromium.XXXXXX.log)"
trap 'rm -f "$LOG"' EXIT

run_step() {
  if ! timeout "$STEP_TIMEOUT" "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive "$@" >>"$LOG" 2>&1; then
    echo "install-chromium: '$*' failed or exceeded ${STEP_TIMEOUT}s; apt output follows" >&2
    cat "$LOG" >&2
    exit 1
  fi
}

run_step apt-get update -qq
run_step apt-get install -y -qq --no-install-recommends chromium

if [ ! -x "$CHROMIUM_BIN" ]; then
  echo "install-chromium: apt-get finished but $CHROMIUM_BIN is still missing" >&2
  exit 1
fi
echo "install-chromium: installed $("$CHROMIUM_BIN" --version 2>/dev/null || echo chromium)"
