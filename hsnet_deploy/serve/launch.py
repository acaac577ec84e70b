"""Start or join Ray, deploy the application on Ray Serve's HTTP proxy, and keep it up until Ctrl-C or SIGTERM.

Without an address a local Ray is started (and stopped on exit); with one, the application is deployed on that
cluster and removed from it on exit, leaving the cluster itself running.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

from hsnet_deploy.errors import UserError

APP_NAME = "hsnet"
SERVE_EXTRA = 'Ray Serve is not installed: pip install -e ".[serve]" (or pip install "ray[serve]" python-multipart)'


def import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError(SERVE_EXTRA) from None
    return ray, serve


def check_port_free(host: str, port: int) -> None:
    """Fail now, with a clear message, rather than after Ray's start-up when the proxy cannot bind."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """An address that names a host and port (head:6379, ray://head:10001) must answer a TCP connection: Ray's own
    client retries an unreachable one for minutes, printing C++ warnings, with no error at the end."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # `auto` and other forms Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)
        raise UserError(f"--address {address}: nothing answers at {host}:{port} ({reason}); start the Ray cluster's "
                        "head there, or leave --address out for a local Ray") from None


def check_resources(cluster: dict, replicas: int, cpus: float, gpus_per_replica: float, local: bool) -> str | None:
    """Ray Serve waits, silently and for ever, until every replica's CPUs and GPUs are free somewhere. On a local Ray
    nothing will add them, so a shortfall is an Error now; a cluster's autoscaler may add nodes, so there it is a
    note (returned) and the start waits."""
    needs = [("CPU", replicas * cpus, f"--replicas {replicas} x {cpus:g} CPU each (--threads)"),
             ("GPU", replicas * gpus_per_replica, f"--replicas {replicas} x --gpus-per-replica {gpus_per_replica:g}")]
    for resource, need, why in needs:
        have = float(cluster.get(resource, 0.0))
        if need > have + 1e-9:
            what = f"{why} needs {need:g} {resource}s; {'this machine' if local else 'the cluster'} has {have:g}"
            if local:
                raise UserError(f"{what}; lower --replicas or --threads, or join a larger cluster with --address")
            return f"{what} now: the replicas start once the cluster has them (its autoscaler, or more nodes)"
    return None


def run_service(config, *, host: str, port: int, replicas: int, gpus_per_replica: float, address: str | None,
                say: Callable[[str], None], stop_after_s: float | None = None) -> None:
    """Deploy and block. `stop_after_s` (tests, benchmarks) stops the service after that long."""
    ray, serve = import_ray()
    try:
        import multipart  # noqa: F401 - Starlette's form parser
    except ImportError:
        raise UserError(SERVE_EXTRA) from None
    from hsnet_deploy.serve.app import build_app

    if address is None:
        check_port_free(host, port)
    else:
        check_address(address)
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    try:
        context = ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False,
                           log_to_driver=False, configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"--address {address}: cannot join the Ray cluster ({exc})") from None
    finally:
        # Ray's core worker puts its own C-level SIGTERM handler in place (a stack dump, then abort: exit 134);
        # the Python one (the entry point's, termination.py) goes back, so SIGTERM stops the service cleanly.
        if threading.current_thread() is threading.main_thread() and sigterm_handler is not None:
            signal.signal(signal.SIGTERM, sigterm_handler)
    say(f"Ray: {'joined cluster ' + address if address else 'local instance'} at {context.address_info['gcs_address']}")
    # Ctrl-C, and SIGTERM as the entry point turns it into one (termination.py), end the loop below through
    # KeyboardInterrupt: the service is stopped, then the interrupt goes on to the entry point, whose exit
    # status (130, 143) tells a supervisor the service was stopped, not that it finished.
    # Serve's driver-side logger says INFO lines of its own start ("Started Serve", "Connecting to existing Serve
    # app ... will not be applied", the latter about serve.run's defaults, not ours); the `say` lines tell it.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        cpus = float(config.threads or 1)
        note = check_resources(ray.cluster_resources(), replicas, cpus, gpus_per_replica, local=address is None)
        if note:
            say(f"note: {note}")
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        try:
            serve.run(build_app(config, replicas, gpus_per_replica, cpus), name=APP_NAME, route_prefix="/",
                      logging_config={"log_level": "WARNING"})
        except RuntimeError as exc:
            raise UserError(f"{config.artifact}: the deployment did not start ({str(exc).splitlines()[0]})") from None
        say(f"Serving {config.artifact} on http://{host}:{port} ({replicas} replica(s), batches of up to "
            f"{config.max_batch}); Ctrl-C stops")
        deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop_service(ray, serve, address, say)


def stop_service(ray, serve, address: str | None, say: Callable[[str], None]) -> None:
    """Remove the application (and a local Ray), with Ctrl-C ignored meanwhile: a second Ctrl-C must not cut the
    shutdown short and leave Ray running. One that lands before SIGINT is ignored (a signal sent twice at once:
    `pkill` reaching `timeout` and its child) starts the stop again instead of skipping it."""
    stopped = False
    while not stopped:
        try:
            with interrupts_ignored():
                say("Stopping ...")
                with shutdown_noise_filtered():
                    try:
                        if address is None:
                            serve.shutdown()
                        else:
                            serve.delete(APP_NAME)
                    finally:
                        ray.shutdown()
                        stopped = True
        except KeyboardInterrupt:
            pass  # before SIGINT was set aside: stop again; once Ray has stopped (SIGINT back): nothing left to do


# What Ray's driver prints on stdout while Serve stops as asked: its controller's graceful_shutdown task is retried
# after serve.shutdown has killed the controller (Ray 2.60, every stop), reported as a task failure.
SHUTDOWN_NOISE = ("graceful_shutdown failed", "killed by `ray.kill`")


@contextlib.contextmanager
def shutdown_noise_filtered() -> Iterator[None]:
    """While the service stops, what Ray prints on stdout (its error-listener thread writes there, `(raylet) Task
    ServeController.graceful_shutdown failed ...`) is held back: lines of that expected failure are dropped, any
    other goes to stderr afterwards, so a stop leaves nothing alarming on the command's stdout."""
    held = io.StringIO()
    with contextlib.redirect_stdout(held):  # ray.shutdown joins the listener thread: its writes land in `held`
        yield
    kept = [line for line in held.getvalue().splitlines() if line.strip()
            and not all(part in line for part in SHUTDOWN_NOISE)]
    for line in kept:
        print(line, file=sys.stderr)


@contextlib.contextmanager
def interrupts_ignored() -> Iterator[None]:
    """SIGINT ignored within the block (main thread only: elsewhere Python cannot change handlers). SIGTERM needs
    nothing here: the entry point already ignores every SIGTERM after the first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
