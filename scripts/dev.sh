#!/usr/bin/env bash
# Sets up a fresh Debian or Ubuntu machine for healer and runs it or its tests.
#   scripts/dev.sh demo   the live demo: real faults healed and verified (extra arguments go to `healer demo`)
#   scripts/dev.sh run    run healer on examples/healer.yml
#   scripts/dev.sh test   ruff, mypy --strict, then the test suite (extra arguments go to pytest)
# Installs what is missing: python3-venv, Debian's prometheus and prometheus-alertmanager,
# and a virtual environment in .venv with healer and its dependencies (for `test`, the dev tools too).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  local missing=()
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

ensure_tools() {
  local packages=(prometheus prometheus-alertmanager)
  python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
  apt_install "${packages[@]}"
}

# ensure_venv [EXTRA]: healer in .venv, editable, with the optional dependencies EXTRA (default: test).
ensure_venv() {
  local extra=${1:-test}
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extra]"
}

command=${1:-}
shift || true
case "$command" in
  demo)
    ensure_tools
    ensure_venv
    exec .venv/bin/healer demo "$@"
    ;;
  run)
    ensure_tools
    ensure_venv
    exec .venv/bin/healer serve -c examples/healer.yml "$@"
    ;;
  test)
    ensure_tools
    ensure_venv dev
    # Every check runs even after one fails, so a single run reports all of them.
    failed=()
    .venv/bin/ruff check healer tests bench || failed+=(ruff)
    .venv/bin/mypy || failed+=(mypy)
    status=0
    .venv/bin/python -m pytest -p no:cacheprovider "$@" || status=$?
    # pytest exits 5 when it collected no tests; that is not a failure of the code.
    if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then failed+=(pytest); fi
    if [ ${#failed[@]} -gt 0 ]; then
      echo "failed: ${failed[*]}" >&2
      # pytest's own status when it failed (CI tells its kinds apart), otherwise 1.
      if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then exit "$status"; fi
      exit 1
    fi
    exit 0
    ;;
  *)
    echo "usage: scripts/dev.sh demo|run|test [ARGS...]" >&2
    exit 2
    ;;
esac
