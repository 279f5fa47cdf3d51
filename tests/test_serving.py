"""`sagfast serve`: the batching rule on the digit models, and one end-to-end run of the real Ray Serve
deployment answering real HTTP on 127.0.0.1 (the slower fault tests: tests/test_serving_faults.py).

The end-to-end test starts a local Ray instance and the deployment in this process, sends concurrent
requests with mixed guidance settings, and checks: every answer 200, calls shared by requests with
different settings, each image equal to the same request sent alone, the 422 cases (NaN sent as
the JSON literal NaN, as Python's json writes it), 503 with Retry-After on a full queue, /docs.
It stops Serve and the Ray instance it started (ray.shutdown ends the processes ray.init began).
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("ray.serve")

from sagfast.config import FIELDS, PER_IMAGE  # noqa: E402
from sagfast.serving import DEFAULT_MODELS, StartupError, start, stop  # noqa: E402
from sagfast.serving.engine import decode_png, group_key, load_models, run_group, subject_problem  # noqa: E402
from sagfast.serving.schema import MAX_SCALE, Limits, request_model  # noqa: E402

LIMITS = Limits(max_steps=12, max_size=64, max_batch_size=4, batch_wait_ms=200.0, max_queue=6)
ImageRequest = request_model(LIMITS)

MIXED = [
    dict(label=1, seed=11, guidance_scale=3.0, sag_scale=0.75),
    dict(label=2, seed=12, guidance_scale=1.0, sag_scale=0.0, pag_scale=1.0),
    dict(label=3, seed=13, guidance_scale=5.0, sag_scale=0.5, pag_scale=2.0),
    dict(label=4, seed=14, guidance_scale=2.0, sag_scale=1.0, seg_scale=1.0),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answer_of(raw: bytes):
    try:
        return json.loads(raw or b"{}")
    except json.JSONDecodeError:
        return {"text": raw.decode(errors="replace")}


def post(url: str, body, timeout: float = 120.0, path: str = "/v1/images", method: str = "POST"):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, answer_of(response.read()), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, answer_of(e.read()), {k.lower(): v for k, v in e.headers.items()}


def pixels_apart(a: str, b: str) -> int:
    return int(np.abs(decode_png(a).astype(int) - decode_png(b).astype(int)).max())


# -- the batching rule, without a server -------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_models():
    return load_models(DEFAULT_MODELS)


@pytest.mark.parametrize("name", ["digits-unet", "digits-dit"])
def test_mixed_settings_in_one_call_give_each_image_its_own_result(digit_models, name):
    requests = [ImageRequest(model=name, steps=4, **fields) for fields in MIXED]
    together = run_group(digit_models[name], requests)
    plain = run_group(digit_models[name], [ImageRequest(model=name, steps=4, label=1, seed=11, guidance_scale=1.0, sag_scale=0.0)])[0]
    for request, image in zip(requests, together):
        alone = run_group(digit_models[name], [request])[0]
        assert image.dtype == np.uint8 and image.shape == (32, 32, 1)
        assert np.abs(image.astype(int) - alone.astype(int)).max() <= 1
    assert np.abs(together[0].astype(int) - plain.astype(int)).max() > 1  # the settings did act


@pytest.mark.parametrize("field", ["guidance_scale", "sag_scale", "pag_scale"])
def test_a_scale_that_overflows_changes_only_its_own_image(digit_models, field):
    # Past the schema (which refuses it): the call itself keeps each image's arithmetic its own, and
    # the pipeline's CFG line never sees a request's scale.
    requests = [ImageRequest(model="digits-unet", steps=3, **fields) for fields in MIXED[:3]]
    hostile = ImageRequest.model_construct(**{**requests[0].model_dump(), "label": 9, field: 1e39})
    together = run_group(digit_models["digits-unet"], [*requests, hostile])
    for request, image in zip(requests, together):
        alone = run_group(digit_models["digits-unet"], [request])[0]
        assert np.abs(image.astype(int) - alone.astype(int)).max() <= 1, request


def test_defaults_respect_the_limits(digit_models):
    schema = request_model(Limits(max_steps=5, max_size=256))
    assert schema(model="digits-unet", label=1).steps == 5
    properties = schema.model_json_schema()["properties"]
    assert properties["steps"]["default"] <= properties["steps"]["maximum"] == 5
    for field in ("guidance_scale", "sag_scale", "pag_scale", "seg_scale", "stg_scale"):
        assert properties[field]["maximum"] == MAX_SCALE and properties[field]["default"] <= MAX_SCALE
    assert digit_models["digits-unet"].default_size(1024) == 32
    with pytest.raises(StartupError, match="--max-size 16"):
        start(DEFAULT_MODELS, Limits(max_size=16), port=free_port())


def test_requests_share_a_call_by_model_steps_size_and_mode():
    a = ImageRequest(model="digits-unet", label=1, guidance_scale=3.0)
    b = ImageRequest(model="digits-unet", label=5, seed=9, guidance_scale=7.0, pag_scale=2.0)
    assert group_key(a) == group_key(b)
    for other in (dict(steps=5), dict(mode="batched"), dict(model="digits-dit")):
        assert group_key(ImageRequest(**{**a.model_dump(), **other})) != group_key(a)
    assert group_key(a, "settings") != group_key(b, "settings")  # what other serving engines batch


def test_a_request_must_fit_its_model(digit_models):
    unet = digit_models["digits-unet"]
    assert subject_problem(unet, ImageRequest(model="digits-unet", prompt="a cat"))[0] == "label"
    assert subject_problem(unet, ImageRequest(model="digits-unet", label=1, size=64))[0] == "size"
    assert subject_problem(unet, ImageRequest(model="digits-unet", label=1, size=32)) is None


# -- the deployment, end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    url = start(DEFAULT_MODELS, LIMITS, port=free_port())
    try:
        yield url
    finally:
        stop()


def test_concurrent_mixed_requests_share_calls_and_equal_their_own_answers(server):
    bodies = [dict(model="digits-unet", steps=4, **fields) for fields in MIXED]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: post(server, body), bodies))
    assert [status for status, _, _ in answers] == [200] * len(bodies), answers
    assert max(body["batch_size"] for _, body, _ in answers) > 1  # settings differed, the call was shared
    for body, (_, answer, _) in zip(bodies, answers):
        assert answer["seed"] == body["seed"] and set(answer["timings"]) == {"queue_ms", "run_ms", "total_ms"}
        status, alone, _ = post(server, body)
        assert status == 200 and alone["batch_size"] == 1
        diff = np.abs(decode_png(answer["image"]).astype(int) - decode_png(alone["image"]).astype(int)).max()
        assert diff <= 1  # 1/255


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"model": "digits-unet", "label": 1, "sag_scale": NaN}', "sag_scale"),
        (b'{"model": "digits-unet", "label": 1, "guidance_scale": Infinity}', "guidance_scale"),
        ({"model": "digits-unet", "label": 1, "color": "red"}, "color"),
        ({"model": "digits-unet", "label": "1"}, "label"),
        ({"model": "digits-unet", "label": 10}, "label"),
        ({"model": "digits-unet", "label": 1, "steps": 0}, "steps"),
        ({"model": "digits-unet", "label": 1, "steps": 13}, "steps"),
        ({"model": "digits-unet", "label": 1, "pag_scale": -1.0}, "pag_scale"),
        ({"model": "digits-unet", "label": 1, "size": 72}, "size"),
        ({"model": "digits-unet", "label": 1, "size": 60}, "size"),
        ({"model": "digits-unet", "label": 1, "mode": "fast"}, "mode"),
        ({"model": "nope", "label": 1}, "model"),
        ({"model": "digits-unet", "prompt": "a cat"}, "label"),
        ({"model": "digits-unet", "label": 1, "size": 64}, "size"),
        ({"model": "digits-unet", "label": 1, "guidance_scale": 1e39}, "guidance_scale"),
        ({"model": "digits-unet", "label": 1, "sag_scale": 1e39}, "sag_scale"),
        ({"model": "digits-unet", "label": 1, "pag_scale": MAX_SCALE + 1}, "pag_scale"),
        ({"model": "digits-unet", "label": 1, "stg_scale": 1.0}, "stg_scale"),  # no block stack to skip
        ({"model": "digits-unet", "label": 1, "sag_scale": True}, "sag_scale"),
        (b"not json at all", "body"),
        (b"[1, 2]", "body"),
        (b'{"model": "digits-unet", "label": 1}' + b"\xff\xfe", "body"),  # not UTF-8
        (b"[" * 5000 + b"]" * 5000, "body"),  # deeper than the decoder goes
        (b'{"model": "digits-unet", "label": ' + b"7" * 5000 + b"}", "body"),  # longer than Python converts
    ],
)
def test_bad_requests_get_422_naming_the_field(server, body, field):
    status, answer, _ = post(server, body)
    assert status == 422, answer
    assert answer["error"] == "invalid request" and set(answer) == {"error", "errors"}, answer
    assert field in {error["field"] for error in answer["errors"]}, answer


def test_a_hostile_request_in_a_batch_is_refused_alone(server):
    bodies = [dict(model="digits-unet", steps=4, **fields) for fields in MIXED[:3]]
    hostile = dict(bodies[0], label=9, guidance_scale=1e39)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda body: post(server, body), [*bodies, hostile]))
    assert answers[3][0] == 422 and answers[3][1]["errors"][0]["field"] == "guidance_scale", answers[3]
    for body, (status, answer, _) in zip(bodies, answers):
        assert status == 200, answer
        assert pixels_apart(answer["image"], post(server, body)[1]["image"]) <= 1


@pytest.mark.parametrize("where", ["model", "field"])
def test_bad_input_is_not_echoed(server, where):
    huge = "x" * 1_000_000
    body = {"model": huge, "label": 1} if where == "model" else {"model": "digits-unet", "label": 1, huge: 1}
    status, answer, _ = post(server, body)
    assert status == 422 and len(json.dumps(answer)) < 1000, json.dumps(answer)[:2000]
    assert "1000000 characters" in json.dumps(answer)


def test_every_error_has_one_shape_and_health_answers_head(server):
    assert post(server, None, path="/health", method="HEAD")[0] == 200
    status, answer, _ = post(server, None, path="/nowhere", method="GET")
    assert status == 404 and set(answer) == {"error"}, answer
    status, answer, _ = post(server, None, path="/v1/images", method="GET")
    assert status == 405 and set(answer) == {"error"}, answer


def test_a_second_server_on_a_port_in_use_does_not_start(server):
    port = int(server.rsplit(":", 1)[1])
    with pytest.raises(StartupError, match=f"--port {port}"):
        start(DEFAULT_MODELS, LIMITS, port=port)


def test_a_full_queue_answers_503_with_retry_after(server):
    body = dict(model="digits-dit", steps=12, label=7)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda seed: post(server, dict(body, seed=seed)), range(12)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 1 and statuses.count(200) >= LIMITS.max_queue - 1, statuses
    for status, answer, headers in answers:
        if status == 503:
            assert int(headers["retry-after"]) >= 1 and "retry" in answer["error"]
    with urllib.request.urlopen(server + "/health", timeout=30) as response:
        assert json.loads(response.read())["in_flight"] == 0  # nothing left behind


def test_models_health_and_docs(server):
    with urllib.request.urlopen(server + "/v1/models", timeout=30) as response:
        models = {m["id"]: m for m in json.loads(response.read())["models"]}
    assert set(models) == {"digits-unet", "digits-dit"} and models["digits-unet"]["size"] == 32
    with urllib.request.urlopen(server + "/openapi.json", timeout=30) as response:
        schema = json.loads(response.read())
    properties = schema["components"]["schemas"]["ImageRequest"]["properties"]
    assert properties["steps"]["maximum"] == LIMITS.max_steps
    # every per-image setting of the registry, under its public name (a term added to sagfast/terms/ is served)
    served = {FIELDS[name].public for name in PER_IMAGE}
    assert {"guidance_scale", "sag_scale", "pag_scale", "seg_scale", "stg_scale"} <= served <= set(properties)
    assert models["digits-unet"]["refuses"] == ["stg_scale"]  # no block stack: STG is refused on the UNet
    # the 422 a client generated from the schema reads is the one the server sends
    invalid = schema["paths"]["/v1/images"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    error_body = schema["components"]["schemas"][invalid.rsplit("/", 1)[1]]
    assert set(error_body["properties"]) == {"error", "errors"}
    with urllib.request.urlopen(server + "/docs", timeout=30) as response:
        assert response.status == 200


def test_the_readme_serving_section_runs_as_written(server):
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("\n## Serving\n")
    section = text[start : text.index("\n## ", start + 1)]
    bash = section.split("```bash\n")[1].split("```")[0]
    assert "sagfast serve --host 127.0.0.1 --port 8000" in bash
    # the curl line, as written, against this server
    curl = bash[bash.index("curl") :].replace("\\\n", " ").replace("http://127.0.0.1:8000", server)
    done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
    assert json.loads(done.stdout)["batch_size"] >= 1, done.stdout[:300]
    block = section.split("```python\n")[1].split("```")[0]
    scope = {}
    exec(compile(block.replace("http://127.0.0.1:8000", server), "README.md (serving)", "exec"), scope)
    assert scope["image"].size == (32, 32) and scope["answer"]["seed"] == 1


def serve_cli(*options: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "sagfast.cli", "serve", *options], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "options, named",
    [
        (["--host", "not-an-ip"], "--host"),
        (["--model", "x=/nonexistent/folder"], "--model x=/nonexistent/folder"),
        (["--max-size", "16"], "--max-size 16"),
        (["--no-digits"], "no models"),
    ],
)
def test_start_up_errors_are_one_line_and_exit_2(options, named):
    done = serve_cli("--port", str(free_port()), *options)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_port_held_by_another_program_is_one_line_and_exit_2():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = serve_cli("--port", str(port))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr[-2000:]
    assert f"--port {port}" in done.stderr and "in use" in done.stderr, done.stderr


def test_a_model_that_fails_to_load_is_one_line_naming_it(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')  # no components
    done = serve_cli("--port", str(free_port()), "--no-digits", "--model", f"bad={tmp_path}", timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert f"--model bad={tmp_path} did not load" in lines[0] and "expected" in lines[0], lines


def test_gpus_without_a_cuda_device_are_refused_at_start():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: --gpus-per-replica 1 would start")
    done = serve_cli("--port", str(free_port()), "--gpus-per-replica", "1")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr[-2000:]
    assert "--gpus-per-replica 1: this machine has no CUDA device" in done.stderr
