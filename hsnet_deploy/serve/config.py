"""The service's settings, in a module without Ray so the CLI can check them before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Everything the deployments need, picklable (Ray ships it to each replica)."""

    artifact: str
    device: str = "auto"
    backbone: str | None = None
    threads: int | None = None
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_shots: int = 10
    max_sets: int = 1000
    max_store_mb: float = 512.0
    max_upload_mb: float = 20.0
    max_pixels: int = 4096 * 4096
