#!/bin/bash
# Two builds of vhostuser_rs side by side: `bench --iodepth 32` against serve-blk (each build's
# own, started by bench) and against one qemu-storage-daemon, alternating build after build so
# both see the same machine state.
#
#   OLD=/path/to/old-venv/bin/python3 [NEW=python3] [ROUNDS=5] [TIME=3] bash benches/ab_builds.sh
#
# Build the old one from a worktree: `git worktree add /tmp/old REV && python3 -m venv /tmp/oldvenv
# && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target /tmp/oldvenv/bin/pip install .)`.
set -eu
: "${OLD:?set OLD to the python of a venv with the other build}"
NEW=${NEW:-python3} ROUNDS=${ROUNDS:-5} TIME=${TIME:-3}
dir=$(mktemp -d /dev/shm/vu-ab-XXXXXX)
trap 'kill $qsd 2>/dev/null; rm -rf "$dir"' EXIT
head -c 268435456 /dev/urandom > "$dir/disk.img"
qemu-storage-daemon --blockdev "driver=file,node-name=f0,filename=$dir/disk.img,cache.direct=off" \
    --blockdev driver=raw,node-name=d0,file=f0 \
    --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$dir/qsd.sock,writable=off,num-queues=1" &
qsd=$!
while [ ! -S "$dir/qsd.sock" ]; do sleep 0.1; done
for _ in $(seq "$ROUNDS"); do
    for side in old new; do
        py=$NEW; [ $side = old ] && py=$OLD
        echo "$side serve-blk: $(cd /tmp && $py -m vhostuser_rs bench --time "$TIME" --iodepth 32 | grep randread)"
        echo "$side qsd: $(cd /tmp && $py -m vhostuser_rs bench --time "$TIME" --iodepth 32 --socket "$dir/qsd.sock" | grep randread)"
    done
done
