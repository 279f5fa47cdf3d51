"""`sagfast serve` under faults, on a real local Ray Serve deployment answering HTTP on 127.0.0.1:
a text-to-image pipeline from a folder and one that fails inside its call, a client that disconnects,
a replica killed mid-batch, and the CLI started and stopped by process group.

Every test bounds its requests (count and client timeout: a hang fails the test) and stops what it
started: the in-process ones stop Serve and Ray (ray.shutdown ends the processes ray.init began), the
CLI test sends SIGTERM to the server's process group and checks that no process it started is left.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("ray.serve")

import ray  # noqa: E402
from test_serving import answer_of, free_port, post  # noqa: E402

from sagfast.serving import start, stop  # noqa: E402
from sagfast.serving.engine import decode_png  # noqa: E402
from sagfast.serving.schema import Limits  # noqa: E402

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as response:
        return json.loads(response.read())


def wait_healthy(url: str, seconds: float = 120.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return health(url)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def pipelines(folder) -> dict:
    """A tiny text-to-image pipeline saved to a folder, and one whose VAE cannot decode its UNet's
    latents (8 latent channels for a 4-channel UNet): it loads, and fails inside every call."""
    sys.path.insert(0, os.path.join(REPO, "examples"))
    from diffusers import AutoencoderKL
    from offline_pipeline import tiny_stable_diffusion

    good = tiny_stable_diffusion()
    good.save_pretrained(folder / "sd")
    broken = tiny_stable_diffusion()
    broken.vae = AutoencoderKL(
        block_out_channels=(8, 8),
        latent_channels=8,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    broken.save_pretrained(folder / "broken")
    return {"sd": str(folder / "sd"), "broken": str(folder / "broken")}


def test_a_folder_pipeline_serves_and_a_failing_one_fails_only_its_own_batch(tmp_path):
    specs = {"digits-unet": "embedded", **pipelines(tmp_path)}
    url = start(specs, Limits(max_steps=12, max_batch_size=4, batch_wait_ms=100.0), port=free_port())
    try:
        status, answer, _ = post(url, dict(model="sd", prompt="a photo of a cat", steps=3, seed=1, pag_scale=1.0))
        assert status == 200, answer
        assert decode_png(answer["image"]).shape == (32, 32, 3)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            bodies = [dict(model="broken", prompt="a cat", steps=2, seed=s) for s in range(2)] + [
                dict(model="digits-unet", label=3, steps=3)
            ]
            answers = list(pool.map(lambda body: post(url, body), bodies))
        for status, answer, _ in answers[:2]:
            assert status == 500 and "model call" in answer["error"] and "RuntimeError" in answer["error"], answer
        assert answers[2][0] == 200  # another group of the same batch went on
        status, _, _ = post(url, dict(model="digits-unet", label=5, steps=3))
        assert status == 200  # and so does the replica
        assert health(url)["failed_calls"] >= 1
    finally:
        stop()


def send_and_hang_up(url: str, body: dict) -> None:
    """A client that sends its request and disconnects without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        head = f"POST /v1/images HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        s.sendall(head.encode() + data)
        time.sleep(0.3)


def test_a_client_that_disconnects_leaks_no_work():
    url = start({"digits-dit": "embedded"}, Limits(max_steps=200, max_batch_size=1, batch_wait_ms=0.0), port=free_port())
    try:
        long = dict(model="digits-dit", label=1, steps=200)  # seconds: the hang-ups arrive while it runs
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, url, long)
            time.sleep(1.0)  # the long request is running; these wait behind it, then hang up
            for seed in range(3):
                send_and_hang_up(url, dict(long, seed=seed + 1, steps=10))
            status, _, _ = first.result(timeout=300)
        assert status == 200
        deadline = time.monotonic() + 30
        while (state := health(url))["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert state["in_flight"] == 0 and state["cancelled"] == 3
        assert state["images"] == 1  # the three never ran
    finally:
        stop()


def test_a_replica_killed_mid_batch_is_restarted_and_no_request_hangs():
    url = start({"digits-dit": "embedded"}, Limits(max_steps=200, max_batch_size=4, batch_wait_ms=50.0), port=free_port())
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, url, dict(model="digits-dit", label=d, steps=200), 180) for d in range(4)]
            time.sleep(2.0)  # the batch is running
            replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
            assert len(replicas) == 1
            ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
            statuses = [f.result(timeout=200)[0] for f in futures]  # a hang fails here
        assert all(status == 200 or status >= 500 for status in statuses), statuses
        assert any(status >= 500 for status in statuses)  # the killed batch answered with an error
        wait_healthy(url)
        status, _, _ = post(url, dict(model="digits-dit", label=2, steps=3), 120)
        assert status == 200  # the restarted replica serves
    finally:
        stop()


def ray_processes() -> set:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]) for line in out.splitlines() if "ray" in line.split(None, 1)[-1]}


def listening_sockets(session: int) -> list:
    """(address, port, process name) of every TCP socket listening in the processes of `session`,
    read from /proc (the kernel's tables, whatever tool is installed)."""
    owners = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != session:
                continue
            name = open(f"/proc/{pid}/comm").read().strip()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owners[target[8:-1]] = name
        except OSError:
            continue  # a process that ended meanwhile
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in owners:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            host = socket.inet_ntop(socket.AF_INET if width == 4 else socket.AF_INET6, raw)
            found.append((host, int(port, 16), owners[fields[9]]))
    return found


@pytest.mark.parametrize("target, signum", [("group", signal.SIGTERM), ("main", signal.SIGTERM), ("main", signal.SIGINT)])
def test_the_cli_serves_and_stops_within_10_s_however_signalled(target, signum):
    port = free_port()
    before = ray_processes()
    cmd = [sys.executable, "-m", "sagfast.cli", "serve", "--port", str(port), "--max-steps", "12", "--max-batch-size", "4"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO)
    lines = []
    try:
        ready = threading.Event()

        def read():
            for line in server.stdout:
                lines.append(line)
                if "sagfast serving" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(180), "".join(lines[-40:])
        url = f"http://127.0.0.1:{port}"
        assert f"at {url}" in "".join(lines)
        curl = subprocess.run(
            [
                "curl",
                "-s",
                "-X",
                "POST",
                f"{url}/v1/images",
                "-H",
                "Content-Type: application/json",
                "-d",
                '{"model": "digits-unet", "label": 7, "steps": 4}',
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        answer = answer_of(curl.stdout.encode())
        assert answer.get("batch_size") == 1 and decode_png(answer["image"]).shape == (32, 32), curl.stdout[:500]
        assert np.asarray(decode_png(answer["image"])).max() > 0
        if target == "group":
            # What listens where (docs/serving.md): the API on the host asked for alone, no dashboard,
            # Ray's own servers on loopback; the one exception is Serve's replica, whose inter-deployment
            # gRPC port Ray Serve binds on every interface, whatever the node's address (token-checked).
            sockets = listening_sockets(server.pid)
            assert {host for host, p, _ in sockets if p == port} == {"127.0.0.1"}, sockets
            assert not [s for s in sockets if s[1] == 8265], sockets  # Ray's dashboard is off
            loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
            outside = [s for s in sockets if s[0] not in loopback]
            assert len(sockets) > 5 and [name for _, _, name in outside] == ["ray::ServeRepli"], sockets
    finally:
        signalled = time.monotonic()
        if target == "group":
            os.killpg(server.pid, signum)
        else:
            server.send_signal(signum)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        took = time.monotonic() - signalled
    assert server.returncode == 0 and took < 10.0, (took, "".join(lines[-40:]))
    deadline = time.monotonic() + 10.0
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    left = ray_processes() - before
    assert not left, subprocess.run(["ps", "-o", "pid,args", "-p", ",".join(map(str, left))], capture_output=True, text=True).stdout
