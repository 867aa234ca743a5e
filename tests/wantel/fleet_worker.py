"""A fleet worker for tests: emits a few realistic jobs through the Emitter into its own local
log while a shipper thread ships that log to the fleet stream; exits once all is shipped.

    python -m tests.wantel.fleet_worker LOG_DIR NATS_URL WORKER JOBS
"""

from __future__ import annotations

import sys
import time

from telemetry.emitter import Emitter
from telemetry.log.local import LocalLog
from telemetry.log.nats import NatsLog, NatsOptions
from telemetry.ship import shipper
from tests.fleet.emitter_proc import BASE_TS, emit_job


def main() -> None:
    log_dir, url, worker, jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    local = LocalLog(log_dir)
    runner, _sink = shipper(local, log_dir, "WANTEL_EVENTS",
                           lambda: NatsLog(NatsOptions(url, reconnect=True), worker=worker))
    runner.start()
    emitter = Emitter(local, worker=worker, heartbeat_interval=0.05)
    for n in range(jobs):
        emit_job(emitter, f"{worker}-job-{n}", worker, BASE_TS + n * 10**10, pace=0.002)
    emitter.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        last = local.last_position()
        if last is not None and runner.engine.position > last and runner.held_back() is None:
            break
        time.sleep(0.02)
    else:
        sys.exit("the shipper did not catch up")
    runner.shutdown()
    local.close()


if __name__ == "__main__":
    main()
