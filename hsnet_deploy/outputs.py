"""Output-path safety, checked before any work: no command writes over one of its inputs or over another
of its own outputs, and every output's folder exists and is writable.

Paths are compared resolved (symlinks followed) and, where both exist, by inode, so `./m.onnx`,
`dir/../m.onnx` and a hard link all count as the same file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from hsnet_deploy.artifacts import check_output_path
from hsnet_deploy.errors import UserError

Labelled = Sequence[tuple[str, "str | os.PathLike | None"]]


def path_key(path: str | os.PathLike) -> tuple:
    """Identity of a file: its inode where it exists (hard links, symlinks), else its resolved path."""
    p = Path(path)
    try:
        st = p.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(p.resolve()))


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return path_key(a) == path_key(b)


def check_outputs(outputs: Labelled, inputs: Labelled = (), check_folders: bool = True) -> list[Path]:
    """Refuse, with `Error:` naming the path and both roles, any output that is an input or another output,
    or whose folder is missing or read-only. `outputs`/`inputs`: (option name, path or None) pairs."""
    given = [(label, Path(p)) for label, p in outputs if p]
    if check_folders:
        for label, path in given:
            try:
                check_output_path(path)
            except UserError as exc:
                raise UserError(f"{exc} ({label})") from None
    sources = {path_key(p): label for label, p in inputs if p and not Path(p).is_dir()}
    seen: dict[tuple, str] = {}
    for label, path in given:
        key = path_key(path)
        if key in sources:
            raise UserError(f"{path}: {label} would write over the input {sources[key]}; choose another path")
        if key in seen:
            raise UserError(f"{path}: given as both {seen[key]} and {label}; each output needs its own path")
        seen[key] = label
    return [p for _, p in given]


def check_output_folder(folder: str | os.PathLike, label: str, inputs: Labelled = ()) -> Path:
    """A folder to fill with outputs: an existing writable directory, or one that can be created; never one
    of the input folders (its files would be replaced by, or mixed with, the outputs)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: {label} must be a folder here, and this is a file")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{path}: {label}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "folder" if existing == path else f"folder {existing} (to create {path} in)"
        raise UserError(f"{path}: {label}: {what} is not writable")
    for in_label, source in ((lab, Path(p)) for lab, p in inputs if p):
        if source.is_dir() and same_path(path, source):
            raise UserError(f"{path}: {label} is the {in_label} folder; its files would be replaced by or mixed "
                            "with the outputs; choose another folder")
    return path


def unique_names(sources: Iterable[Path], suffix: str) -> dict[Path, str]:
    """Source file -> output file name with `suffix`, one distinct name per source.

    `a.jpg` -> `a.png`; when two sources share a stem (`a.jpg`, `a.png`), each keeps its extension in the
    name (`a.jpg.png`, `a.png.png`), so no output replaces another.
    """
    sources = list(sources)
    stems: dict[str, int] = {}
    for s in sources:
        stems[s.stem.lower()] = stems.get(s.stem.lower(), 0) + 1
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for s in sources:
        name = f"{s.stem}{suffix}" if stems[s.stem.lower()] == 1 else f"{s.name}{suffix}"
        base, n = name, 1
        while name.lower() in taken:  # e.g. `a.png.png` given as a source too
            n += 1
            name = f"{Path(base).stem}-{n}{suffix}"
        taken.add(name.lower())
        names[s] = name
    return names
