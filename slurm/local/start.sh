#!/usr/bin/env bash
# Start a throwaway single-node SLURM on localhost (munged + slurmctld + slurmd, as root),
# with fake GPU devices so `--gres=gpu:N` works on CPU-only machines. Used by the tests
# marked `slurm` (tests/slurm_support.py) and by hand:
#
#   bash slurm/local/start.sh && export SLURM_CONF=${PTYINR_SLURM_ROOT:-/tmp/ptyinr-slurm}/slurm.conf
#   ... sbatch / squeue / ptyinr run --cluster slurm:local-test ...
#   bash slurm/local/stop.sh
#
# Packages: bash slurm/local/install-packages.sh (slurmctld slurmd slurm-client munge).
# Env (all optional):
#   PTYINR_SLURM_ROOT       all state, logs, sockets and pid files (default /tmp/ptyinr-slurm)
#   PTYINR_SLURM_NGPU       fake GPUs on the node (default 2)
#   PTYINR_SLURM_CPUS       CPUs declared for the node, may exceed nproc (default max(nproc, 8))
#   PTYINR_SLURM_MEM        RealMemory in MB (default 80 % of what slurmd detects)
#   PTYINR_SLURM_CTLD_PORT / PTYINR_SLURM_SLURMD_PORT   ports on 127.0.0.1 (default 6817 / 6818)
# Idempotent: if the daemons under this root are already running it only prints SLURM_CONF.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${PTYINR_SLURM_ROOT:-/tmp/ptyinr-slurm}"
NGPU="${PTYINR_SLURM_NGPU:-2}"
NPROC="$(nproc)"
CPUS="${PTYINR_SLURM_CPUS:-$(( NPROC > 8 ? NPROC : 8 ))}"
CTLD_PORT="${PTYINR_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${PTYINR_SLURM_SLURMD_PORT:-6818}"

die() { echo "start.sh: $*" >&2; exit 1; }
# The root goes into slurm.conf and a sed expression: keep it to plain path characters.
[[ "$ROOT" =~ ^/[A-Za-z0-9._/-]+$ ]] || die "PTYINR_SLURM_ROOT must be an absolute path of [A-Za-z0-9._/-], got '$ROOT'"
[[ "$NGPU" =~ ^[1-9][0-9]*$ ]] || die "PTYINR_SLURM_NGPU must be a positive integer, got '$NGPU'"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "PTYINR_SLURM_CPUS must be a positive integer, got '$CPUS'"
[ "$(id -u)" -eq 0 ] || die "must run as root (slurmd starts jobs as their user; mknod for fake GPUs)"
for exe in /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd munge unmunge scontrol sinfo; do
  command -v "$exe" >/dev/null 2>&1 || die "$exe not found: run bash slurm/local/install-packages.sh"
done

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive "$ROOT/run/slurmctld.pid" && alive "$ROOT/run/slurmd.pid" && alive "$ROOT/munge/munged.pid"; then
  echo "slurm already running under $ROOT"
  echo "export SLURM_CONF=$ROOT/slurm.conf"
  exit 0
fi
# Half-started or stale: stop whatever of ours is left (by pid files) and start afresh.
PTYINR_SLURM_ROOT="$ROOT" bash "$HERE/stop.sh" >/dev/null 2>&1 || true

# RealMemory must be <= what slurmd detects (slurmd -C) or the node is INVALID/DRAINED.
MEM_DETECTED="$(/usr/sbin/slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)"
MEM="${PTYINR_SLURM_MEM:-$(( MEM_DETECTED * 8 / 10 ))}"
SOCK="$ROOT/munge/munge.socket"

mkdir -p "$ROOT"/{munge,state,spool/slurmd,run,log,fakegpu}
chmod 755 "$ROOT"; chmod 711 "$ROOT/munge"   # 711: non-root clients can reach the socket
dump_logs() { for f in "$ROOT"/log/*.log; do [ -f "$f" ] || continue; echo "== $f" >&2; tail -n 20 "$f" >&2; done; }
trap 'echo "start.sh: failed at line $LINENO" >&2; dump_logs' ERR

# Fake GPU "devices": char nodes with /dev/null's major:minor.
for i in $(seq 0 $((NGPU - 1))); do
  [ -c "$ROOT/fakegpu/nvidia$i" ] || mknod -m 666 "$ROOT/fakegpu/nvidia$i" c 1 3
done

# munge: private key and socket (munged as root needs --force).
if [ ! -s "$ROOT/munge/munge.key" ]; then
  dd if=/dev/urandom of="$ROOT/munge/munge.key" bs=1 count=1024 status=none
  chmod 400 "$ROOT/munge/munge.key"
fi
/usr/sbin/munged --force --socket="$SOCK" --key-file="$ROOT/munge/munge.key" \
  --pid-file="$ROOT/munge/munged.pid" --log-file="$ROOT/log/munged.log" \
  --seed-file="$ROOT/munge/munged.seed"
munge -n --socket="$SOCK" | unmunge --socket="$SOCK" >/dev/null

# Config files (gres.conf must sit next to slurm.conf).
subst() {
  sed -e "s#@ROOT@#$ROOT#g" -e "s#@CPUS@#$CPUS#g" -e "s#@MEM@#$MEM#g" \
      -e "s#@NGPU@#$NGPU#g" -e "s#@NGPU_MAX@#$((NGPU - 1))#g" \
      -e "s#@CTLD_PORT@#$CTLD_PORT#g" -e "s#@SLURMD_PORT@#$SLURMD_PORT#g" "$1"
}
subst "$HERE/slurm.conf.in" > "$ROOT/slurm.conf"
subst "$HERE/gres.conf.in" > "$ROOT/gres.conf"
export SLURM_CONF="$ROOT/slurm.conf"
: > "$ROOT/log/slurmctld.log"; : > "$ROOT/log/slurmd.log"

# -c: clean state (no jobs from an earlier run). -N localhost: node name independent of hostname.
/usr/sbin/slurmctld -c -f "$SLURM_CONF"
/usr/sbin/slurmd -N localhost -f "$SLURM_CONF"

# Both daemonize and exit 0 even when they die later on "fatal:", so watch the logs too.
state=""
for _ in $(seq 1 80); do
  if grep -q 'fatal' "$ROOT/log/slurmctld.log" "$ROOT/log/slurmd.log" 2>/dev/null; then break; fi
  # scontrol ping answers at once; sinfo/sbatch spend seconds retrying while slurmctld is down.
  if ! timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then sleep 0.25; continue; fi
  state="$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)"
  [ "$state" = "idle" ] && break
  sleep 0.25
done
if [ "$state" != "idle" ]; then
  echo "start.sh: slurm node not idle (state='$state')" >&2
  dump_logs
  exit 1
fi
echo "slurm started under $ROOT: node localhost, $CPUS CPUs, ${MEM} MB, $NGPU fake GPUs"
echo "export SLURM_CONF=$SLURM_CONF"
