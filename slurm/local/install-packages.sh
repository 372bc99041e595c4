#!/usr/bin/env bash
# Install the Debian packages of the single-node test SLURM (see slurm/local/README in
# slurm/README.md). Idempotent: returns at once when everything is already installed.
# Needs root (or sudo) and apt; on other systems it says so and exits non-zero, and the
# tests marked `slurm` are then skipped.
set -euo pipefail
PKGS=(slurmctld slurmd slurm-client munge)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "slurm packages already installed: ${PKGS[*]}"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-packages.sh: apt-get not found; install ${missing[*]} with your package manager" >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
    echo "install-packages.sh: need root (or sudo) to install ${missing[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"

# The Debian packages start their own daemons on systems with init scripts/systemd; the
# test SLURM runs private ones, so leave any system instances alone but do not need them.
echo "installed: ${missing[*]}"
