#!/bin/sh
# The GlusterFS comparison on the shared lab in one hold of its session lock: deploy the
# demo site, set GlusterFS up on both nodes, measure, tear it down (benchmarks/peer_glusterfs.py).
#   sudo benchmarks/peer_glusterfs_lab.sh [run_all options, e.g. --quick --report FILE]
# The .debs are fetched into the host's cache before the lock is taken (the only step that
# may use the network); the hold is cut at 14 min with SIGINT, so teardown still runs.
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
"$python" -c 'from ha_lab import packages; print(packages.ensure_debs(packages.GLUSTERFS)[0])'
exec flock /tmp/hapair-lab-session.lock \
    timeout --signal=INT --kill-after=60 14m \
    "$python" -m benchmarks.run_all --only peer_glusterfs "$@"
