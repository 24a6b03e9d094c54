#!/usr/bin/env bash
# The main job end to end: a generated 1 TiB image, zeroed in 1 GiB requests
# (allocation pass), zeroed again (nothing changes), then with MAY_UNMAP,
# through `qcow2 io` in writeback mode; prints the churn counters of each pass.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "qemu-img missing: apt-get install -y qemu-utils" >&2; exit 1; }
cargo build --release -q -p qcow2-cli
bin=target/release/qcow2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
img="$dir/demo.qcow2"
size_gib=${DEMO_SIZE_GIB:-1024}
"$bin" create -f qcow2 "$img" "${size_gib}G" >/dev/null
# some data first, so that zeroing has something to do
qemu-io -f qcow2 -c "write -P 0xab 0 64M" "$img" >/dev/null
cmds=()
for ((i = 0; i < size_gib; i++)); do cmds+=(-c "write -q -z ${i}G 1G"); done
for pass in allocate rescan; do
  start=$(date +%s.%N)
  stats=$("$bin" io -t writeback --stats=json "${cmds[@]}" "$img" | tail -n 1)
  end=$(date +%s.%N)
  printf '%-8s %6.3fs %s\n' "$pass" "$(echo "$end - $start" | bc)" "$stats"
done
ucmds=()
for ((i = 0; i < size_gib; i++)); do ucmds+=(-c "write -q -z -u ${i}G 1G"); done
start=$(date +%s.%N)
stats=$("$bin" io -t writeback -d unmap --stats=json "${ucmds[@]}" "$img" | tail -n 1)
end=$(date +%s.%N)
printf '%-8s %6.3fs %s\n' "unmap" "$(echo "$end - $start" | bc)" "$stats"
qemu-img check "$img" | head -n 1
