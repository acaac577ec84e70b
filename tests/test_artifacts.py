"""Atomic writes and output path checks (artifacts.py): what a user finds on disk after a write, a failure or a stop."""

import json
import os
import stat

import pytest

from hsnet_deploy.artifacts import atomic_path, check_output_path, write_json_atomic
from hsnet_deploy.errors import UserError


def test_write_json_atomic_writes_sorted_indented_json_with_a_final_newline(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    text = path.read_text()
    assert text == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, stop):
    """Ctrl-C and SIGTERM arrive as KeyboardInterrupt (BaseException, not Exception): they too remove the temporary."""
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(stop), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise stop
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_writer_that_replaces_the_temporary_file_still_gets_the_umask_mode(tmp_path):
    """Exporters write the temporary path themselves (a new file of mode 0600, like mkstemp's): the result still
    follows the umask."""
    old = os.umask(0o022)
    try:
        path = tmp_path / "out.bin"
        with atomic_path(path) as tmp:
            tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"x")
            os.close(fd)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_check_output_path_refusals(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="is a directory, expected an output file path"):
        check_output_path(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "m.onnx")
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a file, not a directory"):
        check_output_path(tmp_path / "f" / "m.onnx")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    with pytest.raises(UserError, match="is not writable"):
        check_output_path(tmp_path / "m.onnx")
    monkeypatch.undo()
    assert check_output_path(tmp_path / "m.onnx") == tmp_path / "m.onnx"
