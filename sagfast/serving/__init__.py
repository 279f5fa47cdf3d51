"""`sagfast serve`: the guided pipelines behind an HTTP API on Ray Serve, requests with different
guidance settings in one model call.

- `schema.py`: the request body (pydantic) and the server's limits;
- `engine.py`: the served models and the batching rule (which requests share a pipeline call);
- `app.py`: the Ray Serve deployment (FastAPI ingress, `serve.batch`, the queue bound).

`start` and `stop` run it in this process (the CLI and the tests); `docs/serving.md` tells the rest.
"""

from __future__ import annotations

DEFAULT_MODELS = {"digits-unet": "embedded", "digits-dit": "embedded"}


def start(
    specs: dict, limits, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, gpus_per_replica: float = 0.0, address=None
) -> str:
    """Start Ray (a local instance, or join the cluster at `address`) and the deployment; returns its
    URL once it answers."""
    import ray
    from ray import serve

    from sagfast.serving.app import application

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(specs, limits, replicas, gpus_per_replica), name="sagfast", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def stop() -> None:
    """Stop the deployment, Serve and the Ray instance this process started or joined."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


__all__ = ["DEFAULT_MODELS", "start", "stop"]
