"""`hsnet-deploy serve` end to end on a local Ray cluster: a real HTTP client against the CLI's service.

One Ray instance and one service for the module (Ray's start-up dominates): the test process starts Ray,
the CLI joins it with --address (the cluster path), listens on 127.0.0.1 only, and the tests kill a model
replica through the same cluster. Every request loop is bounded in requests and time.
"""

import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve_units import png

ray = pytest.importorskip("ray", reason="Ray Serve is the `serve` extra: pip install -e '.[serve]'")
requests = pytest.importorskip("requests", reason="the HTTP client of these tests")
pytest.importorskip("multipart", reason="Starlette's form parser: pip install python-multipart")

from hsnet_deploy.serve.uploads import rle_decode

ROOT = Path(__file__).resolve().parents[1]
MAX_SHOTS, MAX_SETS, MAX_UPLOAD_MB, MAX_PIXELS = 3, 4, 1, 200_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Query and support images of different sizes (not the model's 64), masks as 0/255 PNGs."""
    folder = tmp_path_factory.mktemp("serve-files")
    rng = np.random.default_rng(0)
    paths = {}
    for i, (w, h) in enumerate([(80, 60), (100, 90), (70, 70), (90, 50)]):
        yy, xx = np.mgrid[:h, :w]
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        fg = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 <= 1
        img[fg] = (img[fg] // 4 + np.array([180, 60, 40])).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
        Image.fromarray(fg.astype(np.uint8) * 255).save(folder / f"mask{i}.png")
        paths[i] = (folder / f"img{i}.png", folder / f"mask{i}.png")
    return paths


@pytest.fixture(scope="module")
def service(exported, tmp_path_factory):
    """(base URL, artifact path): the CLI serving the 64x64 export, joined to this process's Ray cluster."""
    artifact = exported("resnet50")[0]
    context = ray.init(num_cpus=4, include_dashboard=False, logging_level="warning", log_to_driver=False)
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "hsnet_deploy", "serve", str(artifact), "--host", "127.0.0.1", "--port", str(port),
           "--address", context.address_info["gcs_address"], "--max-batch", "4", "--batch-wait-ms", "50",
           "--max-shots", str(MAX_SHOTS), "--max-sets", str(MAX_SETS), "--max-upload-mb", str(MAX_UPLOAD_MB),
           "--max-pixels", str(MAX_PIXELS), "--threads", "1"]
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the application still deploying
                pass
            time.sleep(1)
        else:
            pytest.fail(f"serve did not answer /health within 240 s:\n{log.read_text()[-3000:]}")
        yield url, artifact
    finally:
        proc.send_signal(2)  # SIGINT: the CLI removes its application from the cluster
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        ray.shutdown()
    assert proc.returncode == 130, f"serve stopped by Ctrl-C exited {proc.returncode}:\n{log.read_text()[-3000:]}"


def register(url, pairs) -> requests.Response:
    fields = []
    for img, mask in pairs:
        fields += [("image", (Path(img).name, Path(img).read_bytes(), "image/png")),
                   ("mask", (Path(mask).name, Path(mask).read_bytes(), "image/png"))]
    return requests.post(f"{url}/support-sets", files=fields, timeout=60)


def segment(url, set_id, image: bytes, fmt: str | None = None, timeout: float = 120) -> requests.Response:
    params = {"format": fmt} if fmt else None
    return requests.post(f"{url}/segment", params=params, files={"image": ("q.png", image, "image/png")},
                         data={"support_set": set_id}, timeout=timeout)


def png_mask(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.array(Image.open(io.BytesIO(response.content)))


@pytest.fixture(scope="module")
def predicted(service, files, tmp_path_factory):
    """`predict`'s masks (the CLI, in this process) for queries 2 and 3 against 1-shot and 2-shot sets."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("predict")
    masks = {}
    for shots in (1, 2):
        support_args = [a for i in range(shots) for a in ("--support", str(files[i][0]), str(files[i][1]))]
        for q in (2, 3):
            code, _, err = run_cli("predict", str(service[1]), "--query", str(files[q][0]), *support_args,
                                   "--device", "cpu", "-o", str(out / f"k{shots}-q{q}.png"))
            assert code == 0, err
            masks[shots, q] = np.array(Image.open(out / f"k{shots}-q{q}.png"))
    return masks


def test_health_and_info(service):
    url, _artifact = service
    assert requests.get(f"{url}/health", timeout=30).json()["status"] == "ok"
    info = requests.get(f"{url}/info", timeout=30).json()
    assert info["backend"] == "onnxruntime" and info["precision"] == "fp32" and info["img_size"] == 64
    assert info["metadata"]["backbone"] == "resnet50"
    assert info["batching"]["max_batch"] == 4 and info["limits"]["max_shots"] == MAX_SHOTS
    assert info["store"]["max_sets"] == MAX_SETS and "mb" in info["store"]


def test_segment_equals_predict(service, files, predicted):
    url = service[0]
    for shots in (1, 2):
        reply = register(url, [files[i] for i in range(shots)])
        assert reply.status_code == 201, reply.text
        set_id = reply.json()["id"]
        assert reply.json()["shots"] == shots
        for q in (2, 3):
            image = files[q][0].read_bytes()
            mask = png_mask(segment(url, set_id, image))
            expected = predicted[shots, q]
            assert mask.shape == expected.shape == Image.open(files[q][0]).size[::-1]
            np.testing.assert_array_equal(mask, expected)
            assert 0 < (mask > 0).mean() < 1  # a non-trivial mask, so the comparison means something
            as_json = segment(url, set_id, image, "json").json()
            assert (as_json["height"], as_json["width"]) == expected.shape
            np.testing.assert_array_equal(rle_decode(as_json["rle"]) * 255, expected)
            assert as_json["foreground_fraction"] == pytest.approx((expected > 0).mean())


def test_concurrent_requests_batched_per_shots(service, files, predicted):
    """Concurrent 1-shot and 2-shot queries (grouped by K inside a batch), with bad requests among them:
    every good request gets predict's mask, every bad one its own error."""
    from ray import serve

    url = service[0]
    ids = {k: register(url, [files[i] for i in range(k)]).json()["id"] for k in (1, 2)}
    handle = serve.get_deployment_handle("HSNetModel", app_name="hsnet")
    before = handle.replica.remote().result(timeout_s=60)
    jobs = [("good", k, q) for k in (1, 2) for q in (2, 3)] * 2 + [("bad-image", 1, 2), ("bad-id", 2, 3)] * 2
    results = [None] * len(jobs)

    def run(i, job):
        kind, k, q = job
        image = b"\x89PNG broken" if kind == "bad-image" else files[q][0].read_bytes()
        results[i] = segment(url, "no-such-set" if kind == "bad-id" else ids[k], image)

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    for (kind, k, q), reply in zip(jobs, results, strict=True):
        assert reply is not None
        if kind == "good":
            np.testing.assert_array_equal(png_mask(reply), predicted[k, q])
        else:
            assert reply.status_code == (400 if kind == "bad-image" else 404)
            assert "error" in reply.json()
    after = handle.replica.remote().result(timeout_s=60)
    episodes, calls = after["episodes"] - before["episodes"], after["runner_calls"] - before["runner_calls"]
    assert episodes == 8 and calls < episodes, (episodes, calls)  # only good requests reach the model, batched


def test_bad_requests_get_status_and_json_error(service, files):
    url = service[0]
    img, _mask = files[0]
    ok_id = register(url, [files[0]]).json()["id"]

    def expect(reply, status, text):
        assert reply.status_code == status, reply.text
        assert reply.headers["content-type"].startswith("application/json")
        assert text in reply.json()["error"], reply.json()

    expect(segment(url, ok_id, b"definitely not an image"), 400, "cannot read")
    expect(register(url, [(img, files[1][1])]), 400, "mask 1 is 100x90 but image 1 is 80x60")
    expect(register(url, [files[0]] * (MAX_SHOTS + 1)), 400, f"K = {MAX_SHOTS + 1}")
    expect(segment(url, "0123456789abcdef", img.read_bytes()), 404, "unknown support set")
    big = np.random.default_rng(1).integers(0, 255, (700, 700, 3), dtype=np.uint8)  # ~1.5 MB as PNG
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    assert len(buf.getvalue()) > MAX_UPLOAD_MB * 2**20
    expect(segment(url, ok_id, buf.getvalue()), 413, "over the server's limit")
    buf = io.BytesIO()
    Image.new("RGB", (600, 400)).save(buf, format="PNG")  # small file, 240000 pixels
    expect(segment(url, ok_id, buf.getvalue()), 413, "240000 pixels")
    expect(requests.post(f"{url}/segment", files={"image": ("q.png", img.read_bytes())}, timeout=30), 400,
           "support_set")
    expect(requests.post(f"{url}/segment", data={"x": "1"}, timeout=30), 400, "support_set")
    expect(segment(url, ok_id, img.read_bytes(), "gif"), 400, "format='gif'")
    two_images = [("image", ("a.png", img.read_bytes(), "image/png")), ("image", ("b.png", img.read_bytes(), "image/png"))]
    expect(requests.post(f"{url}/segment", files=two_images, data={"support_set": ok_id}, timeout=30), 400,
           "2 `image` fields")
    expect(requests.get(f"{url}/nowhere", timeout=30), 404, "Not Found")
    # the service is unharmed
    assert segment(url, ok_id, img.read_bytes()).status_code == 200


def test_lru_eviction_is_a_404_that_says_so(service, files):
    url = service[0]
    first = register(url, [files[0]]).json()["id"]
    for _ in range(MAX_SETS):
        assert register(url, [files[1]]).status_code == 201
    reply = segment(url, first, files[2][0].read_bytes())
    assert reply.status_code == 404 and "evicted" in reply.json()["error"]
    store = requests.get(f"{url}/info", timeout=30).json()["store"]
    assert store["sets"] == MAX_SETS and store["evictions"] >= 1


def test_killed_replica_is_replaced_and_no_wrong_answer(service, files, predicted):
    """Queries stream while the model replica is killed: each answer is predict's mask or a retriable 503,
    and the service answers again once Ray Serve has started a new replica."""
    from ray import serve

    url = service[0]
    set_id = register(url, [files[0]]).json()["id"]
    expected = predicted[1, 2]
    image = files[2][0].read_bytes()
    replies, stop = [], threading.Event()

    def client():
        deadline = time.monotonic() + 120
        for _ in range(60):  # bounded in requests and time
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                replies.append(segment(url, set_id, image, timeout=60))
            except requests.RequestException as exc:  # a dropped connection is no answer at all, never a wrong one
                replies.append(exc)

    handle = serve.get_deployment_handle("HSNetModel", app_name="hsnet")

    def replica() -> dict | None:
        try:
            return handle.replica.remote().result(timeout_s=10)
        except Exception:  # noqa: BLE001 - none alive yet
            return None

    before = replica()
    assert before is not None
    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    flowing = time.monotonic() + 60
    while not replies and time.monotonic() < flowing:  # kill once answers flow: requests are then in flight
        time.sleep(0.1)
    time.sleep(0.3)
    ray.kill(ray.get_actor(before["actor_name"], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = replica()
        if now is not None and now["actor_id"] != before["actor_id"]:
            break
        time.sleep(1)
    else:
        pytest.fail("Ray Serve did not start a new replica within 180 s")
    recovered = None
    while time.monotonic() < deadline:
        reply = segment(url, set_id, image)
        if reply.status_code == 200:
            recovered = reply
            break
        assert reply.status_code == 503 and reply.headers.get("Retry-After"), reply.text
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert recovered is not None, "the service did not answer after the replica was replaced"
    np.testing.assert_array_equal(png_mask(recovered), expected)
    answered = [r for r in replies if not isinstance(r, Exception)]
    assert answered
    print("statuses while the replica was killed:", sorted(r.status_code for r in answered),
          "dropped:", len(replies) - len(answered))
    for reply in answered:
        if reply.status_code == 200:
            np.testing.assert_array_equal(png_mask(reply), expected)
        else:
            assert reply.status_code == 503 and reply.headers.get("Retry-After"), (reply.status_code, reply.text)
            assert "retry" in reply.json()["error"]


def test_a_batch_runs_one_call_per_k_and_a_failed_call_is_retried_per_episode():
    """The model replica's batch step without Ray running: episodes of K = 1 and 2 interleaved make two runner calls
    (B = 3 with K = 1, B = 2 with K = 2), each episode's mask comes back at its own size; when a call fails, each of
    its episodes runs alone, so only the bad one reports an error."""
    from hsnet_deploy.serve.app import Episode, HSNetModel

    size = 8

    class FakeRunner:
        """Foreground where the query's first channel is positive; a NaN query fails the whole call."""

        def __init__(self):
            self.shapes = []

        def infer(self, feed):
            b, k = feed["support_imgs"].shape[:2]
            self.shapes.append((b, k))
            if np.isnan(feed["query_img"]).any():
                raise ValueError("NaN query")
            fg = (feed["query_img"][:, 0] > 0).astype(np.float32)  # (B, S, S)
            logits = np.stack([1 - fg, fg], axis=1)[:, None].repeat(k, axis=1)  # (B, K, 2, S, S)
            return {"logits": logits}

    def episode(k, sign, height=16, width=12):
        query = np.full((3, size, size), sign, dtype=np.float32)
        return Episode(query, np.zeros((k, 3, size, size), np.float32), np.ones((k, size, size), np.float32),
                       height, width)

    model = object.__new__(HSNetModel.func_or_class)
    model.runner, model.calls, model.episodes = FakeRunner(), 0, 0
    shots = [1, 2, 1, 2, 1]
    signs = [1.0, -1.0, -1.0, 1.0, 1.0]
    results = model._run_batch([episode(k, s) for k, s in zip(shots, signs)])
    assert sorted(model.runner.shapes) == [(2, 2), (3, 1)] and model.calls == 2 and model.episodes == 5
    for (status, mask), sign in zip(results, signs):
        assert status == "ok" and mask.shape == (16, 12) and (mask == (1 if sign > 0 else 0)).all()

    model.runner.shapes.clear()
    bad = episode(1, float("nan"))
    results = model._run_batch([episode(1, 1.0), bad, episode(1, -1.0)])
    assert model.runner.shapes == [(3, 1), (1, 1), (1, 1), (1, 1)]  # the batch, then each episode alone
    assert [r[0] for r in results] == ["ok", "error", "ok"] and "NaN query" in results[1][1]
    assert results[0][1].all() and not results[2][1].any()


# The HTTP ingress without Ray: HSNetAPI's handlers called on a hand-made Starlette request, a stand-in model
# (describe / segment / replica answer as the deployment handle's `.remote()` does, awaitable).


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)

        return call()


class _FakeModel:
    def __init__(self, answer, max_shots=MAX_SHOTS, img_size=16):
        facts = {"backend": "onnxruntime", "device": "cpu", "precision": "fp32", "img_size": img_size,
                 "max_batch": 4, "max_shots": max_shots, "metadata": {}}
        self.describe = _Remote(lambda: facts)
        self.replica = _Remote(dict)
        self.episodes = []

        def segment(episode):
            self.episodes.append(episode)
            return answer(episode)

        self.segment = _Remote(segment)


def _ingress(answer=lambda ep: ("ok", np.zeros((ep.height, ep.width), np.uint8)), **config):
    from hsnet_deploy.serve.app import HSNetAPI
    from hsnet_deploy.serve.config import ServeConfig

    # the class as written, under serve.ingress's wrapper (whose ASGI set-up and async __del__ need Ray running)
    user_class = next(c for c in HSNetAPI.func_or_class.__mro__[1:] if c.__name__ == "HSNetAPI")
    api = object.__new__(user_class)
    user_class.__init__(api, _FakeModel(answer), ServeConfig("m.onnx", **{"max_shots": MAX_SHOTS, **config}))
    return api


def _request(path: str, fields: list, content_length: bool = True, chunk: int = 1024):
    """A multipart POST: `fields` are (name, str) form fields or (name, bytes) file fields, in order; without
    `content_length` the body streams in chunks with no Content-Length header (as a chunked upload)."""
    from starlette.requests import Request

    boundary = "hsnet-test-boundary"
    body = b""
    for i, (name, value) in enumerate(fields):
        if isinstance(value, bytes):
            head = f'Content-Disposition: form-data; name="{name}"; filename="f{i}.png"\r\nContent-Type: image/png'
        else:
            head, value = f'Content-Disposition: form-data; name="{name}"', value.encode()
        body += f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
    if content_length:
        headers.append((b"content-length", str(len(body)).encode()))
    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]

    async def receive():
        piece = pieces.pop(0) if pieces else b""
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b"",
             "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1), "root_path": ""}
    return Request(scope, receive)


def _reply(response) -> tuple[int, dict]:
    import json

    return response.status_code, json.loads(response.body)


def _a_pair(height=20, width=30, box=True):
    mask = np.zeros((height, width), np.uint8)
    if box:
        mask[5:15, 5:20] = 255
    return png(np.full((height, width, 3), 120, np.uint8)), png(mask)


def test_ingress_register_answers_201_with_the_empty_masks_and_413_when_the_store_cannot_hold_the_set():
    import asyncio

    api = _ingress()
    (img, mask), (_, empty) = _a_pair(), _a_pair(box=False)
    status, body = _reply(asyncio.run(api.register(_request("/support-sets", [
        ("image", img), ("mask", mask), ("image", img), ("mask", empty), ("image", img), ("mask", mask)]))))
    assert status == 201 and body["shots"] == 3 and len(body["id"]) == 32
    assert "masks [2] have no foreground" in body["warning"]  # the second of the three masks is empty
    status, body = _reply(asyncio.run(api.register(_request("/support-sets", [("image", img), ("mask", mask)]))))
    assert status == 201 and "warning" not in body
    # a 1-shot set at S = 16 takes (3 + 1) * 16 * 16 * 4 = 4096 bytes: a 4000-byte store cannot hold one
    tiny = _ingress(max_store_mb=4000 / 2**20)
    status, body = _reply(asyncio.run(tiny.register(_request("/support-sets", [("image", img), ("mask", mask)]))))
    assert status == 413 and "more than the store" in body["error"], body


def test_ingress_refuses_a_streamed_body_over_the_limit_and_two_support_sets():
    import asyncio

    api = _ingress(max_upload_mb=0.01)  # 10485 bytes
    noise = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    big = png(noise)  # ~14 KB: over the limit, sent in 1 KB chunks without a Content-Length
    assert len(big) > 0.01 * 2**20
    request = _request("/segment", [("support_set", "x"), ("image", big)], content_length=False)
    status, body = _reply(asyncio.run(api.segment(request, format="png")))
    assert status == 413 and "over the server's limit of 10485 bytes" in body["error"], body
    img, mask = _a_pair()
    api = _ingress()
    set_id = _reply(asyncio.run(api.register(_request("/support-sets", [("image", img), ("mask", mask)]))))[1]["id"]
    request = _request("/segment", [("support_set", set_id), ("support_set", set_id), ("image", img)])
    status, body = _reply(asyncio.run(api.segment(request, format="png")))
    assert status == 400 and "2 `support_set` fields" in body["error"], body
    assert not api.model.episodes  # refused before the model saw it


def test_ingress_reports_a_failed_episode_as_500_and_a_lost_replica_as_a_retriable_503():
    import asyncio

    img, mask = _a_pair()

    def served(answer, fmt="json"):
        api = _ingress(answer)
        set_id = _reply(asyncio.run(api.register(_request("/support-sets", [("image", img), ("mask", mask)]))))[1]["id"]
        return api, asyncio.run(api.segment(_request("/segment", [("support_set", set_id), ("image", img)]),
                                            format=fmt))

    _, response = served(lambda ep: ("error", "ValueError: NaN query"))
    status, body = _reply(response)
    assert status == 500 and body["error"] == "inference failed: ValueError: NaN query"

    def lost(_ep):
        raise ray.exceptions.ActorUnavailableError("gone", None)

    api, response = served(lost)
    status, body = _reply(response)
    assert status == 503 and response.headers["retry-after"] == "1" and "retry" in body["error"]
    assert api.requests["retriable_503"] == 1
    third = np.zeros((20, 30), np.uint8)
    third[:, :10] = 1  # the left 10 of 30 columns: a third of the pixels, in the first 200 column-major
    _, response = served(lambda ep: ("ok", third))
    status, body = _reply(response)
    assert status == 200 and (body["height"], body["width"]) == (20, 30)
    assert body["foreground_fraction"] == pytest.approx(1 / 3) and body["rle"]["counts"] == [0, 200, 400]


def test_ingress_info_shows_the_configured_limits_and_counts_refusals():
    import asyncio

    api = _ingress(max_upload_mb=3.5, max_pixels=123_456, max_store_mb=64.0)
    img, _mask = _a_pair()
    for _ in range(2):  # three refusals: an unknown set (404) twice, then a missing support_set field (400)
        asyncio.run(api.segment(_request("/segment", [("support_set", "nope"), ("image", img)]), format="png"))
    asyncio.run(api.segment(_request("/segment", [("image", img)]), format="png"))
    info = asyncio.run(api.info())
    assert info["limits"] == {"max_shots": MAX_SHOTS, "max_upload_mb": 3.5, "max_pixels": 123_456}
    assert info["store"]["max_mb"] == 64.0 and info["requests"]["errors_4xx"] == 3
    assert info["requests"]["segment"] == 3


def test_shot_and_batch_limits_are_capped_by_a_plans_profile():
    import types

    from hsnet_deploy.serve.app import batch_limit, shot_limit

    def runner(profile):
        return types.SimpleNamespace(info=types.SimpleNamespace(profile_max=lambda name: profile.get(name)))

    plan = runner({"shots": 5, "batch": 4})
    assert shot_limit(plan, 10) == 5 and shot_limit(plan, 3) == 3
    assert batch_limit(plan, 8) == 4 and batch_limit(plan, 2) == 2
    assert shot_limit(runner({}), 10) == 10 and batch_limit(runner({}), 8) == 8  # no profile: the option
