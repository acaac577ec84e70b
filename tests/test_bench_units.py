"""bench's arithmetic on fake runners with scripted call times: throughput per batch, warm-up count, the
speedup and GFLOP/s ratios, and the CLI's refusal of empty runs, each checked against hand-worked values."""

import pytest
from conftest import run_cli

from hsnet_deploy.runtime import suite as suite_mod
from hsnet_deploy.runtime.base import Runner, RunnerInfo
from hsnet_deploy.runtime.bench import bench_runner, random_feed


class ScriptedRunner(Runner):
    """Records the scripted seconds of each call in `inference_times` instead of timing it."""

    fixed_image_size = False

    def __init__(self, seconds, backend="onnxruntime", precision="fp32"):
        super().__init__()
        self.script = list(seconds)
        self.calls = 0
        self.info = RunnerInfo(backend, "cpu", precision, "", {}, backbone="resnet50")

    def infer(self, feed):
        self.inference_times.append(self.script[self.calls])
        self.calls += 1
        return {}

    def infer_impl(self, feed):  # pragma: no cover - infer is replaced
        return {}


def test_bench_runner_counts_the_cold_call_as_the_first_warm_up_and_gives_episodes_per_second():
    feed = random_feed(4, 1, 16)
    # call 1 cold (1 s), call 2 the one further warm-up, calls 3-4 timed at 0.1 s and 0.3 s
    runner = ScriptedRunner([1.0, 0.5, 0.1, 0.3])
    res = bench_runner(runner, feed, iters=2, warmup=2)
    assert runner.calls == 4 and res.iters == 2
    assert res.cold_ms == pytest.approx(1000.0)
    assert res.times_ms == pytest.approx([100.0, 300.0])
    # 4 episodes a call, 0.2 s a call on average: 20 episodes/s
    assert res.episodes_per_s == pytest.approx(20.0)


def test_suite_speedup_is_baseline_over_runner_and_gflops_counts_the_whole_batch(monkeypatch):
    eager = ScriptedRunner([0.4] * 3, backend="pytorch")
    fast = ScriptedRunner([0.1] * 3)
    monkeypatch.setattr(suite_mod, "plan_runners", lambda *a: ([eager, fast], [], "resnet50", 16))
    monkeypatch.setattr(suite_mod, "matmul_gflops", lambda: 1.0)
    monkeypatch.setattr(suite_mod, "episode_flops", lambda model, feed: 6e9)  # one call of a batch of 2
    monkeypatch.setattr(Runner, "flop_model", lambda self: object())
    s = suite_mod.run_suite([], batch=2, shots=1, iters=2, warmup=1, device="cpu", threads=None, backbone=None,
                            stages=False, cuda_graph=False, default=False)
    assert s.episode_gflop == pytest.approx(3.0)  # 6 GFLOP per call / 2 episodes
    eager_res, fast_res = s.results
    assert eager_res.speedup_vs_eager == pytest.approx(1.0)
    assert fast_res.speedup_vs_eager == pytest.approx(4.0)  # 0.4 s / 0.1 s
    # 3 GFLOP x 2 episodes in 0.1 s and in 0.4 s
    assert fast_res.gflop_per_s == pytest.approx(60.0)
    assert eager_res.gflop_per_s == pytest.approx(15.0)
    assert fast_res.episodes_per_s == pytest.approx(20.0)


@pytest.mark.parametrize("option", [("--batch", "0"), ("--shots", "0"), ("--iters", "0"), ("--warmup", "-1")])
def test_bench_refuses_empty_runs_before_opening_anything(option, tmp_path, monkeypatch):
    monkeypatch.setattr(suite_mod, "run_suite", lambda *a, **k: pytest.fail("bench ran with " + " ".join(option)))
    code, _, err = run_cli("bench", str(tmp_path / "missing.onnx"), *option)
    assert code == 2 and "must be at least 1, --warmup at least 0" in err
