#!/usr/bin/env bash
# Make sure a headless-capable Chromium is installed: the HTML report test (tests/test_interpret.py)
# renders the report page in it. Installs Debian's `chromium` package with apt-get when no chromium
# binary is on PATH. Needs root (or sudo) for apt-get; prints the binary it found or installed.
set -euo pipefail

find_chromium() {
    local name
    for name in chromium chromium-browser google-chrome google-chrome-stable; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if bin=$(find_chromium); then
    echo "chromium found: $bin ($("$bin" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: no chromium binary on PATH and no apt-get to install one;" \
         "install Chromium (or Google Chrome) with this system's package manager" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "error: installing chromium needs root (apt-get), and sudo is not available" >&2
        exit 1
    fi
fi

# apt-get's output (hundreds of lines) goes to a log file, shown only when a step fails.
log=$(mktemp "${TMPDIR:-/tmp}/carprune-apt.XXXXXX")
trap 'rm -f "$log"' EXIT
apt_get() {
    if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "$@" >"$log" 2>&1; then
        echo "error: 'apt-get $*' failed; its output:" >&2
        cat "$log" >&2
        exit 1
    fi
}

echo "chromium not found: installing Debian's chromium package with apt-get (about 1 min;" \
     "apt-get's output is shown only if it fails)"
apt_get update
# Capture apt-cache's output first: piped straight into an early-exiting grep, it would die of
# SIGPIPE, and pipefail would report the package as unavailable.
policy=$(apt-cache policy chromium 2>/dev/null || true)
if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
    echo "error: the package 'chromium' is not available from this system's apt sources" \
         "(apt-cache policy chromium: no installation candidate)" >&2
    exit 1
fi
apt_get install -y chromium

if bin=$(find_chromium); then
    echo "chromium installed: $bin ($("$bin" --version 2>/dev/null || echo 'version unknown'))"
else
    echo "error: apt-get installed chromium but no chromium binary is on PATH" >&2
    exit 1
fi
