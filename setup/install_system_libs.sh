#!/usr/bin/env bash
# Installs the system packages aift wants when they are missing and apt is usable;
# otherwise prints one line and carries on (they speed things up or serve tests, nothing needs them).
#   usage: setup/install_system_libs.sh [demo|test]   (the Makefile's layers; no argument: both)
#   demo  libgoogle-perftools4  tcmalloc, ~1.6x faster CPU training (`aift demo` trains)
#   test  chromium              headless rendering of `aift report` and the `aift webui` browser test (skipped without it)
#         fonts-ipafont-gothic  Japanese glyphs in those headless pages and their screenshots (else empty boxes)
set -u
layer=${1:-all}
case "$layer" in demo | test | all) ;; *) echo "usage: $0 [demo|test]" >&2; exit 2 ;; esac
apt_usable() { command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; }
apt_install() {  # package, why
  echo "setup: installing $1 ($2)"
  (apt-get install -y -qq "$1" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$1" >/dev/null 2>&1; }) \
    || echo "setup: note: could not install $1; $2 is not available"
}
if [ "$layer" != test ] && ! ldconfig -p 2>/dev/null | grep -q 'libtcmalloc.so.4'; then
  if apt_usable; then
    apt_install libgoogle-perftools4 "tcmalloc, ~1.6x faster CPU training"
  else
    echo "setup: note: apt not usable here; install libgoogle-perftools4 for tcmalloc (optional)"
  fi
fi
if [ "$layer" != demo ] && ! command -v chromium >/dev/null 2>&1; then
  if apt_usable; then
    apt_install chromium "headless report rendering test"
  else
    echo "setup: note: apt not usable here; install chromium to run the report rendering test (optional)"
  fi
fi
if [ "$layer" != demo ] && ! fc-list 2>/dev/null | grep -qi 'IPAGothic'; then
  if apt_usable; then
    apt_install fonts-ipafont-gothic "Japanese text in the web UI test's and docs' headless Chromium screenshots"
  else
    echo "setup: note: apt not usable here; install fonts-ipafont-gothic for Japanese text in screenshots (optional)"
  fi
fi
exit 0
