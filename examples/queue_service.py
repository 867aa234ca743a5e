"""A video service: a priority queue, 2 worker threads, a progress endpoint, a webhook."""
import dataclasses
import itertools
import os
import queue
import threading
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from exporters.server import create_app
from exporters.service import TelemetryService, summarize
from exporters.webhooks import WebhookSink
from inference.instrument import instrument
from inference.queueing import queued
from inference.tiny_models import build_tiny_pipeline
from telemetry.emitter import process_emitter
from telemetry.log import LocalLog
from wantel.serving import webhook_runner

MODEL, LOG = "tiny-t2v", Path(os.environ.get("WANTEL_LOG", "wantel-log"))
log = LocalLog(LOG)
emitter = process_emitter(log)  # one per process, shared by every job
telemetry = TelemetryService(log, checkpoint_dir=LOG / "checkpoints")
hooks = [webhook_runner(log, WebhookSink(url, secret=os.environ.get("WANTEL_WEBHOOK_SECRET")),
                        LOG / "checkpoints") for url in os.environ.get("WEBHOOKS", "").split()]
waiting: queue.PriorityQueue = queue.PriorityQueue()  # (-priority, arrival, job, prompt)
arrivals = itertools.count()
running = {}  # job -> its instrument() handle


def worker() -> None:
    pipe = build_tiny_pipeline(MODEL)  # a pipeline per thread: calls run side by side
    while True:
        _, _, job, prompt = waiting.get()
        try:
            with instrument(pipe, emitter=emitter, job=job, model=MODEL) as handle:
                running[job] = handle
                pipe(prompt=prompt, height=32, width=32, num_frames=9, num_inference_steps=30,
                     output_type="np")
        except Exception:
            pass  # recorded as JobFailed (type, message, suggestions); take the next job
        finally:
            running.pop(job, None)


async def submit(request):
    body = await request.json()
    job, priority = uuid.uuid4().hex[:12], int(body.get("priority", 0))
    queued(emitter, job, model=MODEL, priority=priority)  # JobQueued, queue "default"
    waiting.put((-priority, next(arrivals), job, body["prompt"]))  # the same order
    return JSONResponse({"id": job}, status_code=202)


async def progress(request):
    job = request.path_params["job"]
    view = telemetry.read_states(lambda states: summarize(states, job))  # place, ETA, …
    if view is None:
        return JSONResponse({"error": "no such job"}, status_code=404)
    handle = running.get(job)  # running here: the in-process view, fresher than the log's
    live = handle.progress(job) if handle is not None else None
    return JSONResponse({**view, "live": dataclasses.asdict(live) if live else None})


@asynccontextmanager
async def lifespan(app):
    telemetry.start()  # follows the log: /wantel/api, /wantel/v1/videos, /wantel/metrics
    for hook in hooks:
        hook.start()
    for _ in range(2):
        threading.Thread(target=worker, daemon=True).start()
    yield
    for hook in hooks:
        hook.stop()
    telemetry.stop()
    emitter.close()


app = Starlette(routes=[Route("/videos", submit, methods=["POST"]),
                        Route("/videos/{job}/progress", progress),
                        Mount("/wantel", app=create_app(telemetry))], lifespan=lifespan)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
