#!/usr/bin/env bash
# The README's test command, and the last line of CI's .ci/run: the project's virtualenv with its test extras,
# the system Chromium that the report's browser test drives (tests/test_report.py), then the whole suite.
# Arguments go to pytest; the exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -e ".[test]"

# Selenium is given the system browser and driver and downloads nothing, so they must be installed: Debian's
# chromium and chromium-driver. Installed here when missing and we may (root, or sudo without a password);
# otherwise say the one command to run, and the browser test fails with the same words while the others run.
have_browser() { { command -v chromium || [ -x /usr/bin/chromium ]; } >/dev/null 2>&1 &&
                 { command -v chromedriver || [ -x /usr/bin/chromedriver ]; } >/dev/null 2>&1; }
if ! have_browser; then
    install="apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver"
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        sh -c "$install" || true
    elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n sh -c "$install" || true
    fi
    if ! have_browser; then
        echo "scripts/test.sh: the report's browser test needs Chromium and its driver, which are not installed;" \
             "run: sudo apt-get install -y chromium chromium-driver (that test fails until then)" >&2
    fi
fi

exec python -m pytest -q "$@"
