#!/usr/bin/env bash
# Installs the system packages aift wants when they are missing and apt is usable;
# otherwise prints one line and carries on (they speed things up or serve tests, nothing needs them).
#   libgoogle-perftools4  tcmalloc, ~1.6x faster CPU training
#   chromium              headless rendering of `aift report` in the tests (skipped without it)
set -u
apt_usable() { command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; }
apt_install() {  # package, why
  echo "setup: installing $1 ($2)"
  (apt-get install -y -qq "$1" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$1" >/dev/null 2>&1; }) \
    || echo "setup: note: could not install $1; $2 is not available"
}
if ! ldconfig -p 2>/dev/null | grep -q 'libtcmalloc.so.4'; then
  if apt_usable; then
    apt_install libgoogle-perftools4 "tcmalloc, ~1.6x faster CPU training"
  else
    echo "setup: note: apt not usable here; install libgoogle-perftools4 for tcmalloc (optional)"
  fi
fi
if ! command -v chromium >/dev/null 2>&1; then
  if apt_usable; then
    apt_install chromium "headless report rendering test"
  else
    echo "setup: note: apt not usable here; install chromium to run the report rendering test (optional)"
  fi
fi
exit 0
