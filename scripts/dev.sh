#!/usr/bin/env bash
# Sets up a fresh Debian or Ubuntu machine for healer and runs it or its tests.
#   scripts/dev.sh demo   the live demo: real faults healed and verified (extra arguments go to `healer demo`)
#   scripts/dev.sh run    run healer on examples/healer.yml
#   scripts/dev.sh test   run the test suite (extra arguments go to pytest)
# Installs what is missing: python3-venv, Debian's prometheus and prometheus-alertmanager,
# and a virtual environment in .venv with healer and its test dependencies.
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

ensure_venv() {
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
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
    ensure_venv
    status=0
    .venv/bin/python -m pytest -p no:cacheprovider "$@" || status=$?
    # pytest exits 5 when it collected no tests; that is not a failure of the code.
    if [ "$status" -eq 5 ]; then status=0; fi
    exit "$status"
    ;;
  *)
    echo "usage: scripts/dev.sh demo|run|test [ARGS...]" >&2
    exit 2
    ;;
esac
