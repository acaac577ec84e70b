"""Start or join Ray, deploy the application on Ray Serve's HTTP proxy, and keep it up until Ctrl-C.

Without an address a local Ray is started (and stopped on exit); with one, the application is deployed on that
cluster and removed from it on exit, leaving the cluster itself running.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable

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
    try:
        context = ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False,
                           log_to_driver=False, configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"--address {address}: cannot join the Ray cluster ({exc})") from None
    say(f"Ray: {'joined cluster ' + address if address else 'local instance'} at {context.address_info['gcs_address']}")
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        cpus = float(config.threads or 1)
        try:
            serve.run(build_app(config, replicas, gpus_per_replica, cpus), name=APP_NAME, route_prefix="/",
                      logging_config={"log_level": "WARNING"})
        except RuntimeError as exc:
            raise UserError(f"{config.artifact}: the deployment did not start ({str(exc).splitlines()[0]})") from None
        say(f"Serving {config.artifact} on http://{host}:{port} ({replicas} replica(s), batches of up to "
            f"{config.max_batch}); Ctrl-C stops")
        deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
        while not stop["now"] and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        say("Stopping ...")
        try:
            if address is None:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
