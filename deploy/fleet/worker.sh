#!/bin/sh
# A demo fleet worker (docker-compose.yml's worker-a and worker-b): `wantel demo` runs tiny jobs
# into this container's local log and serves its own /metrics for Prometheus, and `wantel ship`
# ships that log to the fleet's NATS stream ($WANTEL_NATS, as $WANTEL_WORKER). The local log
# stays the source of truth: a shipper that stops (the broker away at start, a crash) is
# started again, and resumes from its checkpoint in the log directory. $WANTEL_DEMO_PORT: the
# demo's port (default 9464); SIGTERM stops both cleanly.
set -u
wantel demo --host 0.0.0.0 --port "${WANTEL_DEMO_PORT:-9464}" &
demo=$!
ship=
trap 'kill -TERM $demo $ship 2>/dev/null; wait; exit 0' TERM INT
until [ -f "$WANTEL_LOG/wantel-log.json" ]; do  # the demo creates the log
    kill -0 $demo 2>/dev/null || exit 1
    sleep 1
done
while kill -0 $demo 2>/dev/null; do
    wantel ship &
    ship=$!
    wait $ship
    sleep 2
done
wait $demo
