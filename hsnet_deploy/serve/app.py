"""The Ray Serve application: an HTTP ingress (validation, support-set store, PNG/JSON) in front of one
model deployment that wraps the artifact's runner and batches episodes with `@serve.batch`.

The store lives in the ingress (one replica) so every model replica serves every registered set; the model
replicas hold no state a client depends on, which is why Ray Serve can replace a dead one freely. Imports
Ray, FastAPI and Starlette at module level: only `hsnet_deploy.serve.launch` imports this module.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from hsnet_deploy.serve import uploads
from hsnet_deploy.serve.config import ServeConfig
from hsnet_deploy.serve.store import SetNotFound, SupportSetStore

# A replica that died (or is being replaced) surfaces as one of these; the client may simply retry.
RETRIABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
             ray.exceptions.WorkerCrashedError, serve.exceptions.BackPressureError,
             serve.exceptions.ReplicaUnavailableError, serve.exceptions.DeploymentUnavailableError)
RETRY_AFTER_S = 1


@dataclass
class Episode:
    """One validated query against one stored set, as the model replica receives it."""

    query: np.ndarray  # (3, S, S)
    support_imgs: np.ndarray  # (K, 3, S, S)
    support_masks: np.ndarray  # (K, S, S)
    height: int
    width: int


def shot_limit(runner, requested: int) -> int:
    """K the service accepts: the server's option, capped by a TensorRT plan's optimisation profile."""
    cap = runner.info.profile_max("shots")
    return min(requested, cap) if cap else requested


def batch_limit(runner, requested: int) -> int:
    cap = runner.info.profile_max("batch")
    return min(requested, cap) if cap else requested


@serve.deployment(name="HSNetModel")
class HSNetModel:
    """The artifact's runner in one replica; episodes with the same K run as one B-episode call."""

    def __init__(self, config: ServeConfig):
        from hsnet_deploy.runtime.artifact import open_artifact

        self.runner = open_artifact(config.artifact, config.device, config.backbone, threads=config.threads)
        self.runner.__enter__()
        if self.runner.info.backend != "pytorch":
            import torch

            # torch only upsamples the logits here: one thread (the runner has its own pool; a second pool
            # contending with it slowed that small step many-fold on a busy machine)
            torch.set_num_threads(1)
        meta = self.runner.info.metadata
        self.img_size = self.runner.info.img_size
        self.max_batch = batch_limit(self.runner, config.max_batch)
        self.max_shots = shot_limit(self.runner, config.max_shots)
        self.segment.set_max_batch_size(self.max_batch)
        self.segment.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)
        self.meta = {k: v for k, v in meta.items() if isinstance(v, str | int | float | bool | list | dict)}
        self.calls, self.episodes = 0, 0

    def describe(self) -> dict:
        info = self.runner.info
        return {"backend": info.backend, "device": info.device, "precision": info.precision,
                "img_size": self.img_size, "max_batch": self.max_batch, "max_shots": self.max_shots,
                "metadata": self.meta}

    def replica(self) -> dict:
        """Which Ray actor this replica is, and what it ran (operators and tests find replicas by it)."""
        context = ray.get_runtime_context()
        return {"actor_name": context.get_actor_name(), "actor_id": context.get_actor_id(),
                "runner_calls": self.calls, "episodes": self.episodes}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def segment(self, episodes: list[Episode]) -> list[tuple[str, object]]:
        return await asyncio.to_thread(self._run_batch, episodes)

    def _run_batch(self, episodes: list[Episode]) -> list[tuple[str, object]]:
        """One runner call per K in the batch; a failed call is retried per episode, so one episode's failure
        is reported for that episode alone."""
        from hsnet_deploy.predict import mask_at_original_size

        results: list[tuple[str, object]] = [("error", "not run")] * len(episodes)
        by_shots: dict[int, list[int]] = {}
        for i, ep in enumerate(episodes):
            by_shots.setdefault(ep.support_imgs.shape[0], []).append(i)
        for group in by_shots.values():
            try:
                logits = self._infer([episodes[i] for i in group])
            except Exception:  # noqa: BLE001 - find the episode that failed: run each alone
                for i in group:
                    results[i] = self._one(episodes[i])
                continue
            for row, i in enumerate(group):
                results[i] = ("ok", mask_at_original_size(logits[row], episodes[i].height, episodes[i].width))
        return results

    def _one(self, ep: Episode) -> tuple[str, object]:
        from hsnet_deploy.predict import mask_at_original_size

        try:
            return "ok", mask_at_original_size(self._infer([ep])[0], ep.height, ep.width)
        except Exception as exc:  # noqa: BLE001 - this episode's failure, reported to its client only
            return "error", f"{type(exc).__name__}: {exc}"

    def _infer(self, episodes: list[Episode]) -> np.ndarray:
        feed = {"query_img": np.stack([e.query for e in episodes]),
                "support_imgs": np.stack([e.support_imgs for e in episodes]),
                "support_masks": np.stack([e.support_masks for e in episodes])}
        self.calls += 1
        self.episodes += len(episodes)
        return self.runner.infer(feed)["logits"].astype(np.float32)


api = FastAPI(title="hsnet-deploy", description="HSNet few-shot segmentation over HTTP")


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


@serve.deployment(name="HSNetAPI", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class HSNetAPI:
    """HTTP front: checks each request alone, keeps the support sets, hands valid episodes to HSNetModel."""

    def __init__(self, model, config: ServeConfig):
        self.model = model
        self.config = config
        self.store = SupportSetStore(config.max_sets, int(config.max_store_mb * 2**20))
        self.started = time.time()
        self.requests = {"segment": 0, "support_sets": 0, "errors_4xx": 0, "retriable_503": 0}
        self._facts: dict | None = None

    async def facts(self) -> dict:
        if self._facts is None:
            self._facts = await self.model.describe.remote()
        return self._facts

    async def limits(self) -> uploads.Limits:
        facts = await self.facts()
        return uploads.Limits(int(self.config.max_upload_mb * 2**20), self.config.max_pixels, facts["max_shots"])

    async def form(self, request: Request, limits: uploads.Limits):
        """The multipart form, refused with 413 once the body passes the byte limit (before parsing)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_upload_bytes:
            raise uploads.RequestError(413, f"request body of {int(declared)} bytes is over the server's limit of "
                                            f"{limits.max_upload_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_upload_bytes:
                raise uploads.RequestError(413, f"request body is over the server's limit of "
                                                f"{limits.max_upload_bytes} bytes")
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        try:
            return await Request(request.scope, replay).form(max_files=4 * limits.max_shots + 4)
        except Exception as exc:  # noqa: BLE001 - Starlette's MultiPartException and malformed bodies
            raise uploads.RequestError(400, f"multipart/form-data body refused: {getattr(exc, 'message', exc)}") from None

    def refuse(self, exc: uploads.RequestError) -> JSONResponse:
        self.requests["errors_4xx"] += 1
        return error(exc.status, exc.message)

    @api.post("/support-sets")
    async def register(self, request: Request):
        self.requests["support_sets"] += 1
        try:
            limits = await self.limits()
            form = await self.form(request, limits)
            images = [await f.read() for f in form.getlist("image") if hasattr(f, "read")]
            masks = [await f.read() for f in form.getlist("mask") if hasattr(f, "read")]
            size = (await self.facts())["img_size"]
            support, empty = await asyncio.to_thread(uploads.support_set, images, masks, size, limits)
            try:
                set_id = self.store.add(support)
            except ValueError as exc:
                raise uploads.RequestError(413, str(exc)) from None
        except uploads.RequestError as exc:
            return self.refuse(exc)
        body = {"id": set_id, "shots": support.shots}
        if empty:
            body["warning"] = f"masks {empty} have no foreground; those shots cannot show the object"
        return JSONResponse(body, status_code=201)

    @api.post("/segment")
    async def segment(self, request: Request, format: str = "png"):
        self.requests["segment"] += 1
        try:
            if format not in ("png", "json"):
                raise uploads.RequestError(400, f"format={format!r}: expected png or json")
            limits = await self.limits()
            form = await self.form(request, limits)
            for field_name in ("image", "support_set"):
                if len(form.getlist(field_name)) > 1:
                    raise uploads.RequestError(400, f"{len(form.getlist(field_name))} `{field_name}` fields: "
                                                    "/segment takes one query image and one support set a request")
            set_id = form.get("support_set")
            image = form.get("image")
            if not isinstance(set_id, str) or not set_id:
                raise uploads.RequestError(400, "missing form field `support_set` (an id from POST /support-sets)")
            if image is None or not hasattr(image, "read"):
                raise uploads.RequestError(400, "missing file field `image` (the query image)")
            try:
                support = self.store.get(set_id)
            except SetNotFound as exc:
                raise uploads.RequestError(404, str(exc)) from None
            data = await image.read()
            size = (await self.facts())["img_size"]
            q, height, width = await asyncio.to_thread(uploads.query, data, size, limits)
        except uploads.RequestError as exc:
            return self.refuse(exc)
        episode = Episode(q, support.images, support.masks, height, width)
        try:
            status, result = await self.model.segment.remote(episode)
        except RETRIABLE as exc:
            self.requests["retriable_503"] += 1
            return error(503, f"the model replica failed while serving this request ({type(exc).__name__}); "
                              "it is being replaced, retry", headers={"Retry-After": str(RETRY_AFTER_S)})
        if status != "ok":
            return error(500, f"inference failed: {result}")
        if format == "json":
            return JSONResponse(uploads.mask_json(result))
        return Response(uploads.mask_png(result), media_type="image/png")

    @api.get("/health")
    async def health(self):
        """OK only while a model replica answers (a replica being replaced makes this a 503 for a moment)."""
        try:
            await asyncio.wait_for(self.model.replica.remote(), timeout=10)
            await self.facts()
        except (asyncio.TimeoutError, *RETRIABLE) as exc:
            return error(503, f"model not ready ({type(exc).__name__})", headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1)}

    @api.get("/info")
    async def info(self):
        facts = await self.facts()
        return {"artifact": self.config.artifact, **{k: facts[k] for k in ("backend", "device", "precision",
                                                                              "img_size")},
                "metadata": facts["metadata"],
                "batching": {"max_batch": facts["max_batch"], "batch_wait_ms": self.config.batch_wait_ms,
                             "same_shots_per_call": True},
                "limits": {"max_shots": facts["max_shots"], "max_upload_mb": self.config.max_upload_mb,
                           "max_pixels": self.config.max_pixels},
                "store": self.store.stats(), "requests": dict(self.requests),
                "config": asdict(self.config)}


def build_app(config: ServeConfig, replicas: int = 1, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0):
    """The bound application: `serve.run(build_app(...))`."""
    model = HSNetModel.options(
        num_replicas=replicas,
        max_ongoing_requests=max(2 * config.max_batch, 8),
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
    ).bind(config)
    return HSNetAPI.options(max_ongoing_requests=1000).bind(model, config)
