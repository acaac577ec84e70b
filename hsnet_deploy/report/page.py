"""A report folder: index.html, the PNGs it shows and the run's JSON, written all at once.

The page is plain HTML with inline CSS, no scripts and no remote resources, so it opens from disk with
no server and no network. The folder is built under a temporary name beside the target and renamed into
place, so an interrupted run leaves the previous report (or none), never half of one.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from hsnet_deploy.errors import UserError

CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}img{max-width:100%;border:1px solid #eee}
p.q{color:#555;font-style:italic;margin:.2em 0 .6em}"""


# Every file a report writes (report/__init__.py): a report replaces its whole folder, so a folder holding anything
# else is refused rather than emptied.
REPORT_FILES = frozenset({"index.html", "bench.json", "eval.json", "latency.png", "stages.png", "speedup.png",
                          "gflops.png", "class_iou.png", "fb_iou.png", "episodes_worst.png", "episodes_best.png"})
TITLE_MARK = "<title>hsnet-deploy "  # how every report's page begins (Page.write)


def check_report_dir(path: str | os.PathLike, outputs: Sequence[tuple[str, str | None]] = ()) -> Path:
    """Refuse, before any work, a report folder that could not be written or whose replacement would delete
    something that is not a report: other files in it, or the command's other outputs (`outputs`: option, path)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--report {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not _holds_report(out):
            raise UserError(f"--report {out}: folder is not empty and holds no earlier report; choose another")
        foreign = sorted(e.name + ("/" if e.is_dir() else "") for e in out.iterdir()
                         if not (e.is_file() and e.name in REPORT_FILES))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UserError(f"--report {out}: besides an earlier report the folder holds {shown}, which replacing "
                            "the report would delete; move them or choose another folder")
    for label, other in outputs:
        if other and _inside(Path(other), out):
            raise UserError(f"{label} {other}: inside the --report folder {out}, which the report replaces as a "
                            "whole; choose a path outside it")
    ancestor = out.parent  # missing folders above the report are made when it is written
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--report {out}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK):
        raise UserError(f"--report {out}: folder {ancestor} is not writable")
    return out


def _holds_report(folder: Path) -> bool:
    try:
        with open(folder / "index.html", encoding="utf-8", errors="replace") as fh:
            return TITLE_MARK in fh.read(4096)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


@contextlib.contextmanager
def report_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    out = check_report_dir(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a report is for others to read too
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "report")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Page:
    """Sections of headings, questions, figures and small tables, rendered to one HTML file."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def question(self, text: str) -> None:
        self.parts.append(f'<p class="q">{html.escape(text)}</p>')

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def figure(self, filename: str, alt: str) -> None:
        self.parts.append(f'<p><img src="{html.escape(filename)}" alt="{html.escape(alt)}"></p>')

    def link(self, filename: str, text: str) -> None:
        self.parts.append(f'<p><a href="{html.escape(filename)}">{html.escape(text)}</a></p>')

    def facts(self, pairs: list[tuple[str, object]]) -> None:
        """A two-column table of what the run was: date, machine, versions, settings."""
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)
        self.parts.append(f'<table class="facts">{rows}</table>')

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def write(self, folder: Path) -> None:
        doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
               f"<style>{CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}"
               "</body></html>\n")
        (folder / "index.html").write_text(doc, encoding="utf-8")


def write_json(folder: Path, name: str, obj: object) -> None:
    (folder / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
