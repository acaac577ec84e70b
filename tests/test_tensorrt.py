"""TensorRT build and runner: what runs everywhere (lazy imports, refusals, pure checks) and, where a
TensorRT builder and a GPU exist, a real engine compared with ONNX Runtime on the CPU."""

from __future__ import annotations

import enum
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.base import INPUT_NAMES
from hsnet_deploy.runtime.trt_build import build_engine, profile_shapes, read_onnx_spec
from hsnet_deploy.runtime.trt_common import cuda_device_info, sidecar_path, version_tuple
from hsnet_deploy.runtime.trt_runner import TensorRTRunner, check_engine_compatible, check_feed_shapes

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


def _trt_builder_available() -> bool:
    try:
        import tensorrt

        return hasattr(tensorrt, "Builder")
    except Exception:  # noqa: BLE001 - ImportError, OSError from missing libnvinfer, ...
        return False


def _cuda_gpu_available() -> bool:
    try:
        cuda_device_info()
        return True
    except UserError:
        return False


def _no_trt_gpu_reason() -> str | None:
    if not _trt_builder_available():
        return ("TensorRT builder not installable here: "
                "tensorrt-cu13-libs only downloads from an unreachable host")
    if not _cuda_gpu_available():
        return "no CUDA GPU"
    return None


NO_TRT_GPU = _no_trt_gpu_reason()
needs_trt_gpu = pytest.mark.skipif(NO_TRT_GPU is not None, reason=NO_TRT_GPU or "")


def write_tiny_onnx(path: Path, size: int = SIZE, props: dict[str, str] | None = None, names=None) -> Path:
    """A few-op stand-in for HSNet with the contract's I/O: dynamic B and K, fixed H = W = size.

    logits[:, k] = (q - q*s_k*m_k, q*s_k*m_k) with q a conv of the query; mask = mean over K of fg - bg > 0.
    """
    q_in, s_in, m_in = names or ("query_img", "support_imgs", "support_masks")
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_w")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv_b")
    axes = [numpy_helper.from_array(np.array([axis], dtype=np.int64), f"ax{axis}") for axis in (1, 2)]
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    node = helper.make_node
    nodes = [
        node("Conv", [q_in, "conv_w", "conv_b"], ["qc"], pads=[1, 1, 1, 1]),  # (B, 4, H, W)
        node("ReduceMean", ["qc"], ["qm"], axes=[1], keepdims=1),  # (B, 1, H, W)
        node("Unsqueeze", ["qm", "ax1"], ["q5"]),  # (B, 1, 1, H, W)
        node("ReduceMean", [s_in], ["sm"], axes=[2], keepdims=1),  # (B, K, 1, H, W)
        node("Unsqueeze", [m_in, "ax2"], ["mm"]),  # (B, K, 1, H, W)
        node("Mul", ["sm", "mm"], ["smm"]),
        node("Mul", ["q5", "smm"], ["fg"]),
        node("Sub", ["q5", "fg"], ["bg"]),
        node("Concat", ["bg", "fg"], ["logits"], axis=2),  # (B, K, 2, H, W)
        node("Sub", ["fg", "bg"], ["diff"]),
        node("ReduceMean", ["diff"], ["vote"], axes=[1, 2], keepdims=0),  # (B, H, W)
        node("Greater", ["vote", "zero"], ["fg_wins"]),
        node("Cast", ["fg_wins"], ["mask"], to=TensorProto.FLOAT),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "tiny_hsnet",
        [
            helper.make_tensor_value_info(q_in, f32, ["B", 3, size, size]),
            helper.make_tensor_value_info(s_in, f32, ["B", "K", 3, size, size]),
            helper.make_tensor_value_info(m_in, f32, ["B", "K", size, size]),
        ],
        [
            helper.make_tensor_value_info("logits", f32, ["B", "K", 2, size, size]),
            helper.make_tensor_value_info("mask", f32, ["B", size, size]),
        ],
        initializer=[weight, bias, zero, *axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    default_props = {"hsnet.backbone": "tiny-test", "hsnet.img_size": str(size), "hsnet.precision": "fp32"}
    helper.set_model_props(model, props if props is not None else default_props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def random_feed(b: int, k: int, size: int = SIZE, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "query_img": rng.standard_normal((b, 3, size, size)).astype(np.float32),
        "support_imgs": rng.standard_normal((b, k, 3, size, size)).astype(np.float32),
        "support_masks": (rng.random((b, k, size, size)) > 0.5).astype(np.float32),
    }


META = {"tensorrt_version": "10.13.0.35", "compute_capability": "9.0", "gpu_name": "NVIDIA H100 80GB HBM3",
        "version_compatible": False, "precision": "fp16"}


# --------------------------------------------------------------------------- no TensorRT needed


def test_trt_modules_import_without_loading_tensorrt_or_cuda():
    code = (
        "import sys\n"
        "import hsnet_deploy.runtime.trt_build, hsnet_deploy.runtime.trt_common, hsnet_deploy.runtime.trt_runner\n"
        "heavy = {'tensorrt', 'tensorrt_lean', 'tensorrt_bindings', 'tensorrt_libs', 'cuda'}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_build_engine_without_tensorrt_names_the_install_command(tmp_path, monkeypatch):
    onnx_path = write_tiny_onnx(tmp_path / "tiny.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    out = tmp_path / "tiny.plan"
    with pytest.raises(UserError) as info:
        build_engine(onnx_path, out, max_batch=2, max_shots=2, workspace_gib=1, timing_cache_path=None)
    message = str(info.value)
    assert 'pip install "hsnet-deploy[tensorrt]"' in message
    assert "pypi.nvidia.com" in message and "build the plan on a machine that has it" in message
    assert not out.exists() and not sidecar_path(out).exists()


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"max_batch": 0}, "--max-batch"),
        ({"opt_shots": 5}, "--opt-shots"),
        ({"workspace_gib": 0}, "--workspace"),
    ],
)
def test_build_engine_refuses_bad_settings_before_any_work(tmp_path, kwargs, flag):
    args = {"max_batch": 2, "max_shots": 4, "workspace_gib": 1, "timing_cache_path": None, **kwargs}
    with pytest.raises(UserError, match=flag):
        build_engine(tmp_path / "absent.onnx", tmp_path / "x.plan", **args)


def test_build_engine_refuses_missing_onnx_and_wrong_io_names(tmp_path):
    args = {"max_batch": 1, "max_shots": 1, "workspace_gib": 1, "timing_cache_path": None}
    with pytest.raises(UserError, match="absent.onnx: no such ONNX file"):
        build_engine(tmp_path / "absent.onnx", tmp_path / "x.plan", **args)
    wrong = write_tiny_onnx(tmp_path / "wrong.onnx", names=("image", "support_imgs", "support_masks"))
    with pytest.raises(UserError, match=r"wrong.onnx: inputs \['image'.* are not HSNet's"):
        build_engine(wrong, tmp_path / "x.plan", **args)
    assert not (tmp_path / "x.plan").exists()


def test_read_onnx_spec_refuses_a_model_without_metadata_or_with_a_dynamic_size(tmp_path):
    bare = write_tiny_onnx(tmp_path / "bare.onnx", props={})
    with pytest.raises(UserError, match="without hsnet-deploy metadata"):
        read_onnx_spec(bare)
    model = onnx.load(str(write_tiny_onnx(tmp_path / "dyn.onnx")))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    onnx.save(model, str(tmp_path / "dyn.onnx"))
    with pytest.raises(UserError, match="H and W must be fixed at export"):
        read_onnx_spec(tmp_path / "dyn.onnx")


def test_read_onnx_spec_reads_fixed_size_and_decodes_metadata(tmp_path):
    props = {"hsnet.backbone": "resnet50", "hsnet.img_size": "16", "hsnet.opset": "17",
             "hsnet.tool_versions": json.dumps({"torch": "2.13.0"}), "other": "ignored"}
    spec = read_onnx_spec(write_tiny_onnx(tmp_path / "m.onnx", props=props))
    assert (spec.height, spec.width) == (SIZE, SIZE)
    expected = {"backbone": "resnet50", "img_size": 16, "opset": 17, "tool_versions": {"torch": "2.13.0"}}
    assert spec.meta == expected


def test_profile_spans_one_to_max_batch_and_shots():
    shapes = profile_shapes(400, 400, max_batch=8, max_shots=5, opt_batch=2, opt_shots=1)
    assert shapes["query_img"] == ((1, 3, 400, 400), (2, 3, 400, 400), (8, 3, 400, 400))
    assert shapes["support_imgs"] == ((1, 1, 3, 400, 400), (2, 1, 3, 400, 400), (8, 5, 3, 400, 400))
    assert shapes["support_masks"] == ((1, 1, 400, 400), (2, 1, 400, 400), (8, 5, 400, 400))


def test_version_tuple_ignores_non_numeric_tails():
    assert version_tuple("10.13.0.35") == (10, 13, 0, 35)
    assert version_tuple("11.4.0.106") > version_tuple("11.0.0.1")
    assert version_tuple("10.3.0rc1") == (10, 3, 0)


def test_compatibility_accepts_the_same_tensorrt_and_gpu():
    check_engine_compatible("e.plan", META, runtime_version="10.13.0.35", compute_capability="9.0")


def test_compatibility_refuses_another_tensorrt_version_naming_file_and_both_versions():
    with pytest.raises(UserError) as info:
        check_engine_compatible("models/e.plan", META, runtime_version="10.13.2.6", compute_capability="9.0")
    message = str(info.value)
    assert message.startswith("models/e.plan:")
    assert "10.13.0.35" in message and "10.13.2.6" in message and "--version-compatible" in message


def test_compatibility_refuses_another_compute_capability_naming_both():
    with pytest.raises(UserError) as info:
        check_engine_compatible("e.plan", META, runtime_version="10.13.0.35", compute_capability="8.6",
                                gpu_name="NVIDIA A10")
    message = str(info.value)
    assert "e.plan:" in message and "9.0" in message and "8.6" in message and "NVIDIA A10" in message


@pytest.mark.parametrize(
    ("built", "runtime", "ok"),
    [
        ("11.0.0.1", "11.4.0.106", True),  # later minor of the same major
        ("10.13.0.35", "11.4.0.106", True),  # 10 -> 11 is a supported major crossing
        ("11.4.0.106", "11.1.0.5", False),  # never on an older runtime
        ("11.4.1.2", "11.4.0.106", False),  # nor on an older patch release of the same minor
        ("8.6.1.6", "11.4.0.106", False),  # 8 -> 11 is not supported
    ],
)
def test_compatibility_of_version_compatible_plans(built, runtime, ok):
    meta = {**META, "tensorrt_version": built, "version_compatible": True}
    if ok:
        check_engine_compatible("e.plan", meta, runtime_version=runtime, compute_capability="9.0", lean=True)
    else:
        with pytest.raises(UserError, match=f"built with TensorRT {built} cannot run on TensorRT {runtime}"):
            check_engine_compatible("e.plan", meta, runtime_version=runtime, compute_capability="9.0")


def test_lean_runtime_refuses_a_plan_that_is_not_version_compatible():
    with pytest.raises(UserError, match="lean runtime.*version-compatible plans only"):
        check_engine_compatible("e.plan", META, runtime_version="10.13.0.35", compute_capability="9.0",
                                lean=True)


def test_compatibility_refuses_a_sidecar_without_build_facts():
    with pytest.raises(UserError, match=r"e.plan: its sidecar e.plan.json lacks"):
        check_engine_compatible("e.plan", {"precision": "fp32"}, runtime_version="10.0.0",
                                compute_capability="9.0")


PROFILE = {name: (lo, hi) for name, (lo, _, hi) in
           profile_shapes(SIZE, SIZE, max_batch=2, max_shots=3, opt_batch=1, opt_shots=1).items()}


def _shapes(b: int, k: int, size: int = SIZE) -> dict[str, tuple[int, ...]]:
    return {n: a.shape for n, a in random_feed(b, k, size).items()}


def test_feed_check_accepts_shapes_inside_the_profile():
    check_feed_shapes("e.plan", _shapes(1, 1), PROFILE)
    check_feed_shapes("e.plan", _shapes(2, 3), PROFILE)


@pytest.mark.parametrize(
    ("shapes", "pattern"),
    [
        (_shapes(3, 1), r"batch B = 3 is outside e.plan's profile \[1, 2\].*--max-batch"),
        (_shapes(1, 4), r"shots K = 4 is outside e.plan's profile \[1, 3\].*--max-shots"),
        (_shapes(1, 1, size=24), "image size 24x24, but e.plan was built for 16x16"),
        ({**_shapes(2, 2), "query_img": (1, 3, SIZE, SIZE)}, "inputs disagree on batch B"),
        ({**_shapes(1, 2), "support_masks": (1, 3, SIZE, SIZE)}, "support inputs disagree on shots K"),
        ({k: v for k, v in _shapes(1, 1).items() if k != "support_masks"}, "missing input 'support_masks'"),
    ],
)
def test_feed_check_refuses_shapes_outside_the_profile(shapes, pattern):
    with pytest.raises(UserError, match=pattern):
        check_feed_shapes("e.plan", shapes, PROFILE)


def test_runner_without_tensorrt_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    runner = TensorRTRunner(tmp_path / "e.plan", META)
    assert runner.info.label == "tensorrt-cuda fp16"
    with pytest.raises(UserError, match=r"hsnet-deploy\[tensorrt-lean\]"), runner:
        pass
    assert not runner.active and runner.device_memory_bytes() is None


# --------------------------------------------------------------------------- the runner's data path, faked


class FakeMemory:
    """Host bytearrays standing in for device buffers, so the runner's copy/grow/free logic runs here."""

    stream_handle = 7

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.mallocs = 0
        self.closed = False
        self._next = 4096

    def malloc(self, nbytes: int) -> int:
        ptr, self._next, self.mallocs = self._next, self._next + nbytes + 4096, self.mallocs + 1
        self.blocks[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def free(self, ptr: int) -> None:
        del self.blocks[ptr]

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        self.blocks[ptr][: host.nbytes] = host.reshape(-1).view(np.uint8)

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        host.reshape(-1).view(np.uint8)[:] = self.blocks[ptr][: host.nbytes]

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def fake_outputs(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the fake engine computes: simple enough to check independently of the runner."""
    fg = feed["support_imgs"].mean(axis=2) + feed["query_img"].mean(axis=1)[:, None]
    logits = np.stack([feed["support_masks"], fg], axis=2).astype(np.float32)
    return {"logits": logits, "mask": (feed["query_img"][:, 0] > 0).astype(np.float32)}


def fake_tensorrt(memory: FakeMemory, plan: bytes):
    """The slice of the TensorRT runtime API the runner uses, executing `fake_outputs` on FakeMemory."""
    import enum
    import types

    profile = profile_shapes(SIZE, SIZE, max_batch=2, max_shots=3, opt_batch=1, opt_shots=1)

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            b, k = self.shapes["support_masks"][:2]
            return (b, k, 2, SIZE, SIZE) if name == "logits" else (b, SIZE, SIZE)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream):
            assert stream == FakeMemory.stream_handle
            feed = {}
            for name in INPUT_NAMES:
                block = memory.blocks[self.addresses[name]]
                count = int(np.prod(self.shapes[name]))
                feed[name] = block[: count * 4].view(np.float32).reshape(self.shapes[name])
            for name, value in fake_outputs(feed).items():
                memory.blocks[self.addresses[name]][: value.nbytes] = value.reshape(-1).view(np.uint8)
            return True

    class Engine:
        num_io_tensors = 5
        device_memory_size_v2 = 1000

        def get_tensor_name(self, i):
            return (*INPUT_NAMES, "logits", "mask")[i]

        def get_tensor_mode(self, name):
            return "in" if name in INPUT_NAMES else "out"

        def get_tensor_dtype(self, name):
            return "float32"

        def get_tensor_profile_shape(self, name, index):
            return profile[name]

        def create_execution_context(self):
            return Context()

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)

        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger) -> None:
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            return Engine() if data == plan else None

    return types.SimpleNamespace(__version__=META["tensorrt_version"], TensorIOMode=types.SimpleNamespace(
        INPUT="in", OUTPUT="out"), nptype=np.dtype, ILogger=ILogger, Runtime=Runtime)



@pytest.fixture
def faked(tmp_path, monkeypatch):
    import hashlib

    from hsnet_deploy.runtime import trt_runner

    memory, plan = FakeMemory(), b"fake-plan"
    monkeypatch.setattr(trt_runner, "import_trt_runtime", lambda: (fake_tensorrt(memory, plan), False))
    monkeypatch.setattr(trt_runner, "cuda_device_info", lambda: ("Fake GPU", "9.0"))
    monkeypatch.setattr(trt_runner, "_device_memory", lambda: memory)
    path = tmp_path / "fake.plan"
    path.write_bytes(plan)
    meta = {**META, "precision": "fp32", "plan_sha256": hashlib.sha256(plan).hexdigest()}
    return path, meta, memory


def test_runner_copies_runs_and_reads_back_while_buffers_grow_and_are_reused(faked):
    path, meta, memory = faked
    with TensorRTRunner(path, meta) as runner:
        for b, k in ((1, 1), (2, 3)):
            feed = random_feed(b, k, seed=k)
            out = runner.infer(feed)
            for name, want in fake_outputs(feed).items():
                np.testing.assert_array_equal(out[name], want)
        grown = memory.mallocs
        out = runner.infer(random_feed(1, 2))  # smaller again: the grown buffers are reused
        assert memory.mallocs == grown and out["logits"].shape == (1, 2, 2, SIZE, SIZE)
        assert runner.device_memory_bytes() == 1000 + sum(len(block) for block in memory.blocks.values())
        assert runner.info.details["gpu"] == "Fake GPU"
    assert memory.blocks == {} and memory.closed and runner.device_memory_bytes() is None


def test_runner_reports_a_plan_its_runtime_cannot_deserialize(faked):
    import hashlib

    path, meta, memory = faked
    path.write_bytes(b"corrupt")
    runner = TensorRTRunner(path, {**meta, "plan_sha256": hashlib.sha256(b"corrupt").hexdigest()})
    with pytest.raises(UserError, match="fake.plan: TensorRT 10.13.0.35 cannot deserialize the plan"), runner:
        pass
    assert memory.closed and not runner.active


# --------------------------------------------------------------------------- real TensorRT + GPU


def ort_reference(onnx_path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(zip(("logits", "mask"), session.run(["logits", "mask"], feed), strict=True))


def assert_matches_reference(out: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert out["logits"].shape == ref["logits"].shape and out["mask"].shape == ref["mask"].shape
    assert out["mask"].dtype == ref["mask"].dtype
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-4, atol=1e-5)  # TF32 off: FP32 parity
    vote = (ref["logits"][:, :, 1] - ref["logits"][:, :, 0]).mean(axis=1)
    decided = np.abs(vote) > 1e-4  # ties may round either way
    np.testing.assert_array_equal(out["mask"][decided], ref["mask"][decided])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    onnx_path = write_tiny_onnx(root / "tiny.onnx")
    meta = build_engine(onnx_path, root / "tiny.plan", max_batch=2, max_shots=3, workspace_gib=1,
                        timing_cache_path=root / "cache" / "timing.cache")
    return onnx_path, root / "tiny.plan", meta


@needs_trt_gpu
def test_engine_matches_onnxruntime_while_buffers_grow_and_shrink(built):
    onnx_path, plan, meta = built
    with TensorRTRunner(plan, meta) as runner:
        for b, k in ((1, 1), (2, 3), (1, 2)):
            feed = random_feed(b, k, seed=b * 10 + k)
            assert_matches_reference(runner.infer(feed), ort_reference(onnx_path, feed))
        assert runner.device_memory_bytes() > 0
        assert len(runner.inference_times) == 3
    assert runner.device_memory_bytes() is None


@needs_trt_gpu
def test_engine_refuses_a_batch_outside_its_profile(built):
    _, plan, meta = built
    with TensorRTRunner(plan, meta) as runner, pytest.raises(UserError, match="batch B = 3"):
        runner.infer(random_feed(3, 1))


@needs_trt_gpu
def test_sidecar_records_what_the_plan_is_tied_to(built):
    import tensorrt

    _, plan, meta = built
    assert json.loads(sidecar_path(plan).read_text()) == meta
    assert meta["tensorrt_version"] == tensorrt.__version__
    assert (meta["gpu_name"], meta["compute_capability"]) == cuda_device_info()
    assert meta["profile"] == {"batch": [1, 1, 2], "shots": [1, 1, 3]}
    assert (meta["backbone"], meta["img_size"], meta["precision"]) == ("tiny-test", SIZE, "fp32")
    assert meta["tf32"] is False and meta["version_compatible"] is False
    assert meta["tool_versions"]["tensorrt"] == tensorrt.__version__
    assert plan.stat().st_size == meta["plan_bytes"]


@needs_trt_gpu
def test_timing_cache_is_saved_and_reused(built, tmp_path):
    onnx_path, _, _ = built
    cache = onnx_path.parent / "cache" / "timing.cache"
    assert cache.stat().st_size > 0
    build_engine(onnx_path, tmp_path / "again.plan", max_batch=2, max_shots=3, workspace_gib=1,
                 timing_cache_path=cache)
    assert cache.stat().st_size > 0 and (tmp_path / "again.plan").stat().st_size > 0


@needs_trt_gpu
def test_runner_refuses_a_plan_that_does_not_match_its_sidecar(built, tmp_path):
    _, plan, meta = built
    stale = TensorRTRunner(plan, {**meta, "plan_sha256": "0" * 64})
    with pytest.raises(UserError, match="does not match its sidecar"), stale:
        pass
    other_version = TensorRTRunner(plan, {**meta, "tensorrt_version": "9.0.0.0"})
    with pytest.raises(UserError, match="this runtime is TensorRT"), other_version:
        pass


@needs_trt_gpu
def test_version_compatible_engine_runs_and_matches(tmp_path):
    onnx_path = write_tiny_onnx(tmp_path / "tiny.onnx")
    meta = build_engine(onnx_path, tmp_path / "vc.plan", max_batch=1, max_shots=2, workspace_gib=1,
                        timing_cache_path=None, version_compatible=True)
    assert meta["version_compatible"] is True
    feed = random_feed(1, 2, seed=7)
    with TensorRTRunner(tmp_path / "vc.plan", meta) as runner:
        assert_matches_reference(runner.infer(feed), ort_reference(onnx_path, feed))


# --------------------------------------------------------------------------- the builder's steps, faked


class FakeConfig:
    """Records the flags, pool limits, profiles and timing cache the builder sets."""

    def __init__(self, cache_accepts: bool = True) -> None:
        self.flags: set[str] = {"TF32"}  # both majors enable TF32 by default
        self.pools: dict[str, int] = {}
        self.profiles: list[dict] = []
        self.cache_accepts = cache_accepts
        self.cache: bytes | None = None
        self.cache_loaded_from: list[bytes] = []

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile.shapes)

    def create_timing_cache(self, data):
        self.cache_loaded_from.append(bytes(data))
        return bytes(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False  # a mismatched cache must be refused, never used
        if cache and not self.cache_accepts:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return types.SimpleNamespace(serialize=lambda: (self.cache or b"") + b"+timed")


class FakeParserError:
    def __init__(self, index: int, named: bool) -> None:
        if named:
            self.node_name = lambda: f"/layer{index}/Conv"
            self.node_operator = lambda: "Conv"
        self.node = lambda: index
        self.desc = lambda: f"unsupported thing {index}"


def fake_tensorrt_builder(version: str = "10.13.0.35", *, strongly_typed: bool = True, tf32: bool = True,
                          parse_errors: int = 0, named_errors: bool = True, build_fails: bool = False,
                          cache_accepts: bool = True):
    """The slice of the TensorRT builder API that trt_build uses, recording every call on `trt.calls`."""
    calls: dict = {"parser_flags": set(), "parsed": None, "network_flags": None}

    creation = {"STRONGLY_TYPED": 1} if strongly_typed else {}
    builder_flags = {"VERSION_COMPATIBLE": "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME": "EXCLUDE_LEAN_RUNTIME"}
    if tf32:
        builder_flags["TF32"] = "TF32"

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)

        def __init__(self) -> None:
            pass

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger

        def create_network(self, flags):
            calls["network_flags"] = flags
            return "network"

        def create_builder_config(self):
            calls["config"] = FakeConfig(cache_accepts)
            return calls["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if build_fails:
                self.logger.log(ILogger.Severity.ERROR, "out of workspace")
                return None
            return b"plan:" + repr(sorted(config.flags)).encode()

    class OnnxParser:
        def __init__(self, network, logger) -> None:
            self.num_errors = 0

        def set_flag(self, flag):
            calls["parser_flags"].add(flag)

        def parse_from_file(self, path):
            calls["parsed"] = path
            self.num_errors = parse_errors
            return parse_errors == 0

        def get_error(self, i):
            return FakeParserError(i, named_errors)

    return types.SimpleNamespace(
        __version__=version, calls=calls, Builder=Builder, OnnxParser=OnnxParser, ILogger=ILogger,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(**creation),
        BuilderFlag=types.SimpleNamespace(**builder_flags),
        OnnxParserFlag=types.SimpleNamespace(NATIVE_INSTANCENORM="NATIVE_INSTANCENORM"),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
    )


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """build_engine(...) against a fake tensorrt on a fake GPU; returns (run, onnx path)."""
    from hsnet_deploy.runtime import trt_build

    monkeypatch.setattr(trt_build, "cuda_device_info", lambda: ("Fake GPU", "8.9"))
    onnx_path = write_tiny_onnx(tmp_path / "tiny.onnx")

    def run(trt, out="tiny.plan", **kwargs):
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        args = {"max_batch": 4, "max_shots": 5, "opt_batch": 2, "opt_shots": 1, "workspace_gib": 0.5,
                "timing_cache_path": None, **kwargs}
        return build_engine(onnx_path, tmp_path / out, **args)

    return run, onnx_path


@pytest.mark.parametrize(
    ("version", "has_flag", "expected"),
    [("10.13.0.35", True, 1 << 1), ("11.4.0.106", True, 1 << 1), ("11.4.0.106", False, 0)],
)
def test_network_is_strongly_typed_on_10x_and_11x(version, has_flag, expected):
    from hsnet_deploy.runtime.trt_build import strongly_typed_flags

    assert strongly_typed_flags(fake_tensorrt_builder(version, strongly_typed=has_flag)) == expected


def test_a_10x_without_strong_typing_is_refused():
    from hsnet_deploy.runtime.trt_build import strongly_typed_flags

    with pytest.raises(UserError, match=r"TensorRT 10.3.0 has no strongly typed networks.*>= 10.12"):
        strongly_typed_flags(fake_tensorrt_builder("10.3.0", strongly_typed=False))


def test_tf32_is_cleared_unless_asked_and_a_missing_flag_only_matters_when_asked():
    from hsnet_deploy.runtime.trt_build import set_tf32

    trt = fake_tensorrt_builder()
    off, on = FakeConfig(), FakeConfig()
    set_tf32(trt, off, False)
    set_tf32(trt, on, True)
    assert "TF32" not in off.flags and "TF32" in on.flags
    without = fake_tensorrt_builder("12.0.0", tf32=False)
    set_tf32(without, FakeConfig(), False)  # nothing to clear: fine
    with pytest.raises(UserError, match="no BuilderFlag.TF32"):
        set_tf32(without, FakeConfig(), True)


def test_parser_error_text_names_the_node_or_its_index():
    from hsnet_deploy.runtime.trt_build import parser_error_text

    assert parser_error_text(FakeParserError(3, named=True)) == "node '/layer3/Conv' (Conv): unsupported thing 3"
    assert parser_error_text(FakeParserError(4, named=False)) == "node #4: unsupported thing 4"


def test_build_sets_strong_typing_workspace_no_tf32_and_one_profile_over_b_and_k(fake_build, tmp_path):
    run, onnx_path = fake_build
    trt = fake_tensorrt_builder()
    meta = run(trt)
    config = trt.calls["config"]
    assert trt.calls["network_flags"] == 1 << 1
    assert trt.calls["parsed"] == str(onnx_path.resolve())
    assert config.pools == {"WORKSPACE": 1 << 29}
    assert config.flags == set()  # TF32 cleared; not version compatible
    assert config.profiles == [profile_shapes(SIZE, SIZE, max_batch=4, max_shots=5, opt_batch=2, opt_shots=1)]
    assert config.profiles[0]["support_masks"] == ((1, 1, SIZE, SIZE), (2, 1, SIZE, SIZE), (4, 5, SIZE, SIZE))
    plan = (tmp_path / "tiny.plan").read_bytes()
    assert plan == b"plan:[]"
    assert json.loads(sidecar_path(tmp_path / "tiny.plan").read_text()) == meta
    import hashlib

    assert meta["plan_sha256"] == hashlib.sha256(plan).hexdigest() and meta["plan_bytes"] == len(plan)
    assert meta["profile"] == {"batch": [1, 2, 4], "shots": [1, 1, 5]} and meta["input_hw"] == [SIZE, SIZE]
    assert (meta["tensorrt_version"], meta["gpu_name"], meta["compute_capability"]) == (
        "10.13.0.35", "Fake GPU", "8.9")
    assert meta["backbone"] == "tiny-test" and meta["tf32"] is False and meta["version_compatible"] is False


def test_version_compatible_build_embeds_the_lean_runtime_and_uses_native_instancenorm(fake_build):
    run, _ = fake_build
    trt = fake_tensorrt_builder("11.4.0.106", strongly_typed=False)
    meta = run(trt, version_compatible=True, tf32=True)
    config = trt.calls["config"]
    assert trt.calls["network_flags"] == 0  # 11.x: strongly typed without the flag
    assert config.flags == {"VERSION_COMPATIBLE", "TF32"}  # EXCLUDE_LEAN_RUNTIME cleared
    assert trt.calls["parser_flags"] == {"NATIVE_INSTANCENORM"}
    assert meta["version_compatible"] is True and meta["tf32"] is True


def test_version_compatible_clears_exclude_lean_runtime_where_it_was_set():
    """The fake builder starts with EXCLUDE_LEAN_RUNTIME clear (TensorRT's default), so the build above cannot tell
    whether it is cleared: a config that has it set must lose it, or the plan would need a lean runtime shipped
    beside it."""
    import types

    from hsnet_deploy.runtime.trt_build import set_version_compatible

    trt = fake_tensorrt_builder("10.3.0")
    config = FakeConfig()
    config.flags.add("EXCLUDE_LEAN_RUNTIME")
    parser_flags = set()
    set_version_compatible(trt, config, types.SimpleNamespace(set_flag=parser_flags.add))
    assert "EXCLUDE_LEAN_RUNTIME" not in config.flags and "VERSION_COMPATIBLE" in config.flags
    assert parser_flags == {"NATIVE_INSTANCENORM"}


def test_timing_cache_is_created_then_reused_and_a_stale_one_replaced(fake_build, tmp_path, capsys):
    run, _ = fake_build
    cache = tmp_path / "caches" / "trt.cache"
    first = fake_tensorrt_builder()
    run(first, timing_cache_path=cache)
    assert first.calls["config"].cache_loaded_from == [b""] and cache.read_bytes() == b"+timed"
    second = fake_tensorrt_builder()
    run(second, out="again.plan", timing_cache_path=cache)
    assert second.calls["config"].cache_loaded_from == [b"+timed"]  # the first build's cache, reused
    assert cache.read_bytes() == b"+timed+timed"
    stale = fake_tensorrt_builder(cache_accepts=False)
    run(stale, out="stale.plan", timing_cache_path=cache)
    assert stale.calls["config"].cache_loaded_from == [b"+timed+timed", b""]
    assert "timing cache does not fit this TensorRT/GPU" in capsys.readouterr().err
    assert cache.read_bytes() == b"+timed"


def test_parse_failure_names_file_version_and_each_node_and_writes_nothing(fake_build, tmp_path):
    run, _ = fake_build
    with pytest.raises(UserError) as info:
        run(fake_tensorrt_builder(parse_errors=2))
    message = str(info.value)
    assert "tiny.onnx: TensorRT 10.13.0.35 cannot parse the model" in message
    assert "node '/layer0/Conv' (Conv): unsupported thing 0; node '/layer1/Conv' (Conv): unsupported thing 1" in message
    assert not (tmp_path / "tiny.plan").exists() and not sidecar_path(tmp_path / "tiny.plan").exists()


def test_build_failure_quotes_tensorrt_errors_and_writes_nothing(fake_build, tmp_path, capsys):
    run, _ = fake_build
    with pytest.raises(RuntimeError, match="failed to build .*tiny.onnx: out of workspace"):
        run(fake_tensorrt_builder(build_fails=True), timing_cache_path=tmp_path / "c.cache")
    assert "[TensorRT] ERROR: out of workspace" in capsys.readouterr().err
    assert not (tmp_path / "tiny.plan").exists() and not (tmp_path / "c.cache").exists()


# --------------------------------------------------------------------------- the runner's two device-memory backends


def fake_cudart(fail_malloc: bool = False):
    """cuda-python's runtime API as (error, value) tuples over host blocks, so _CudaPythonMemory runs here."""
    import ctypes

    blocks: dict[int, np.ndarray] = {}
    log: list[str] = []

    class Stream:  # cudaStream_t: an opaque handle whose int() is the address TensorRT gets
        def __int__(self) -> int:
            return 77

    stream_1 = Stream()

    def malloc(nbytes):
        if fail_malloc:
            return (2, 0)  # cudaErrorMemoryAllocation
        block = np.zeros(nbytes, np.uint8)
        blocks[block.ctypes.data] = block
        return (0, block.ctypes.data)

    def free(ptr):
        del blocks[ptr]
        return (0,)

    def memcpy(dst, src, nbytes, kind, stream):
        assert stream is stream_1
        log.append(kind)
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def record(name, *result):
        def call(*args):
            log.append(name)
            return (0, *result)

        return call

    return types.SimpleNamespace(
        blocks=blocks, log=log, cudaMalloc=malloc, cudaFree=free, cudaMemcpyAsync=memcpy,
        cudaStreamCreate=record("create", stream_1), cudaStreamSynchronize=record("sync"),
        cudaStreamDestroy=record("destroy"),
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h"),
    )


def fake_cuda_torch():
    """torch with "cuda" tensors and streams mapped to the CPU, so _TorchMemory's copies run here."""
    import contextlib

    import torch

    class Stream:
        cuda_stream = 1234
        synced = 0

        def synchronize(self):
            Stream.synced += 1

    cuda = types.SimpleNamespace(Stream=Stream, stream=lambda s: contextlib.nullcontext(),
                                 is_available=lambda: True)
    return types.SimpleNamespace(
        empty=lambda n, dtype, device: torch.empty(n, dtype=dtype), uint8=torch.uint8,
        from_numpy=torch.from_numpy, cuda=cuda,
    ), Stream


def _round_trip(memory) -> np.ndarray:
    host = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    ptr = memory.malloc(host.nbytes + 64)  # capacity larger than the copy, as after a buffer grows
    memory.h2d(ptr, host)
    back = np.zeros_like(host)
    memory.d2h(back, ptr)
    memory.synchronize()
    memory.free(ptr)
    memory.close()
    return back


def test_cuda_python_memory_copies_both_ways_on_its_stream_and_frees(monkeypatch):
    from hsnet_deploy.runtime import trt_runner

    rt = fake_cudart()
    monkeypatch.setattr(trt_runner, "import_cudart", lambda: rt)
    memory = trt_runner._device_memory()
    assert type(memory).__name__ == "_CudaPythonMemory" and memory.stream_handle == 77
    np.testing.assert_array_equal(_round_trip(memory), np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    assert rt.log == ["create", "h2d", "d2h", "sync", "destroy"] and not rt.blocks
    memory.close()  # a second close is harmless
    assert rt.log.count("destroy") == 1


def test_cuda_python_memory_raises_the_cuda_error():
    from hsnet_deploy.runtime.trt_runner import _CudaPythonMemory

    with pytest.raises(RuntimeError, match="CUDA call failed: 2"):
        _CudaPythonMemory(fake_cudart(fail_malloc=True)).malloc(16)


def test_torch_memory_is_the_fallback_without_cuda_python_and_copies_both_ways(monkeypatch):
    from hsnet_deploy.runtime import trt_runner

    fake_torch, stream = fake_cuda_torch()
    monkeypatch.setattr(trt_runner, "import_cudart", lambda: None)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    memory = trt_runner._device_memory()
    assert type(memory).__name__ == "_TorchMemory" and memory.stream_handle == 1234
    np.testing.assert_array_equal(_round_trip(memory), np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    assert stream.synced == 1 and not memory._tensors


def test_no_device_memory_backend_says_what_to_install(monkeypatch):
    from hsnet_deploy.runtime import trt_runner

    monkeypatch.setattr(trt_runner, "import_cudart", lambda: None)
    cpu_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", cpu_torch)
    with pytest.raises(UserError, match=r"device buffers from cuda-python \(pip install cuda-python\)"):
        trt_runner._device_memory()


def test_runner_reuses_its_buffers_for_a_repeated_shape(faked):
    """A second call of the same (B, K) fits the buffers it already has: no new allocation, no free."""
    path, meta, memory = faked
    with TensorRTRunner(path, meta) as runner:
        runner.infer(random_feed(2, 3, seed=1))
        allocated, blocks = memory.mallocs, set(memory.blocks)
        for seed in (2, 3):
            feed = random_feed(2, 3, seed=seed)
            out = runner.infer(feed)
            np.testing.assert_array_equal(out["logits"], fake_outputs(feed)["logits"])
        assert memory.mallocs == allocated == 5 and set(memory.blocks) == blocks


def test_engine_device_memory_prefers_the_v2_size_where_both_exist():
    """10.1+ has both; device_memory_size (removed in 11) is the fallback for engines without _v2 only."""
    import types

    from hsnet_deploy.runtime.trt_runner import engine_device_memory

    assert engine_device_memory(types.SimpleNamespace(device_memory_size_v2=4096, device_memory_size=1024)) == 4096
    assert engine_device_memory(types.SimpleNamespace(device_memory_size=1024)) == 1024


def test_runner_refuses_a_plan_whose_bytes_differ_from_its_sidecar(faked):
    path, meta, memory = faked
    path.write_bytes(b"fake-plan, rebuilt")  # the sidecar still records the old plan's sha256
    runner = TensorRTRunner(path, meta)
    with pytest.raises(UserError, match=r"fake.plan: the plan does not match its sidecar .*plan_sha256 differs"), runner:
        pass
    assert not runner.active and memory.blocks == {}


@pytest.mark.parametrize("version_compatible", [True, False])
def test_runner_allows_embedded_host_code_only_for_version_compatible_plans(faked, version_compatible):
    path, meta, _ = faked
    with TensorRTRunner(path, {**meta, "version_compatible": version_compatible}) as runner:
        assert runner._runtime.engine_host_code_allowed is version_compatible


def test_read_onnx_spec_refuses_a_dynamic_width_alone(tmp_path):
    model = onnx.load(str(write_tiny_onnx(tmp_path / "dynw.onnx")))
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    onnx.save(model, str(tmp_path / "dynw.onnx"))
    with pytest.raises(UserError, match="H and W must be fixed at export"):
        read_onnx_spec(tmp_path / "dynw.onnx")


def test_build_engine_refuses_a_sidecar_path_that_cannot_be_written_before_any_work(tmp_path, monkeypatch):
    """`<plan>.json` is written last; a folder in its place is refused before TensorRT is even imported."""
    onnx_path = write_tiny_onnx(tmp_path / "tiny.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # reaching the import would be a different error
    out = tmp_path / "tiny.plan"
    sidecar_path(out).mkdir()
    with pytest.raises(UserError, match=r"tiny.plan.json: is a directory"):
        build_engine(onnx_path, out, max_batch=2, max_shots=2, workspace_gib=1, timing_cache_path=None)
    assert not out.exists()


def test_sidecar_tool_versions_name_the_tensorrt_that_built_the_plan(tmp_path):
    """The ONNX's own tool versions are carried over, but where a name repeats the build's version wins:
    an export that recorded some other TensorRT must not pass for the one that built the plan."""
    from hsnet_deploy.runtime.trt_build import OnnxSpec, plan_meta

    onnx_path = write_tiny_onnx(tmp_path / "m.onnx")
    spec = OnnxSpec(SIZE, SIZE, {"backbone": "resnet50", "img_size": SIZE,
                                 "tool_versions": {"tensorrt": "8.6.1", "onnxslim": "0.1.48"}})
    meta = plan_meta(spec, onnx_path, memoryview(b"plan"), trt_version="10.13.0.35", gpu=("Fake GPU", "9.0"),
                     version_compatible=False, tf32=False, batch=(1, 1, 2), shots=(1, 1, 3), workspace_gib=1)
    assert meta["tool_versions"]["tensorrt"] == "10.13.0.35"
    assert meta["tool_versions"]["onnxslim"] == "0.1.48"
    assert meta["tensorrt_version"] == "10.13.0.35" and meta["profile"] == {"batch": [1, 1, 2], "shots": [1, 1, 3]}
