#!/usr/bin/env bash
# Sets up a fresh Debian or Ubuntu machine for healer and runs it or its tests.
#   scripts/dev.sh demo   the live demo: real faults healed and verified (extra arguments go to `healer demo`)
#   scripts/dev.sh run    run healer on examples/healer.yml
#   scripts/dev.sh test   ruff, mypy --strict, then the test suite (extra arguments go to pytest;
#                         two worker processes through pytest-xdist unless they say -n/--numprocesses,
#                         --dist or -p no:xdist)
# Installs what is missing: python3-venv, Debian's prometheus and prometheus-alertmanager (for `test`,
# also postgresql, whose servers the tests start themselves, and chromium for the console's browser
# tests), and a virtual environment in .venv with healer and its dependencies (for `test`, the dev
# tools too, Playwright among them).
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
    # --force-confold keeps a config file already in place (the createcluster.conf below).
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" >/dev/null
  fi
}

# ensure_tools [test]: the Debian packages healer's demo and tests run; with `test`, PostgreSQL too.
ensure_tools() {
  local packages=(prometheus prometheus-alertmanager)
  python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
  if [ "${1:-}" = test ]; then
    # chromium: the console's browser tests (tests/test_console.py) drive Debian's build through
    # Playwright (pip-installed with the test extra); Playwright's own browser download is not used.
    packages+=(postgresql chromium)
    # procps: its kill sends a signal strategy's signal as the strategy's user (tests/test_strategies.py).
    packages+=(procps)
    # The tests start their own PostgreSQL servers (tests/postgres.py) on free loopback ports.
    # Told before the package is installed, Debian creates no cluster of its own, so none is
    # started on port 5432 either.
    if ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null && [ ! -e /etc/postgresql-common/createcluster.conf ]; then
      as_root mkdir -p /etc/postgresql-common
      echo "create_main_cluster = false" | as_root tee /etc/postgresql-common/createcluster.conf >/dev/null
    fi
  fi
  apt_install "${packages[@]}"
}

# pytest_parallel ARGS...: succeeds when ARGS leave the choice of worker processes to this script.
pytest_parallel() {
  for argument in "$@"; do
    case "$argument" in
      -n | -n* | --numprocesses | --numprocesses=* | --dist | --dist=* | no:xdist | -pno:xdist) return 1 ;;
    esac
  done
  return 0
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
    ensure_tools test
    ensure_venv dev
    # Every check runs even after one fails, so a single run reports all of them.
    failed=()
    .venv/bin/ruff check healer tests bench || failed+=(ruff)
    .venv/bin/mypy || failed+=(mypy)
    status=0
    # Two workers (CI machines have two cores): every test takes free ports and its own temporary
    # directories, and each worker starts its own PostgreSQL cluster.
    workers=()
    if pytest_parallel "$@"; then workers=(-n 2); fi
    .venv/bin/python -m pytest -p no:cacheprovider ${workers[@]+"${workers[@]}"} "$@" || status=$?
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
