#!/bin/sh
# Installs the peers and the load generator the cache benchmarks start themselves
# (Debian/Ubuntu packages). The benches never use the system services: they run private
# instances on free loopback ports with configs generated into a temp dir.
set -eu
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
$SUDO apt-get update
$SUDO apt-get install -y nginx varnish wrk
# The packages enable and start system instances on :80/:6081; the benches do not need them.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now nginx varnish 2>/dev/null || true
fi
