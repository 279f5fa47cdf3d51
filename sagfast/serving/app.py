"""The Ray Serve deployment: a FastAPI ingress, request batching across guidance settings, and the
queue bound.

    GET|HEAD /health  {"status": "ok", "in_flight", "images", "calls", "failed_calls", "cancelled"}
    GET  /v1/models   {"models": [{"id", "kind", "size", "source", "scheduler", "refuses"}, ...]}
    POST /v1/images   {"model", "prompt" | "label", "seed", "steps", "size", "mode", and every per-image
                       setting under its public name: guidance_scale, sag_scale, pag_scale, ...}
                      -> {"image": base64 PNG, "seed", "batch_size", "timings": {"queue_ms", "run_ms", "total_ms"}}
    GET  /docs        the OpenAPI schema (with this server's limits and its error body)

Every error answer is `{"error": message}`, with `"errors": [{"field", "message"}]` on a 422
(`schema.ErrorBody`): bad fields, bodies that are not JSON (field "body"), unknown paths (404) and
methods (405) alike.

Batching: Ray Serve's `serve.batch` collects concurrent requests (up to `max_batch_size`, waiting at
most `batch_wait_ms` after the first); the batch is split into groups by `engine.group_key` and each
group is ONE guided pipeline call, whatever its requests' guidance settings. `batch_size` in the
answer is the number of requests in the image's call.

Under load and faults:
- a replica holds at most `max_queue` requests (waiting or running); one more is answered 503 with
  `Retry-After`; Ray Serve's router queue in front of the replicas is bounded at 4 x `max_queue`
  (`max_queued_requests`; past it Ray Serve answers 503 itself), so there is no unbounded backlog;
- a client that disconnects has its request cancelled by Ray Serve; a cancelled request still
  waiting for its batch is dropped before the call (Ray Serve's batch queue skips it);
- an error inside a group's call fails that group's requests with 500 and the error in the body;
  the replica and the other groups go on;
- a replica that dies is restarted by Ray Serve; its requests in flight get an error answer.
"""

# No `from __future__ import annotations`: FastAPI reads the route's body type (a class made per server) from its annotation.

import asyncio
import dataclasses
import math
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException

from sagfast.serving import engine
from sagfast.serving.schema import ErrorBody, Limits, field_errors, quote, request_model

BODY_NOT_PARSED = "There was an error parsing the body"
"""FastAPI's 400 detail when the body cannot be decoded at all (not UTF-8, nested deeper than the
decoder goes, an integer longer than Python converts): a bad field like any other here, so a 422."""
ERRORS = {
    422: {"model": ErrorBody, "description": "invalid request: `errors` names each field at fault"},
    500: {"model": ErrorBody, "description": "the model call failed (the request's group only)"},
    503: {"model": ErrorBody, "description": "the replica's queue is full: retry after `Retry-After` seconds"},
}


@dataclasses.dataclass
class Job:
    request: object
    arrived: float


@dataclasses.dataclass
class Done:
    image: str | None
    batch_size: int
    queue_ms: float
    run_ms: float
    error: str | None = None


def error(status: int, message: str, errors: list | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": message, **({"errors": errors} if errors else {})}
    return JSONResponse(status_code=status, content=body, headers=headers)


def make_deployment(limits: Limits):
    """The deployment class for `limits` (its request schema, and so /docs, carries them)."""
    api = FastAPI(title="sagfast", description="Guided diffusion: SAG, PAG, SEG and CFG per request, batched across settings.")
    ImageRequest = request_model(limits)

    @api.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        # Not FastAPI's default: it echoes the input, and a NaN in it cannot be encoded (a 500).
        return error(422, "invalid request", field_errors(exc.errors()))

    @api.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        # FastAPI's {"detail"} shape for 404, 405 and undecodable bodies: the server has one error shape.
        if exc.status_code == 400 and exc.detail == BODY_NOT_PARSED:
            cause = exc.__cause__
            why = f"{type(cause).__name__}: {str(cause)[:200]}" if cause is not None else "it could not be decoded"
            return error(422, "invalid request", [{"field": "body", "message": f"the body is not a UTF-8 JSON object ({why})"}])
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    # The replica answers 503 with Retry-After past `max_queue`; Ray Serve's router queue is bounded
    # too, looser (a burst arrives at the router before any request is assigned to a replica: at
    # `max_queue` it drops requests the replica would have taken), as a backstop: past it Ray Serve
    # itself answers 503 (plain text, no Retry-After).
    @serve.deployment(max_ongoing_requests=limits.max_queue + limits.max_batch_size, max_queued_requests=4 * limits.max_queue)
    @serve.ingress(api)
    class SagfastServer:
        def __init__(self, specs: dict, device: str = "cpu"):
            self.limits = limits
            self.models = engine.load_models(specs, device)
            self.in_flight = 0
            self.stats = dict(images=0, calls=0, failed_calls=0, cancelled=0)
            self.generate.set_max_batch_size(limits.max_batch_size)
            self.generate.set_batch_wait_timeout_s(limits.batch_wait_ms / 1000.0)

        @api.api_route("/health", methods=["GET", "HEAD"])
        async def health(self) -> dict:
            return {"status": "ok", "in_flight": self.in_flight, **self.stats}

        @api.get("/v1/models")
        async def list_models(self) -> dict:
            return {"models": [model.describe() for model in self.models.values()]}

        @api.post("/v1/images", responses=ERRORS)
        async def images(self, body: ImageRequest):
            model = self.models.get(body.model)
            if model is None:
                return error(
                    422,
                    "invalid request",
                    [{"field": "model", "message": f"unknown model {quote(body.model)}; served: {sorted(self.models)}"}],
                )
            if body.size is None:
                body = body.model_copy(update={"size": model.default_size(self.limits.max_size)})
            problem = engine.subject_problem(model, body)
            if problem is not None:
                return error(422, "invalid request", [{"field": problem[0], "message": problem[1]}])
            if self.in_flight >= self.limits.max_queue:
                retry = max(1, math.ceil(self.limits.batch_wait_ms / 1000.0 + 1.0))
                return error(
                    503, f"the server holds {self.limits.max_queue} requests already; retry later", headers={"Retry-After": str(retry)}
                )
            self.in_flight += 1
            arrived = time.perf_counter()
            try:
                done = await self.generate(Job(body, arrived))
            except asyncio.CancelledError:
                self.stats["cancelled"] += 1
                raise
            finally:
                self.in_flight -= 1
            if done.error is not None:
                return error(500, done.error)
            total = (time.perf_counter() - arrived) * 1e3
            timings = {"queue_ms": round(done.queue_ms, 3), "run_ms": round(done.run_ms, 3), "total_ms": round(total, 3)}
            return {"image": done.image, "seed": body.seed, "batch_size": done.batch_size, "timings": timings}

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def generate(self, jobs: list) -> list:
            groups: dict = {}
            for index, job in enumerate(jobs):
                request = job.request
                groups.setdefault(engine.group_key(request, self.limits.group_by, self.models[request.model]), []).append(index)
            results = [None] * len(jobs)
            for indices in groups.values():
                requests = [jobs[i].request for i in indices]
                start = time.perf_counter()
                try:
                    # In a thread: the replica's event loop keeps taking (and refusing) requests meanwhile.
                    images = await asyncio.to_thread(engine.run_group, self.models[requests[0].model], requests)
                except Exception as exc:  # the group fails, the replica goes on
                    self.stats["failed_calls"] += 1
                    message = f"the model call for {len(indices)} request(s) failed: {type(exc).__name__}: {exc}"
                    for i in indices:
                        results[i] = Done(None, len(indices), (start - jobs[i].arrived) * 1e3, 0.0, message)
                    continue
                run_ms = (time.perf_counter() - start) * 1e3
                self.stats["calls"] += 1
                self.stats["images"] += len(indices)
                for i, image in zip(indices, images):
                    results[i] = Done(engine.png_base64(image), len(indices), (start - jobs[i].arrived) * 1e3, run_ms)
            return results

    return SagfastServer


def application(specs: dict, limits: Limits, replicas: int = 1, gpus_per_replica: float = 0.0):
    """The bound application `serve.run` takes."""
    deployment = make_deployment(limits)
    device = "cuda" if gpus_per_replica > 0 else "cpu"
    options = dict(num_replicas=replicas, ray_actor_options={"num_cpus": 1, "num_gpus": gpus_per_replica})
    return deployment.options(**options).bind(specs, device)


__all__ = ["application", "make_deployment"]
