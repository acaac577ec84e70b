"""Load on `hsnet-deploy serve` over loopback: concurrent clients against the CLI's service (local Ray), for
each replica count and with batching on and off; requests/s, p50 / p99 latency, errors, and the server's
memory (PSS of the whole process tree: CLI, Ray's daemons, replicas) before and after. `hsnet-deploy bench`
runs on the same artifact in the same run, so the serving overhead is the gap between the two.

Loopback only (127.0.0.1) and bounded: each cell stops at --duration seconds or --max-requests requests.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image
from record import md_table, record

from hsnet_deploy.defaults import default_artifact

ROOT = Path(__file__).resolve().parents[1]


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of `pid` and all its descendants (shared pages split, not double counted)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def episode_files(seed: int = 0) -> tuple[bytes, bytes, bytes]:
    """A 480x360 support image with an elliptic mask, and a 500x375 query (VOC-like sizes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:360, :480]
    mask = (((yy - 180) / 120) ** 2 + ((xx - 240) / 150) ** 2 <= 1).astype(np.uint8) * 255
    return (png(rng.integers(0, 255, (360, 480, 3), dtype=np.uint8)), png(mask),
            png(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)))


class Server:
    """`hsnet-deploy serve` in a child process (a local Ray, no --address), stopped with SIGINT."""

    def __init__(self, artifact: Path, replicas: int, max_batch: int, threads: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "hsnet_deploy", "serve", str(artifact), "--host", "127.0.0.1", "--port",
               str(self.port), "--replicas", str(replicas), "--max-batch", str(max_batch), "--threads", str(threads),
               "--batch-wait-ms", "10"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.log = log
        with open(log, "w") as sink:
            self.proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=10).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(2)
        raise RuntimeError(f"serve not ready in {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def load(url: str, set_id: str, query: bytes, clients: int, duration: float, max_requests: int) -> dict:
    latencies, errors, lock = [], {}, threading.Lock()
    budget = [max_requests]
    start = time.monotonic()
    deadline = start + duration

    def client():
        session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            t0 = time.perf_counter()
            try:
                reply = session.post(f"{url}/segment", files={"image": ("q.png", query, "image/png")},
                                     data={"support_set": set_id}, timeout=max(300.0, 2 * duration))
                status = reply.status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            elapsed = time.perf_counter() - t0
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    lat = sorted(latencies)
    pct = (lambda q: 1000 * lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: None)
    return {"clients": clients, "ok": len(lat), "errors": errors, "seconds": wall,
            "requests_per_s": len(lat) / wall, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "mean_ms": 1000 * statistics.fmean(lat) if lat else None}


def bench_throughput(artifact: Path, batch: int, iters: int) -> dict:
    """`hsnet-deploy bench` on the same artifact (the product's own figure), B = batch, K = 1."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "hsnet_deploy", "bench", str(artifact), "--batch", str(batch),
                        "--iters", str(iters), "--warmup", "1", "--device", "cpu", "--no-stages", "--json", str(out)],
                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        result = json.loads(out.read_text())["results"][0]
    return {"batch": batch, "episodes_per_s": result["episodes_per_s"], "p50_ms": result["latency_ms"]["p50"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact", nargs="?", type=Path, help="[default: the embedded resnet50 at --size]")
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--max-batch", type=int, default=8, help="Batch size with batching on (off = 1).")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds per cell.")
    parser.add_argument("--max-requests", type=int, default=2000, help="Requests per cell at most.")
    parser.add_argument("--bench-iters", type=int, default=8)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the replicas.")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    artifact = (args.artifact or default_artifact(args.size)).resolve()
    support, mask, query = episode_files()
    rows, cells = [], []
    for replicas in [int(r) for r in args.replicas.split(",")]:
        for batch in (args.max_batch, 1):
            threads = max(1, args.cores // replicas)
            with tempfile.TemporaryDirectory() as tmp:
                for attempt in range(3):  # Ray gives its raylet 30 s to register: a busy machine can miss that
                    server = Server(artifact, replicas, batch, threads, Path(tmp) / "serve.log")
                    try:
                        server.wait_ready()
                        break
                    except RuntimeError as exc:
                        server.stop()
                        print(f"start {attempt + 1} failed: {str(exc)[-300:]}", flush=True)
                else:
                    raise RuntimeError("serve did not start in 3 attempts")
                try:
                    reply = requests.post(f"{server.url}/support-sets", timeout=120, files=[
                        ("image", ("s.png", support, "image/png")), ("mask", ("m.png", mask, "image/png"))])
                    set_id = reply.json()["id"]
                    load(server.url, set_id, query, 2, 15, 4)  # warm every replica
                    mem_before = tree_pss_mb(server.proc.pid)
                    for clients in [int(c) for c in args.clients.split(",")]:
                        cell = {"replicas": replicas, "max_batch": batch, "threads_per_replica": threads,
                                **load(server.url, set_id, query, clients, args.duration, args.max_requests)}
                        cell["server_pss_mb_before"] = mem_before
                        cell["server_pss_mb_after"] = tree_pss_mb(server.proc.pid)
                        cells.append(cell)
                        print(json.dumps(cell), flush=True)
                        rows.append([replicas, f"on (B<={batch})" if batch > 1 else "off", clients,
                                     cell["requests_per_s"], cell["p50_ms"], cell["p99_ms"],
                                     sum(cell["errors"].values()), cell["server_pss_mb_before"],
                                     cell["server_pss_mb_after"]])
                finally:
                    server.stop()
    benches = [bench_throughput(artifact, b, args.bench_iters) for b in (1, args.max_batch)]
    result = {"artifact": str(artifact), "cells": cells, "bench": benches, "duration_s": args.duration}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    body = md_table(["replicas", "batching", "clients", "requests/s", "p50 ms", "p99 ms", "errors",
                     "server MB before", "server MB after"], rows)
    bench_rows = [[f"bench B={b['batch']} K=1 (onnxruntime-cpu)", b["episodes_per_s"], b["p50_ms"]] for b in benches]
    body += "\n\n" + md_table(["same runner, `hsnet-deploy bench`", "episodes/s", "p50 ms per call"], bench_rows)
    body += ("\n\nErrors are non-200 answers and client-side timeouts, per cell. "
             f"{Path(artifact).name}, K = 1, query 500x375 PNG, support 480x360; {args.duration:.0f} s or "
             f"{args.max_requests} requests per cell; replicas share {args.cores} CPU threads; server memory is the "
             "PSS of the serve process tree (CLI, Ray daemons, replicas) after warm-up and after the cell.")
    if not args.no_record:
        record("serve-load", "Serving: hsnet-deploy serve under load (Ray Serve, loopback)", body)


if __name__ == "__main__":
    main()
