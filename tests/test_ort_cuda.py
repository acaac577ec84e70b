"""ONNX Runtime CUDA: fixed device buffers per (B, K), CUDA graphs per shape, device I/O, EP options.

Against a fake of onnxruntime's API (tests/fake_ort_cuda.py) on the CPU; the real-GPU tests skip here."""

import sys

import numpy as np
import pytest
import torch
from fake_ort_cuda import CAPTURE_REFUSAL, FakeOrtValue, FakeSession, fake_model, fake_onnxruntime

from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.bench import random_feed
from hsnet_deploy.runtime.ort_cuda import (
    CUDA_EP_DEFAULTS,
    FixedIoBinding,
    cuda_provider_options,
    parse_ep_options,
)
from hsnet_deploy.runtime.ort_runner import OrtRunner, available_providers

META = {"backbone": "resnet50", "img_size": 16, "precision": "fp32"}
NO_GPU = "needs onnxruntime-gpu's CUDAExecutionProvider and a CUDA GPU (CI and the developers' machines are CPU-only)"


@pytest.fixture
def ort(monkeypatch):
    module = fake_onnxruntime()
    monkeypatch.setitem(sys.modules, "onnxruntime", module)
    monkeypatch.setattr(FakeSession, "cpu_nodes", False)
    return module


def _feed(b, k, seed):
    return random_feed(b, k, 16, seed=seed)


def _expected(feed):
    return fake_model(feed["query_img"], feed["support_imgs"], feed["support_masks"])


def _check(out, feed):
    logits, mask = _expected(feed)
    assert out["logits"].shape == logits.shape and out["mask"].shape == mask.shape
    np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["mask"]), mask)


def test_graph_runner_allocates_once_per_shape_copies_in_place_and_replays_per_shape(ort):
    with OrtRunner("m.onnx", META, "cuda", cuda_graph=True) as runner:
        session = FakeSession.last
        assert session.cuda_options["enable_cuda_graph"] == "1"
        counters = FakeOrtValue.counters
        for call in range(4):  # new inputs every call; calls 3 and 4 are replays of the captured graph
            feed = _feed(1, 1, seed=call)
            _check(runner.infer(feed), feed)
        assert counters.allocations == 5  # 3 inputs + 2 outputs, once for (B, K) = (1, 1)
        assert counters.captures == [1] and counters.replays == 2
        for call in range(3):
            feed = _feed(2, 3, seed=10 + call)
            _check(runner.infer(feed), feed)
        assert counters.allocations == 10 and counters.captures == [1, 2]  # a second shape: its own graph id
        feed = _feed(1, 1, seed=99)  # back to the first shape: its graph, its buffers, no new allocation
        _check(runner.infer(feed), feed)
        assert counters.allocations == 10 and counters.replays == 4
        graph_ids = sorted(slot.graph_id for slot in runner.fixed_io.slots.values())
        assert graph_ids == [1, 2]
        assert len(runner.inference_times) == 8


def test_replaying_rebound_buffers_would_be_stale_so_the_fake_can_catch_it(ort):
    """The fake replays captured addresses: binding fresh buffers per call gives the first call's answer."""
    session = ort.InferenceSession("m.onnx", None, [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", "1")
    feeds = [_feed(1, 1, seed=s) for s in range(3)]
    outs = []
    for feed in feeds:
        binding = session.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        logits = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, 2, 16, 16], np.float32, "cuda", 0)
        mask = ort.OrtValue.ortvalue_from_shape_and_type([1, 16, 16], np.float32, "cuda", 0)
        binding.bind_ortvalue_output("logits", logits)
        binding.bind_ortvalue_output("mask", mask)
        session.run_with_iobinding(binding, options)
        outs.append(logits.numpy())
    assert np.abs(outs[2] - _expected(feeds[2])[0]).max() > 1e-3  # stale: the replay wrote the captured buffer


def test_host_io_without_graph_uses_fixed_buffers_and_no_graph_id(ort):
    with OrtRunner("m.onnx", META, "cuda") as runner:
        assert "enable_cuda_graph" not in FakeSession.last.cuda_options
        for seed in range(3):
            feed = _feed(2, 1, seed)
            _check(runner.infer(feed), feed)
        assert FakeOrtValue.counters.allocations == 5 and FakeOrtValue.counters.captures == []
        (slot,) = runner.fixed_io.slots.values()
        assert slot.graph_id is None and slot.run_options.config == {}


def test_device_io_binds_tensors_by_pointer_without_a_graph(ort):
    with OrtRunner("m.onnx", META, "cuda") as runner:
        assert runner.supports_device_io
        runner.fixed_io.tensor_device = "cpu"  # the fake's "device" is host memory
        for seed in range(2):
            feed = _feed(1, 2, seed)
            out = runner.infer_device({n: torch.from_numpy(v) for n, v in feed.items()})
            assert isinstance(out["logits"], torch.Tensor)
            _check({n: t.numpy() for n, t in out.items()}, feed)
        assert runner.fixed_io.slots == {}  # nothing pinned: the caller's tensors were bound directly


def test_device_io_with_graph_copies_into_fixed_tensors_and_returns_copies(ort):
    with OrtRunner("m.onnx", META, "cuda", cuda_graph=True) as runner:
        runner.fixed_io.tensor_device = "cpu"
        outs, feeds = [], [_feed(2, 1, seed) for seed in range(4)]
        for feed in feeds:
            outs.append(runner.infer_device({n: torch.from_numpy(v.copy()) for n, v in feed.items()}))
        for out, feed in zip(outs, feeds):  # earlier results are not overwritten by later replays
            _check({n: t.numpy() for n, t in out.items()}, feed)
        (slot,) = runner.fixed_io.slots.values()
        assert slot.graph_id == 1 and FakeOrtValue.counters.captures == [1] and FakeOrtValue.counters.replays == 2
        host = _feed(2, 1, seed=7)  # host I/O on the same shape: other buffers, so another graph id
        _check(runner.infer(host), host)
        assert sorted(s.graph_id for s in runner.fixed_io.slots.values()) == [1, 2]


def test_device_io_accepts_dlpack_and_refuses_host_arrays_and_wrong_dtype(ort):
    with OrtRunner("m.onnx", META, "cuda") as runner:
        runner.fixed_io.tensor_device = "cpu"
        feed = _feed(1, 1, 0)

        class Producer:  # any __dlpack__ producer, e.g. CuPy on a GPU
            def __init__(self, t):
                self.t = t

            def __dlpack__(self, **kwargs):
                return self.t.__dlpack__(**kwargs)

            def __dlpack_device__(self):
                return self.t.__dlpack_device__()

        out = runner.infer_device({n: Producer(torch.from_numpy(v)) for n, v in feed.items()})
        _check({n: t.numpy() for n, t in out.items()}, feed)
        with pytest.raises(UserError, match="'query_img' is a ndarray"):
            runner.infer_device(feed)
        with pytest.raises(UserError, match="torch.float64, the model takes torch.float32"):
            runner.infer_device({n: torch.from_numpy(v).double() for n, v in feed.items()})
        runner.fixed_io.tensor_device = "cuda"
        with pytest.raises(UserError, match="is on cpu, not cuda"):
            runner.infer_device({n: torch.from_numpy(v) for n, v in feed.items()})


def test_bad_shapes_are_refused_before_any_allocation(ort):
    with OrtRunner("m.onnx", META, "cuda", cuda_graph=True) as runner:
        feed = _feed(1, 1, 0)
        feed["support_masks"] = feed["support_masks"][:, :, :8]
        with pytest.raises(UserError, match="do not fit"):
            runner.infer(feed)
        assert FakeOrtValue.counters.allocations == 0


def test_graph_capture_is_refused_up_front_with_an_error_not_a_crash(ort, monkeypatch):
    with pytest.raises(UserError, match="CUDA graphs need the CUDA device"):
        OrtRunner("m.onnx", META, "cpu", cuda_graph=True)
    monkeypatch.setattr(FakeSession, "cpu_nodes", True)
    runner = OrtRunner("m.onnx", META, "cuda", cuda_graph=True)
    with pytest.raises(UserError, match="cannot capture this model in a CUDA graph") as info, runner:
        pass
    assert CAPTURE_REFUSAL[:40] in str(info.value)
    # named from a profiled run without capture: the CPU nodes, not the CUDA ones
    assert "nodes it runs outside the CUDA EP: mask_size (Shape), vote_index (NonZero);" in str(info.value)
    assert "conv_1" not in str(info.value)
    with OrtRunner("m.onnx", META, "cuda") as runner:  # the same model runs without a graph
        feed = _feed(1, 1, 0)
        _check(runner.infer(feed), feed)


def test_graph_without_cuda_provider_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_onnxruntime(available=("CPUExecutionProvider",)))
    with pytest.raises(UserError, match="pip install onnxruntime-gpu"):
        OrtRunner("m.onnx", META, "cuda", cuda_graph=True)


def test_a_failed_first_capture_is_an_error_and_later_failures_are_not_masked(ort, monkeypatch):
    with OrtRunner("m.onnx", META, "cuda", cuda_graph=True) as runner:
        def broken(binding, options=None):
            raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")

        monkeypatch.setattr(runner.session, "run_with_iobinding", broken)
        with pytest.raises(UserError, match="cannot capture.*operation not permitted"):
            runner.infer(_feed(1, 1, 0))


def test_ep_options_defaults_overrides_and_refusals(ort):
    # the measured defaults (docs/benchmarks.md "GPU, H200"): HEURISTIC algorithms, TF32 convolutions
    assert cuda_provider_options() == CUDA_EP_DEFAULTS
    assert CUDA_EP_DEFAULTS["use_tf32"] == "1" and CUDA_EP_DEFAULTS["cudnn_conv_algo_search"] == "HEURISTIC"
    opts = cuda_provider_options({"prefer_nhwc": "1", "cudnn_conv_algo_search": "exhaustive", "use_tf32": "0"},
                                 cuda_graph=True)
    assert opts["prefer_nhwc"] == "1" and opts["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert opts["enable_cuda_graph"] == "1" and opts["use_tf32"] == "0"
    assert parse_ep_options(["use_tf32=1", "cudnn_conv_use_max_workspace=0"]) == {
        "use_tf32": "1", "cudnn_conv_use_max_workspace": "0"}
    for bad, message in [("gpu_mem_limit=1", "KEY one of"), ("prefer_nhwc", "KEY=VALUE"),
                         ("use_tf32=yes", "use_tf32 takes one of 0, 1"),
                         ("fuse_conv_bias=1", "KEY one of")]:  # NaN logits on the H200: not offered
        with pytest.raises(UserError, match=message):
            parse_ep_options([bad])
    with pytest.raises(UserError, match="prefer_nhwc=2"):
        OrtRunner("m.onnx", META, "cuda", ep_options={"prefer_nhwc": "2"})
    with OrtRunner("m.onnx", META, "cuda", ep_options={"prefer_nhwc": "1", "use_tf32": "0"}) as runner:
        assert FakeSession.last.cuda_options["prefer_nhwc"] == "1"
        assert FakeSession.last.cuda_options["use_tf32"] == "0"  # strict FP32 on request
        assert FakeSession.last.cuda_options["cudnn_conv_algo_search"] == "HEURISTIC"  # the default stays
        assert runner.info.details["cuda_ep"]["prefer_nhwc"] == "1"


def test_fp16_io_models_get_buffers_of_their_own_dtype(ort, monkeypatch):
    monkeypatch.setattr(FakeSession, "io_dtype", np.float16)
    session = FakeSession("m.onnx", None, [("CUDAExecutionProvider", {})])
    io = FixedIoBinding(session)
    slot = io.host_slot({"query_img": (1, 3, 16, 16), "support_imgs": (1, 1, 3, 16, 16),
                         "support_masks": (1, 1, 16, 16)})
    assert slot.inputs["query_img"].array.dtype == np.float16
    assert slot.outputs["logits"].array.dtype == np.float32


@pytest.mark.skipif(not torch.cuda.is_available() or "CUDAExecutionProvider" not in available_providers(),
                    reason=NO_GPU)
def test_real_cuda_graph_and_device_io_agree_with_host_io(exported):
    from hsnet_deploy.runtime.artifact import open_artifact

    path, _, _ = exported("resnet50")
    with open_artifact(path, "cuda") as plain, open_artifact(path, "cuda", cuda_graph=True) as graph:
        for b, k in ((1, 1), (2, 2), (1, 1)):
            for seed in range(3):
                feed = random_feed(b, k, 64, seed=seed)
                ref = plain.infer(feed)
                out = graph.infer(feed)
                dev = graph.infer_device({n: torch.from_numpy(v).cuda() for n, v in feed.items()})
                scale = np.abs(ref["logits"]).max()
                assert np.abs(out["logits"] - ref["logits"]).max() <= 1e-4 * scale
                assert np.abs(dev["logits"].cpu().numpy() - ref["logits"]).max() <= 1e-4 * scale


def test_device_io_latency_times_infer_device_with_the_episode_already_on_the_device(ort):
    from hsnet_deploy.runtime.bench import device_io_latency

    with OrtRunner("m.onnx", META, "cuda", cuda_graph=True) as runner:
        runner.fixed_io.tensor_device = "cpu"
        runs_before = FakeOrtValue.counters.runs
        lat = device_io_latency(runner, _feed(1, 1, 0), iters=5, warmup=2, device="cpu")
        assert FakeOrtValue.counters.runs - runs_before == 7
        assert set(lat) >= {"p50", "mean"} and 0 < lat["min"] <= lat["p50"] <= lat["max"]
        assert [s.key[0] for s in runner.fixed_io.slots.values()] == ["device"]  # no host buffers were made


def test_capture_refusal_still_speaks_when_the_placement_run_fails(ort, monkeypatch):
    monkeypatch.setattr(FakeSession, "cpu_nodes", True)

    def broken(self, binding, run_options=None):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(FakeSession, "run_with_iobinding", broken)
    with pytest.raises(UserError, match="cannot capture this model in a CUDA graph") as info, \
            OrtRunner("m.onnx", META, "cuda", cuda_graph=True):
        pass
    assert "outside the CUDA EP" not in str(info.value) and "run it without --cuda-graph" in str(info.value)


def test_nodes_off_cuda_reads_a_profile_once_per_node_in_run_order():
    from hsnet_deploy.runtime.ort_cuda import SHOWN_NODES, capture_refusal, nodes_off_cuda

    events = [{"cat": "Session", "name": "session_initialization", "args": {}}]
    for i in range(12):
        provider = "CUDAExecutionProvider" if i % 3 else "CPUExecutionProvider"
        for suffix in ("_fence_before", "_kernel_time", "_fence_after"):
            events.append({"cat": "Node", "name": f"n{i}{suffix}", "args": {"op_name": f"Op{i}", "provider": provider}})
    events.append({"cat": "Node", "name": "n0_kernel_time", "args": {"op_name": "Op0", "provider": "CPUExecutionProvider"}})
    assert nodes_off_cuda(events) == ["n0 (Op0)", "n3 (Op3)", "n6 (Op6)", "n9 (Op9)"]
    many = [f"m{i} (Gather)" for i in range(SHOWN_NODES + 3)]
    message = str(capture_refusal("a.onnx", RuntimeError("refused"), many))
    assert f"m{SHOWN_NODES - 1} (Gather) and 3 more;" in message and f"m{SHOWN_NODES} " not in message


def test_capture_refusal_lists_exactly_shown_nodes_without_a_more_tail():
    """SHOWN_NODES names fit in full: no "and 0 more" (one more name is what earns the tail)."""
    from hsnet_deploy.runtime.ort_cuda import SHOWN_NODES, capture_refusal

    names = [f"n{i} (Gather)" for i in range(SHOWN_NODES)]
    message = str(capture_refusal("a.onnx", RuntimeError("refused"), names))
    assert f"outside the CUDA EP: {', '.join(names)}; run it without" in message
    assert "more" not in message
    message = str(capture_refusal("a.onnx", RuntimeError("refused"), [*names, "extra (Shape)"]))
    assert f"n{SHOWN_NODES - 1} (Gather) and 1 more;" in message and "extra" not in message


def test_nodes_off_cuda_ignores_kernel_events_that_name_no_provider():
    """A kernel event without a provider says nothing about placement: only a named non-CUDA EP counts."""
    from hsnet_deploy.runtime.ort_cuda import nodes_off_cuda

    events = [{"cat": "Node", "name": "a_kernel_time", "args": {"op_name": "Conv"}},
              {"cat": "Node", "name": "b_kernel_time", "args": {"op_name": "Relu", "provider": None}},
              {"cat": "Node", "name": "c_kernel_time"},
              {"cat": "Node", "name": "d_kernel_time", "args": {"op_name": "Shape", "provider": "CPUExecutionProvider"}}]
    assert nodes_off_cuda(events) == ["d (Shape)"]


def test_a_failed_first_run_without_a_graph_is_not_called_a_capture_refusal(ort, monkeypatch):
    """Without --cuda-graph nothing is captured: ONNX Runtime's own error goes up as it is."""
    with OrtRunner("m.onnx", META, "cuda") as runner:
        def broken(binding, options=None):
            raise RuntimeError("CUDA out of memory")

        monkeypatch.setattr(runner.session, "run_with_iobinding", broken)
        with pytest.raises(RuntimeError, match="CUDA out of memory") as info:
            runner.infer(_feed(1, 1, 0))
        assert not isinstance(info.value, UserError)
