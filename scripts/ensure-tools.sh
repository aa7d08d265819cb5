#!/usr/bin/env bash
# Make sure the command-line tools the tests call are installed: promtool (Debian's `prometheus` package)
# checks the Prometheus config, the alert rules and their unit tests. Installed with apt-get when missing
# and we may (root, or passwordless sudo); otherwise a loud failure that says how.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-tools: promtool is missing; install Prometheus 2.x (it ships promtool) and put it on PATH" >&2
  exit 1
fi
if [[ $(id -u) -eq 0 ]]; then
  as_root=()
elif sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "ensure-tools: promtool is missing; run: sudo apt-get install -y prometheus" >&2
  exit 1
fi
echo "ensure-tools: installing Debian's prometheus package for promtool"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get install -y -q --no-install-recommends prometheus >/dev/null \
  || { "${as_root[@]}" apt-get update -q >/dev/null && "${as_root[@]}" apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
command -v promtool >/dev/null 2>&1 || { echo "ensure-tools: promtool still missing after the install" >&2; exit 1; }
echo "ensure-tools: $(promtool --version 2>&1 | head -n 1)"
