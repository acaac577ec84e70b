"""The serving pieces that need no Ray: the support-set store, upload checks, RLE, the lazy import."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hsnet_deploy.serve import uploads
from hsnet_deploy.serve.store import SetNotFound, SupportSet, SupportSetStore

LIMITS = uploads.Limits(max_upload_bytes=1 << 20, max_pixels=200_000, max_shots=3)


@pytest.fixture(autouse=True)
def process_pixel_limit_restored(monkeypatch):
    """An upload sets the process's decode limit to the server's: put it back for the tests that follow."""
    from hsnet_deploy.data import preprocess

    monkeypatch.setitem(preprocess._limits, "max_pixels", preprocess.max_pixels())


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def a_set(k: int = 1, size: int = 8) -> SupportSet:
    return SupportSet(np.zeros((k, 3, size, size), np.float32), np.zeros((k, size, size), np.float32))


def test_store_evicts_least_recently_used_by_count():
    store = SupportSetStore(max_sets=2, max_bytes=1 << 30)
    a, b = store.add(a_set()), store.add(a_set())
    store.get(a)  # a is now the most recently used: b goes first
    c = store.add(a_set())
    with pytest.raises(SetNotFound) as info:
        store.get(b)
    assert info.value.evicted and "evicted" in str(info.value)
    assert store.get(a) is not None and store.get(c) is not None
    with pytest.raises(SetNotFound) as info:
        store.get("never-registered")
    assert not info.value.evicted and "unknown" in str(info.value)
    assert store.stats()["sets"] == 2 and store.stats()["evictions"] == 1


def test_store_bounded_in_bytes():
    one = a_set(k=2).nbytes
    store = SupportSetStore(max_sets=100, max_bytes=int(2.5 * one))
    ids = [store.add(a_set(k=2)) for _ in range(5)]
    stats = store.stats()
    assert stats["sets"] == 2 and stats["bytes"] == 2 * one <= store.max_bytes
    assert [i for i in ids if i in store._sets] == ids[-2:]
    with pytest.raises(ValueError, match="more than the store"):
        SupportSetStore(max_sets=1, max_bytes=one - 1).add(a_set(k=2))


def test_rle_round_trip_and_coco_order():
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.ones((3, 4)), np.zeros((2, 2)), np.eye(4)):
        mask = mask.astype(np.uint8)
        encoded = uploads.rle(mask)
        assert sum(encoded["counts"]) == mask.size and encoded["size"] == list(mask.shape)
        np.testing.assert_array_equal(uploads.rle_decode(encoded), mask)
    # column-major, background first: [[0, 1], [0, 1]] -> two background pixels (column 0), then two foreground
    assert uploads.rle(np.array([[0, 1], [0, 1]], np.uint8))["counts"] == [2, 2]
    assert uploads.rle(np.array([[1, 0], [1, 0]], np.uint8))["counts"] == [0, 2, 2]


def test_uploads_refuse_with_status():
    img = png(np.full((20, 30, 3), 100, np.uint8))
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:20] = 255
    cases = [
        (([b"not an image"], [png(mask)]), 400, "image 1: cannot read"),
        (([img], [png(np.zeros((21, 30), np.uint8))]), 400, "mask 1 is 30x21 but image 1 is 30x20"),
        (([img] * 4, [png(mask)] * 4), 400, "K = 4"),
        (([img], []), 400, "1 `image` fields but 0 `mask`"),
        (([png(np.zeros((500, 500, 3), np.uint8))], [png(np.zeros((500, 500), np.uint8))]), 413, "250000 pixels"),
        (([img], [png(np.full((20, 30), 7, np.uint8))]), 400, "mask values go up to 7"),
    ]
    for (images, masks), status, text in cases:
        with pytest.raises(uploads.RequestError) as info:
            uploads.support_set(images, masks, 16, LIMITS)
        assert info.value.status == status and text in info.value.message, info.value.message
    support, empty = uploads.support_set([img, img], [png(mask), png(np.zeros((20, 30), np.uint8))], 16, LIMITS)
    assert support.images.shape == (2, 3, 16, 16) and support.masks.shape == (2, 16, 16) and empty == [2]


def test_uploads_within_the_servers_pixel_limit_pass_whatever_the_process_limit_was(monkeypatch):
    """The ingress actor kept preprocess's CLI default (40 MP), so an image under the server's --max-pixels was
    refused with 400 and CLI advice; the server's limit now governs its readers."""
    from hsnet_deploy.data import preprocess

    monkeypatch.setitem(preprocess._limits, "max_pixels", 100)  # a process limit far below the server's
    img = png(np.full((20, 30, 3), 100, np.uint8))  # 600 pixels: over 100, within LIMITS' 200,000
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:20] = 255
    support, _ = uploads.support_set([img], [png(mask)], 16, LIMITS)
    assert support.images.shape == (1, 3, 16, 16)
    assert uploads.query(img, 16, LIMITS)[0].shape == (3, 16, 16)


def test_replicas_that_cannot_be_placed_are_refused_on_a_local_ray():
    """Ray Serve waits for ever, silently, for CPUs or GPUs nobody will add: a local Ray refuses now, a cluster
    (whose autoscaler may add nodes) gets a note."""
    from hsnet_deploy.errors import UserError
    from hsnet_deploy.serve.launch import check_resources

    two_cpus = {"CPU": 2.0, "memory": 1e9}
    assert check_resources(two_cpus, replicas=2, cpus=1, gpus_per_replica=0, local=True) is None
    with pytest.raises(UserError, match="--replicas 3 x 1 CPU each .--threads. needs 3 CPUs; this machine has 2"):
        check_resources(two_cpus, replicas=3, cpus=1, gpus_per_replica=0, local=True)
    with pytest.raises(UserError, match="--replicas 1 x 4 CPU each .--threads. needs 4 CPUs"):
        check_resources(two_cpus, replicas=1, cpus=4, gpus_per_replica=0, local=True)
    with pytest.raises(UserError, match="--gpus-per-replica 1 needs 1 GPUs; this machine has 0"):
        check_resources(two_cpus, replicas=1, cpus=1, gpus_per_replica=1, local=True)
    note = check_resources(two_cpus, replicas=3, cpus=1, gpus_per_replica=0, local=False)
    assert "the cluster has 2" in note and "start once the cluster has them" in note
    assert check_resources({"CPU": 8, "GPU": 1}, replicas=4, cpus=2, gpus_per_replica=0.25, local=True) is None


def test_serve_on_cuda_without_cuda_is_refused_before_ray_starts(exported, monkeypatch):
    from conftest import run_cli

    from hsnet_deploy.serve import launch

    monkeypatch.setattr("hsnet_deploy.runtime.ort_runner.available_providers", lambda: ["CPUExecutionProvider"])
    started = []
    monkeypatch.setattr(launch, "run_service", lambda *a, **k: started.append(a))
    model = exported("resnet50")[0]
    code, _, err = run_cli("serve", str(model), "--device", "cuda")
    assert code == 2 and "--device cuda, but ONNX Runtime has no CUDA provider here" in err and not started


def test_cli_and_help_work_without_ray():
    """`import hsnet_deploy`, `--help` and `serve --help` never import Ray; `serve` without it says how to
    install it (exit 2), and triton-repo needs neither Ray nor Triton."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from click.testing import CliRunner\n"
        "import hsnet_deploy, hsnet_deploy.cli as c\n"
        "r = CliRunner().invoke(c.cli, ['--help']); assert r.exit_code == 0 and 'serve' in r.output, r.output\n"
        "r = CliRunner().invoke(c.cli, ['serve', '--help']); assert r.exit_code == 0 and '--replicas' in r.output\n"
        "assert 'ray' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_without_ray_is_an_error(tmp_path):
    from hsnet_deploy.serve.launch import import_ray

    code = ("import sys; sys.modules['ray'] = None\n"
            "from hsnet_deploy.serve.launch import import_ray\n"
            "try:\n    import_ray()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("UserError") and 'pip install -e ".[serve]"' in out
    assert callable(import_ray)


def test_port_in_use_is_refused_before_ray_starts():
    import socket

    from hsnet_deploy.errors import UserError
    from hsnet_deploy.serve.launch import check_port_free

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"--port {port}: cannot listen there"):
            check_port_free("127.0.0.1", port)


def test_an_address_where_nothing_answers_is_refused_before_ray_waits_on_it():
    """Ray's client retries an unreachable cluster for minutes with no error; the address is tried first."""
    import socket

    from hsnet_deploy.errors import UserError
    from hsnet_deploy.serve.launch import check_address

    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        port = head.getsockname()[1]
        check_address(f"127.0.0.1:{port}")  # something answers: Ray takes it from here
        check_address(f"ray://127.0.0.1:{port}")
    with pytest.raises(UserError, match=f"--address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}"):
        check_address(f"127.0.0.1:{port}")
    check_address("auto")  # Ray finds that one itself


def test_uploads_turn_phone_photos_by_their_exif_orientation():
    """A query stored 30x20 with EXIF orientation 6 is answered at 20x30 (as viewers show it); a support mask fits
    its turned photo either as shown or at the stored size (turned with it), like `predict`."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(buf, format="JPEG", exif=exif.tobytes())
    photo = buf.getvalue()
    _q, height, width = uploads.query(photo, 16, LIMITS)
    assert (height, width) == (30, 20)
    as_shown = np.zeros((30, 20), np.uint8)
    as_shown[:10] = 255
    on_stored = np.zeros((20, 30), np.uint8)
    on_stored[:, :10] = 255  # the stored left third: the top third once turned clockwise
    shown_set, _ = uploads.support_set([photo], [png(as_shown)], 16, LIMITS)
    stored_set, _ = uploads.support_set([photo], [png(on_stored)], 16, LIMITS)
    np.testing.assert_array_equal(shown_set.masks, stored_set.masks)
    with pytest.raises(uploads.RequestError) as info:
        uploads.support_set([photo], [png(np.zeros((25, 25), np.uint8))], 16, LIMITS)
    assert "mask 1 is 25x25 but image 1 is 20x30 as shown (EXIF orientation)" in info.value.message


class _FakeRay:
    """`ray` and `ray.serve` for run_service: ray.init puts its own SIGTERM handler in place, as Ray's core worker
    does; serve.run records the handlers in force and may raise; shutdown records SIGINT's handler then."""

    def __init__(self, run_raises=None):
        import types

        self.run_raises, self.seen = run_raises, {}
        self.serve = types.SimpleNamespace(start=lambda **_kw: None, run=self._run, shutdown=self._shutdown,
                                           delete=lambda _name: None)

    def init(self, **_kw):
        import signal
        import types

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stands for Ray's C-level handler (dump and abort)
        return types.SimpleNamespace(address_info={"gcs_address": "127.0.0.1:1"})

    def cluster_resources(self):
        return {"CPU": 2.0}

    def _run(self, *_args, **_kw):
        import signal

        self.seen["sigterm_while_serving"] = signal.getsignal(signal.SIGTERM)
        if self.run_raises:
            raise self.run_raises

    def _shutdown(self):
        import signal
        import threading

        self.seen["sigint_while_stopping"] = signal.getsignal(signal.SIGINT)
        # as Ray's error-listener thread does while Serve stops: its report of the controller it just killed
        printer = threading.Thread(target=lambda: print(
            "(raylet) Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the "
            "task will be retried. Error: The actor is dead because it was killed by `ray.kill`.\n"
            "(raylet) something else went wrong"))
        printer.start()
        printer.join()

    def shutdown(self):
        self.seen["ray_shutdown"] = True


def _run_with_fake_ray(monkeypatch, fake, **kwargs):
    import signal
    import types

    from hsnet_deploy.serve import launch

    monkeypatch.setattr(launch, "import_ray", lambda: (fake, fake.serve))
    monkeypatch.setitem(sys.modules, "multipart", types.ModuleType("multipart"))
    monkeypatch.setitem(sys.modules, "hsnet_deploy.serve.app", types.SimpleNamespace(build_app=lambda *a: "app"))
    monkeypatch.setattr(launch, "check_port_free", lambda *_a: None)
    config = types.SimpleNamespace(threads=None, artifact="m.onnx", max_batch=8)

    def python_handler(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, python_handler)
    try:
        launch.run_service(config, host="127.0.0.1", port=1, replicas=1, gpus_per_replica=0, address=None,
                           say=lambda _m: None, **kwargs)
    finally:
        after = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)
    return python_handler, after


def test_serve_keeps_the_python_sigterm_handler_over_rays(monkeypatch, capsys):
    """Ray's core worker replaced the entry point's SIGTERM handler, so SIGTERM aborted the service (exit 134, a
    stack dump) instead of stopping it (143): run_service puts the Python handler back after ray.init.
    Ray's report of the controller that serve.shutdown kills (printed on stdout at every stop) is dropped; any
    other line Ray prints meanwhile goes to stderr."""
    fake = _FakeRay()
    python_handler, after = _run_with_fake_ray(monkeypatch, fake, stop_after_s=0.01)
    assert fake.seen["sigterm_while_serving"] is python_handler and after is python_handler
    assert fake.seen["ray_shutdown"]
    captured = capsys.readouterr()
    assert captured.out == "" and "graceful_shutdown" not in captured.err
    assert "(raylet) something else went wrong" in captured.err


def test_serve_stopped_by_an_interrupt_stops_ray_then_passes_it_on(monkeypatch):
    """Ctrl-C (and SIGTERM, raised as an interrupt) used to end `serve` with exit 0; now the service is shut down,
    with a second Ctrl-C ignored meanwhile, and the interrupt reaches the entry point (exit 130 / 143)."""
    import signal

    fake = _FakeRay(run_raises=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _run_with_fake_ray(monkeypatch, fake)
    assert fake.seen["sigint_while_stopping"] is signal.SIG_IGN and fake.seen["ray_shutdown"]
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN


def test_an_interrupt_before_sigint_is_ignored_does_not_skip_the_stop(monkeypatch):
    """A second SIGINT landing before the stop has set SIGINT aside (pkill reaching both `timeout` and its child)
    raised out of the stop before anything was shut down; the stop now starts again and completes."""
    import contextlib

    from hsnet_deploy.serve import launch

    calls = {"entered": 0}
    real = launch.interrupts_ignored

    @contextlib.contextmanager
    def interrupted_once():
        calls["entered"] += 1
        if calls["entered"] == 1:
            raise KeyboardInterrupt  # the second signal, before SIG_IGN is in place
        with real():
            yield

    monkeypatch.setattr(launch, "interrupts_ignored", interrupted_once)
    fake = _FakeRay(run_raises=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _run_with_fake_ray(monkeypatch, fake)
    assert calls["entered"] == 2 and fake.seen["ray_shutdown"] and "sigint_while_stopping" in fake.seen


def test_uploads_at_the_servers_limits_pass():
    """K equal to --max-shots and an image of exactly --max-pixels are within the limits, not over them."""
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:20] = 255
    img = png(np.full((20, 30, 3), 100, np.uint8))
    support, empty = uploads.support_set([img] * 3, [png(mask)] * 3, 16, LIMITS)  # K = 3 = LIMITS.max_shots
    assert support.shots == 3 and empty == []
    exact = png(np.full((400, 500, 3), 100, np.uint8))  # 500 x 400 = 200,000 = LIMITS.max_pixels
    exact_mask = np.zeros((400, 500), np.uint8)
    exact_mask[100:300, 100:400] = 255
    support, _ = uploads.support_set([exact], [png(exact_mask)], 16, LIMITS)
    assert support.images.shape == (1, 3, 16, 16)
    assert uploads.query(exact, 16, LIMITS)[1:] == (400, 500)


def test_uploads_name_an_empty_file_and_refuse_a_decompression_bomb_with_413(monkeypatch):
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:20] = 255
    img = png(np.full((20, 30, 3), 100, np.uint8))
    for call, status, text in [
        (lambda: uploads.support_set([b""], [png(mask)], 16, LIMITS), 400, "image 1: empty file"),
        (lambda: uploads.support_set([img], [b""], 16, LIMITS), 400, "mask 1: empty file"),
        (lambda: uploads.query(b"", 16, LIMITS), 400, "image: empty file"),
    ]:
        with pytest.raises(uploads.RequestError) as info:
            call()
        assert info.value.status == status and info.value.message == text, info.value.message
    # Pillow refuses to open an image of over twice MAX_IMAGE_PIXELS: 600 pixels against a limit of 2 x 100
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(uploads.RequestError) as info:
        uploads.query(img, 16, LIMITS)
    assert info.value.status == 413 and "image: image over Pillow's decompression-bomb limit" in info.value.message


def test_mask_json_gives_the_fraction_of_foreground_pixels():
    mask = np.zeros((4, 6), np.uint8)
    mask[1:3, 2:5] = 1  # 6 of 24 pixels
    encoded = uploads.mask_json(mask)
    assert (encoded["height"], encoded["width"]) == (4, 6)
    assert encoded["foreground_fraction"] == pytest.approx(0.25)
    # column-major, background first: 9 (columns 0-1 and the top of column 2), then in columns 2-4 two foreground
    # and two background (a column's bottom and the next one's top), and column 4's bottom with column 5: 5
    assert encoded["rle"]["counts"] == [9, 2, 2, 2, 2, 2, 5]
    assert uploads.mask_json(np.zeros((0, 0), np.uint8))["foreground_fraction"] == 0.0
