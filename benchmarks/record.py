"""Write a benchmark's figures into docs/benchmarks.md, replacing that benchmark's previous section.

Each section carries the command, the machine and the date, as docs/benchmarks.md promises.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    import torch

    from hsnet_deploy.machine import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def record(name: str, title: str, body: str) -> None:
    """Replace (or append) the section between <!-- name --> markers."""
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"<!-- {name} -->\n## {title}\n\n- command: `{command}`\n- machine: {machine()}\n- date: {stamp}\n\n"
               f"{body.strip()}\n<!-- /{name} -->")
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nFigures measured by `benchmarks/`; ratios are " \
        "measured in the same run (these machines are shared and noisy).\n"
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.DOTALL)
    text = pattern.sub(lambda _m: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    DOC.parent.mkdir(exist_ok=True)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)
    print(section)


def md_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
