"""`sagfast serve`: the guided pipelines behind an HTTP API on Ray Serve, requests with different
guidance settings in one model call.

- `schema.py`: the request body (pydantic), the error body and the server's limits;
- `engine.py`: the served models and the batching rule (which requests share a pipeline call);
- `app.py`: the Ray Serve deployment (FastAPI ingress, `serve.batch`, the queue bound).

`start` and `stop` run it in this process (the CLI and the tests); `docs/serving.md` tells the rest.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import sys

DEFAULT_MODELS = {"digits-unet": "embedded", "digits-dit": "embedded"}
RAY_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class StartupError(Exception):
    """Why the server cannot start, in one line that names the option at fault."""


def check_startup(specs: dict, limits, host: str, port: int, gpus_per_replica: float = 0.0, address=None) -> None:
    """Everything that can be checked before Ray starts: the address to listen on, that the port is
    free, the models' sources, the limits against the models. Raises StartupError."""
    from sagfast.serving.engine import DIGIT_MODELS, DIGIT_SIZE

    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise StartupError(
            f"--host {host!r}: not an IP address to listen on (127.0.0.1, ::1, 0.0.0.0, or an address of this machine)"
        ) from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # No SO_REUSEPORT: a port another server listens on (sagfast's proxy included) is refused.
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(
                f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); another program holds it?"
            ) from None
    for name, source in specs.items():
        if source == "embedded":
            if name not in DIGIT_MODELS:
                raise StartupError(f"--model {name}: not an embedded model (embedded: {', '.join(DIGIT_MODELS)})")
            if limits.max_size < DIGIT_SIZE:
                raise StartupError(
                    f"--max-size {limits.max_size}: below {DIGIT_SIZE}, the only size the digit models make (raise it, or --no-digits)"
                )
        elif looks_like_path(source) and not os.path.isfile(os.path.join(os.path.expanduser(source), "model_index.json")):
            what = "is not a folder" if not os.path.isdir(os.path.expanduser(source)) else "has no model_index.json"
            raise StartupError(f"--model {name}={source}: {what} (a diffusers pipeline folder, as save_pretrained writes)")
    if gpus_per_replica > 0 and address is None:
        import torch

        if not torch.cuda.is_available():
            raise StartupError(f"--gpus-per-replica {gpus_per_replica:g}: this machine has no CUDA device")


def looks_like_path(source: str) -> bool:
    """A local folder rather than a hub repo id ("owner/name"): an absolute, relative or home path,
    or anything that exists here."""
    return source.startswith(("/", ".", "~")) or os.path.exists(source) or source.count("/") != 1


def one_line(exc: BaseException) -> str:
    """The cause of a failed deployment in one line: Ray's message holds the replica's whole traceback;
    its last `SomeError: message` line is the reason."""
    text = str(exc)
    found = re.findall(r"^\s*((?:\w+\.)*\w+(?:Error|Exception): .+)$", text, flags=re.MULTILINE)
    line = found[-1].strip() if found else (text.strip().splitlines() or [type(exc).__name__])[0]
    return line[:400]


def deployment_failure(exc: BaseException) -> str:
    """Why the deployment failed, in one line: Serve's exception says only that it failed; the
    replica's traceback is in the deployment's status."""
    from ray import serve

    try:
        deployments = serve.status().applications["sagfast"].deployments.values()
        return one_line(RuntimeError("\n".join([str(exc), *(d.message for d in deployments)])))
    except Exception:  # no status to read (Serve itself did not start): the exception is all there is
        return one_line(exc)


def start(
    specs: dict, limits, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, gpus_per_replica: float = 0.0, address=None
) -> str:
    """Check what can be checked, start Ray (a local instance of its own, or join the cluster at
    `address`) and the deployment; returns its URL once it answers. Raises StartupError (Ray is then
    shut down again)."""
    check_startup(specs, limits, host, port, gpus_per_replica, address)
    if address is None and ipaddress.ip_address(host).is_loopback and "ray" not in sys.modules:
        # Ray's single-machine switch (its default on macOS and Windows): the node's address is the
        # loopback one, so Ray's own servers (GCS, raylet, workers, agents, metrics) listen on loopback
        # too, not on every interface. Read when ray is imported: a process that imported it already
        # keeps Ray's default (docs/serving.md).
        os.environ[RAY_SINGLE_MACHINE] = "0"
    import ray
    from ray import serve

    from sagfast.serving.app import application

    # address="local": a Ray instance of this process's own (never one found on the machine), whose
    # processes `stop` ends. No dashboard: nothing here uses it, and it is one more port. Ray's and
    # Serve's INFO lines are not the server's output (its one line is the CLI's "sagfast serving ...").
    # Ray turns its token authentication on for a new local instance (Ray's own ports, listening beside
    # the server's, see docs/serving.md, answer only holders of the token), and says so as a warning
    # on every start: that is how sagfast wants it, not a thing for the operator to act on.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(specs, limits, replicas, gpus_per_replica), name="sagfast", route_prefix="/", blocking=False)
    except Exception as exc:
        reason = deployment_failure(exc)
        stop(address)
        raise StartupError(f"the server did not start: {reason}") from exc
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def stop(address=None) -> None:
    """Stop the deployment, Serve and the Ray instance this process started or joined.

    On its own Ray instance (`address` None) ending Ray ends everything, Serve's controller and
    replicas included, in a second or two; asking the controller to shut Serve down first could wait
    30 s for a controller that a signal to the process group has already ended. On a joined cluster
    the deployment is removed from it first."""
    import ray
    from ray import serve

    try:
        if address is not None:
            serve.shutdown()
    finally:
        ray.shutdown()


__all__ = ["DEFAULT_MODELS", "StartupError", "check_startup", "start", "stop"]
