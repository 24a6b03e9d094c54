#!/usr/bin/env bash
# Throughput of nbdkit + nbdkit-qcow2-plugin (libqcow2) next to qemu-nbd on
# the same workloads, same starting image, one run. Prints a table.
#
#   bash plugins/nbdkit/bench.sh            # builds libqcow2 (release) and the plugin
#   PLUGIN=/path/plugin.so bash plugins/nbdkit/bench.sh
#   N=... (request count scale, default 20000)  WORKDIR=... (scratch, default mktemp)
#
# Workloads (64 KiB clusters, 1 GiB image whose first 256 MiB hold data):
#   zero-heavy  qemu-io aio_write -z: 64 KiB zeroes over data (half with -u,
#               i.e. MAY_UNMAP), 4 KiB partial zeroes over data (fallback) and
#               64 KiB zeroes over unallocated clusters, 32 in flight, then flush
#   write-4k    qemu-img bench -w, 4 KiB writes, 16 in flight, step 68 KiB
#               (a new cluster every request), cache=none on the client
#   read-4k     qemu-img bench, 4 KiB reads of data, 16 in flight
#   mixed-4k    write-4k and read-4k at the same time, on two connections
# Servers: nbdkit -U S PLUGIN file=IMG cache=writeback discard=unmap
#          qemu-nbd -k S -f qcow2 --cache=writeback --discard=unmap -t -e 0 IMG
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
N="${N:-20000}"
for t in nbdkit qemu-nbd qemu-img qemu-io cc; do
  command -v "$t" >/dev/null || { echo "$t not found (apt-get install -y nbdkit nbdkit-plugin-dev libnbd-bin qemu-utils gcc)" >&2; exit 1; }
done
work="${WORKDIR:-}"
if [ -z "$work" ]; then work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT; fi
work="$work/bench"; mkdir -p "$work"

if [ -z "${PLUGIN:-}" ]; then
  (cd "$root" && cargo build -q -p qcow2-capi --release)
  # The library's SONAME is libqcow2.so.0: cargo writes only libqcow2.so.
  ln -sfn libqcow2.so "$root/target/release/libqcow2.so.0"
  PLUGIN="$work/nbdkit-qcow2-plugin.so"
  cc -std=c11 -Wall -Wextra -Wpedantic -Werror -fPIC -shared -O2 -I "$root/include" \
     "$root/plugins/nbdkit/nbdkit-qcow2-plugin.c" -o "$PLUGIN" \
     -L "$root/target/release" -Wl,-rpath,"$root/target/release" -lqcow2
fi

pid=""
stop() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi
}
trap 'stop; [ -z "${WORKDIR:-}" ] && rm -rf "$work" || true' EXIT

serve() { # serve SERVER IMAGE: sets URI and pid
  local sock="$work/sock" i
  rm -f "$sock" "$work/pid"
  case "$1" in
    nbdkit)   nbdkit -U "$sock" -P "$work/pid" -f "$PLUGIN" file="$2" cache=writeback discard=unmap >"$work/server.log" 2>&1 & ;;
    qemu-nbd) qemu-nbd -k "$sock" -f qcow2 --cache=writeback --discard=unmap -t -e 0 "$2" >"$work/server.log" 2>&1 & ;;
  esac
  pid=$!
  for i in $(seq 500); do
    if [ "$1" = nbdkit ]; then [ -s "$work/pid" ] && break; else [ -S "$sock" ] && break; fi
    sleep 0.02
  done
  sleep 0.1
  URI="nbd+unix:///?socket=$sock"
}

# The starting image: 1 GiB, first 256 MiB written (64 KiB requests).
base="$work/base.qcow2"
qemu-img create -q -f qcow2 "$base" 1G
qemu-img bench -q -f qcow2 -t writeback -w -c 4096 -d 16 -s 64k --pattern=7 "$base" >/dev/null

# zero-heavy command list
zcmds="$work/zero.cmds"
{
  k=0
  for ((i = 0; i < N; i++)); do
    case $((i % 4)) in
      0) echo "aio_write -z $(( (i % 4096) * 65536 )) 64k" ;;
      1) echo "aio_write -z -u $(( ((i * 7) % 4096) * 65536 )) 64k" ;;
      2) echo "aio_write -z $(( ((i * 13) % 4096) * 65536 + 4096 )) 4k" ;;
      3) echo "aio_write -z $(( 268435456 + (i % 12288) * 65536 )) 64k" ;;
    esac
    if (( ++k % 32 == 0 )); then echo "aio_flush"; fi
  done
  echo "aio_flush"
  echo "flush"
} > "$zcmds"
zargs=()
while read -r l; do zargs+=(-c "$l"); done < "$zcmds"
nz=$N

now() { echo "$EPOCHREALTIME"; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%9.0f ops/s (%6.2f s)", n / (b - a), b - a }'; }

declare -A R
for server in nbdkit qemu-nbd; do
  img="$work/$server.qcow2"

  # zero-heavy
  cp "$base" "$img"; serve "$server" "$img"
  t0=$(now); qemu-io -f raw "$URI" "${zargs[@]}" > "$work/zero.out" 2>&1; t1=$(now)
  if grep -q 'failed' "$work/zero.out"; then echo "zero-heavy failed on $server:" >&2; grep failed "$work/zero.out" | head >&2; exit 1; fi
  R[$server,zero]="$(rate "$nz" "$t0" "$t1")"
  stop; qemu-img check -q "$img"

  # write-4k, read-4k, mixed-4k
  cp "$base" "$img"; serve "$server" "$img"
  t0=$(now); qemu-img bench -q -f raw -t none -w -c "$N" -d 16 -s 4k -S 68k -o 268435456 --pattern=9 "$URI" >/dev/null; t1=$(now)
  R[$server,write]="$(rate "$N" "$t0" "$t1")"
  t0=$(now); qemu-img bench -q -f raw -t none -c "$N" -d 16 -s 4k -S 12k "$URI" >/dev/null; t1=$(now)
  R[$server,read]="$(rate "$N" "$t0" "$t1")"
  t0=$(now)
  qemu-img bench -q -f raw -t none -w -c "$N" -d 16 -s 4k -S 68k -o 805306368 --pattern=11 "$URI" >/dev/null &
  w=$!
  qemu-img bench -q -f raw -t none -c "$N" -d 16 -s 4k -S 12k -o 4096 "$URI" >/dev/null
  wait "$w"
  t1=$(now)
  R[$server,mixed]="$(rate $((2 * N)) "$t0" "$t1")"
  stop; qemu-img check -q "$img"
done

printf '\n%-12s %-30s %-30s\n' workload "nbdkit + qcow2 plugin" "qemu-nbd $(qemu-nbd --version | head -1 | awk '{print $2}')"
for w in zero write read mixed; do
  case $w in zero) n=zero-heavy ;; write) n=write-4k ;; read) n=read-4k ;; mixed) n=mixed-4k ;; esac
  printf '%-12s %-30s %-30s\n' "$n" "${R[nbdkit,$w]}" "${R[qemu-nbd,$w]}"
done
echo "(N=$N requests per workload, $(nproc) CPUs; nbdkit $(nbdkit --version | awk '{print $2}'))"
