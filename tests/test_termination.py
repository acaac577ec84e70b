"""SIGTERM (timeout, a scheduler, docker stop) takes Ctrl-C's paths: temporary files go, partial figures stay."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import click
import pytest
from conftest import EXPORT_SIZE, run_cli


def _sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # the handler runs at the next bytecode; this stands in for work that goes on


def test_sigterm_during_export_removes_its_temporary_export_and_exits_143(tmp_path, monkeypatch):
    from hsnet_deploy.export import onnx_export

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen = []

    def trace_then_stop(model, path, *a, **k):
        path.write_bytes(b"partial")  # what a trace leaves in the temporary folder
        seen.append(path.parent.parent == scratch)
        _sigterm_self()
        raise AssertionError("SIGTERM did not interrupt the export")

    monkeypatch.setattr(onnx_export, "_trace", trace_then_stop)
    before = signal.getsignal(signal.SIGTERM)
    target = tmp_path / "m.onnx"
    code, _, err = run_cli("export", "--backbone", "resnet50", "--img-size", str(EXPORT_SIZE), "-o", str(target))
    assert seen == [True]
    assert code == 143 and "Terminated (SIGTERM)." in err and "Traceback" not in err
    assert list(scratch.iterdir()) == [] and not target.exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the entry point puts the previous handler back


def test_sigterm_during_bench_keeps_what_was_measured(exported, tmp_path, monkeypatch):
    from hsnet_deploy.runtime.ort_runner import OrtRunner

    path, _, _ = exported("resnet50")
    calls = {"n": 0}
    real = OrtRunner.infer_impl

    def infer_then_stop(self, feed):
        out = real(self, feed)
        calls["n"] += 1
        if calls["n"] == 4:  # cold call, one warm-up, one timed call, and the stop inside the second
            _sigterm_self()
        return out

    monkeypatch.setattr(OrtRunner, "infer_impl", infer_then_stop)
    report = tmp_path / "bench.json"
    code, _, err = run_cli("bench", str(path), "--iters", "5", "--warmup", "2", "--no-stages",
                             "--json", str(report))
    assert code == 143, err
    assert "measured before the stop" in " ".join(err.split())
    rows = {r["label"]: r for r in json.loads(report.read_text())["results"]}
    assert rows["pytorch-cpu fp32"]["iters"] == 5
    assert rows["onnxruntime-cpu fp32"]["iters"] == 1 and rows["onnxruntime-cpu fp32"]["note"] == "interrupted"


def test_ctrl_c_still_exits_130(monkeypatch):
    from hsnet_deploy import cli

    def interrupted(*a, **k):
        raise click.exceptions.Abort() from KeyboardInterrupt()  # what click makes of Ctrl-C

    monkeypatch.setattr(cli.cli, "main", interrupted)
    code, _, err = run_cli("bench")
    assert code == 130 and "Aborted." in err and "Terminated" not in err


def test_a_real_sigterm_cleans_up_a_running_export(tmp_path):
    """The signal from outside, as `timeout` sends it, while the export's temporary folder exists."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    target = tmp_path / "m.onnx"
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "hsnet_deploy", "export", "--backbone", "resnet50",
                             "--img-size", str(EXPORT_SIZE), "-o", str(target)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not any(p.name.startswith("hsnet-export-") for p in scratch.iterdir()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the export never made its temporary folder: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Terminated (SIGTERM)." in err and "Traceback" not in err
    assert not any(p.name.startswith("hsnet-export-") for p in scratch.iterdir())
    assert not target.exists()


def test_a_stop_while_the_default_exports_lets_the_export_child_clean_up(tmp_path, monkeypatch):
    """bench's embedded default is exported by a child process: a stop sends it SIGTERM (its own cleanup runs),
    not the SIGKILL subprocess.run would send, and waits for it."""
    import subprocess

    from hsnet_deploy import defaults
    from hsnet_deploy.termination import Terminated

    events = []

    class Child:
        def __init__(self, cmd, **kwargs):
            events.append("start")

        def wait(self, timeout=None):
            if events == ["start"]:
                events.append("stop arrives")
                raise Terminated
            events.append(f"wait {timeout}")
            return -signal.SIGTERM

        def terminate(self):
            events.append("terminate")

        def kill(self):
            events.append("kill")

    monkeypatch.setattr(defaults, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(subprocess, "Popen", Child)
    with pytest.raises(KeyboardInterrupt):
        defaults.default_artifact(64)
    assert events == ["start", "stop arrives", "terminate", "wait 60"]


def test_sigterm_during_eval_says_where_the_state_is_and_exits_143(exported, tmp_path, monkeypatch):
    from synthetic_datasets import make_fss

    from hsnet_deploy.data import evaluate as evaluate_module

    model, _, _ = exported("resnet50")
    root = make_fss(tmp_path / "data")

    def stopped(*a, **k):
        _sigterm_self()
        raise AssertionError("SIGTERM did not interrupt eval")

    monkeypatch.setattr(evaluate_module, "evaluate", stopped)
    state = tmp_path / "state.json"
    code, _, err = run_cli("eval", str(model), "--dataset", "fss", "--data-root", str(root), "--state", str(state))
    text = " ".join(err.split())
    assert code == 143 and f"saved in {state}" in text and "--resume" in text and "Traceback" not in text


def _stop_swallowed(signum):
    """A stop raised where library code catches it: torch's tracer, interrupted in a lazy import, turned it into
    an error of its own and its exporter carried on (seen with SIGTERM 8-9 s into an export)."""
    try:
        os.kill(os.getpid(), signum)
        time.sleep(0.5)
    except BaseException:  # noqa: BLE001, S110 - the swallowing under test
        pass


@pytest.mark.parametrize("signum,code,said", [(signal.SIGTERM, 143, "Terminated (SIGTERM)."),
                                              (signal.SIGINT, 130, "Interrupted.")])
@pytest.mark.parametrize("then", ["carries on", "raises its own error"])
def test_a_stop_swallowed_inside_the_tracer_still_ends_the_export(tmp_path, monkeypatch, signum, code, said, then):
    from hsnet_deploy.export import onnx_export

    def trace(model, path, *a, **k):
        _stop_swallowed(signum)
        if then == "raises its own error":
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'")
        path.write_bytes(b"what the tracer wrote")

    monkeypatch.setattr(onnx_export, "_trace", trace)
    target = tmp_path / "m.onnx"
    status, _, err = run_cli("export", "--backbone", "resnet50", "--img-size", str(EXPORT_SIZE), "-o", str(target))
    assert status == code and said in err and "Internal error" not in err and "Traceback" not in err
    assert not target.exists() and "[2/4]" not in err  # stopped at the next step, not after it


def test_a_command_that_ran_on_after_a_swallowed_stop_exits_as_stopped(monkeypatch):
    from hsnet_deploy import info

    real = info.environment

    def environment():
        _stop_swallowed(signal.SIGTERM)
        return real()

    monkeypatch.setattr(info, "environment", environment)
    code, _, err = run_cli("info")
    assert code == 143 and "Terminated (SIGTERM)." in err


def test_a_second_sigterm_does_not_interrupt_the_cleanup_of_the_first():
    """`timeout` and a supervisor may both signal: the first SIGTERM stops the work, the second must not break into
    the cleanup that follows (temporary exports would be left behind)."""
    from hsnet_deploy.termination import Terminated, sigterm_as_interrupt

    cleaned = False
    with sigterm_as_interrupt() as state:
        try:
            _sigterm_self()
            raise AssertionError("the first SIGTERM did not stop the work")
        except Terminated:
            try:
                _sigterm_self()  # a second one, during the cleanup
            except Terminated:
                pytest.fail("the second SIGTERM broke into the cleanup")
            cleaned = True
    assert cleaned and state.received


def test_signal_handlers_and_recorded_stops_last_only_as_long_as_the_block():
    """Inside: SIGTERM and Ctrl-C are ours, a recorded Ctrl-C is raised again as KeyboardInterrupt (not Terminated).
    After: Python's own handlers are back and a stop recorded inside raises nothing any more."""
    from hsnet_deploy.termination import Terminated, raise_if_stopped, sigterm_as_interrupt

    saved_int, saved_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with sigterm_as_interrupt() as state:
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            raise_if_stopped()  # nothing recorded yet
            state.interrupted = True
            with pytest.raises(KeyboardInterrupt) as caught:
                raise_if_stopped()
            assert not isinstance(caught.value, Terminated)
            state.received = True
            with pytest.raises(Terminated):
                raise_if_stopped()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is saved_term
        try:
            raise_if_stopped()  # the block's stops ended with it
        except KeyboardInterrupt:
            pytest.fail("a stop recorded inside the block was raised after it")
    finally:
        signal.signal(signal.SIGINT, saved_int)


def test_a_sigint_handler_someone_else_set_is_left_alone():
    from hsnet_deploy.termination import sigterm_as_interrupt

    def mine(_signum, _frame):
        pass

    saved = signal.signal(signal.SIGINT, mine)
    try:
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGINT) is mine
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, saved)
