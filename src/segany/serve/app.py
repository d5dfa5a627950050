"""The FastAPI app: a JSON API (OpenAPI docs at ``/docs``) and the click-to-segment page at ``/``.

Errors are JSON ``{"detail": message, "field": name or null}``: an unknown image id is 404, a
malformed prompt 422, a body that is not an image 415, an image over the pixel cap or a body over
the size cap 413, a full queue 503. User input never causes a 500.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, ImageError, PromptError, SegAnyError
from .limits import ApiError, BodyLimitMiddleware, read_body
from .schemas import EverythingRequest, ImageInfo, PromptRequest, api_wording, error_responses
from .service import SegmentService, TooLargeError, content_id
from .worker import ENCODE, EVERYTHING, PROMPT, ModelWorker, QueueFullError

STATIC = Path(__file__).parent / "static"
_ID = re.compile(r"[0-9a-f]{32}")
_FIELDS = (("boxes", "boxes"), ("labels", "labels"), ("point", "points"), ("mask", "mask_input"))
UPLOAD_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}


def _load_model(model: Any, device: str):
    """A :class:`SAM`, a :class:`Predictor` or a checkpoint name/path → (predictor, name)."""
    from ..engine.predictor import Predictor
    from ..model import SAM

    if isinstance(model, Predictor):
        given, name = model, Path(str(model.args.get("model") or "model")).name
    else:
        model = model if isinstance(model, SAM) else SAM(model, device=device)
        given, name = model.predictor, Path(model.ckpt_path).name
    # A predictor of its own over the same weights: the server's jobs set and clear its current
    # image, which must not touch the caller's.
    return Predictor(overrides=given.overrides, model=given.model, config=given.model_config), name


def create_app(model: Any, device: str = "", max_images: int = 16, max_cache_bytes: int = 2 << 30,
               max_pixels: int = 40_000_000, max_body_bytes: int = 32 << 20, max_prompts: int = 64,
               max_pending: int = 64) -> FastAPI:
    """The app for ``model`` (a ``SAM``, a ``Predictor`` or a checkpoint name/path).

    ``max_images``/``max_cache_bytes`` bound the embedding cache, ``max_pixels`` the uploaded
    image size, ``max_body_bytes`` any request body, ``max_prompts`` the objects per prompt
    request, ``max_pending`` the jobs waiting for the model.
    """
    predictor, name = _load_model(model, device)
    service = SegmentService(predictor, name, max_images, max_cache_bytes, max_pixels)
    worker = ModelWorker(max_pending=max_pending)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await run_in_threadpool(worker.stop)

    # /docs with Swagger UI from files in fastapi_offline, not from a CDN: the server is often run
    # where there is no internet. No /redoc: ReDoc's bundle still fetches its logo from a CDN.
    app = FastAPIOffline(title="segany", summary="Segment Anything: prompt an image, get masks", lifespan=lifespan,
                         static_url="/static/docs", redoc_url=None)
    app.state.service, app.state.worker = service, worker
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_r: Request, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None  # a full queue drains in moments
        return JSONResponse({"detail": e.detail, "field": e.field}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(r: Request, e: RequestValidationError) -> JSONResponse:
        kind = r.headers.get("content-type", "").split(";")[0].strip().lower()
        if r.method == "POST" and kind != "application/json" and r.url.path != "/api/images":
            return JSONResponse({"detail": f"Content-Type must be application/json (got {kind or 'none'})",
                                 "field": "body"}, status_code=415)
        errs = e.errors()
        loc = [p for p in (errs[0].get("loc", ()) if errs else ()) if isinstance(p, str) and p != "body"]
        field = loc[0] if loc else "body"
        msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
        return JSONResponse({"detail": f"{field}: {msg}", "field": field,
                             "errors": [{"loc": list(x.get("loc", ())), "msg": x.get("msg")} for x in errs[:10]]},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400 and e.detail == "There was an error parsing the body":
            # FastAPI's answer to a JSON body that is not UTF-8 or is nested too deeply: a malformed
            # prompt, as other JSON errors are
            return JSONResponse({"detail": "body: not valid JSON (not UTF-8 text, or nested too deeply)",
                                 "field": "body"}, status_code=422)
        # e.headers: a 405's Allow (the methods the path takes)
        return JSONResponse({"detail": str(e.detail), "field": getattr(e, "field", None)}, status_code=e.status_code,
                            headers=e.headers)

    async def run(priority: int, fn, *args):
        try:
            fut = worker.submit(priority, fn, *args)
        except QueueFullError as e:
            raise ApiError(503, str(e)) from None
        try:
            return await asyncio.wrap_future(fut)
        except PromptError as e:  # the engine's messages name its Python argument; the API's field is boxes
            message = api_wording(str(e))
            raise ApiError(422, message, _field_of(message)) from None
        except ConfigError as e:
            raise ApiError(422, str(e), str(e).split(" ", 1)[0]) from None
        except SegAnyError as e:  # any other input the engine refused
            raise ApiError(422, str(e)) from None

    def cached(image_id: str):
        entry = service.images.get(image_id) if _ID.fullmatch(image_id) else None
        if entry is None:
            raise ApiError(404, f"no image with id {image_id!r} (unknown, or evicted from the cache: upload it again)",
                           "image_id")
        return entry

    @app.get("/api/health", tags=["server"])
    async def health() -> dict[str, Any]:
        """Liveness, the queue and the cache."""
        return dict(status="ok", model=name, queue=worker.pending(), jobs_done=worker.done,
                    cache=service.images.stats())

    @app.get("/api/models", tags=["server"])
    async def models() -> dict[str, Any]:
        """The model this server runs (one per server)."""
        cfg, net = predictor.model_config, predictor.model
        return {"models": [dict(name=name, architecture=getattr(cfg, "name", None), img_size=net.img_size,
                                device=str(predictor.device), active=True)]}

    for path, endpoint in (("/api/health", health), ("/api/models", models)):  # HEAD wherever GET (uptime checks)
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.post("/api/images", tags=["images"], response_model=ImageInfo, openapi_extra=UPLOAD_DOC,
              responses=error_responses(400, 413, 415, 422, 503))
    async def upload(request: Request) -> ImageInfo:
        """Upload an image (multipart field ``file``, or the raw bytes as the body). Returns its id
        (content hash) and size; the embedding is computed once and cached."""
        data = await read_body(request)
        image_id = content_id(data)
        entry = service.images.get(image_id)
        if entry is None:
            try:  # a full queue refuses before the image is decoded (a decoded upload is large)
                worker.check_room(ENCODE)
            except QueueFullError as e:
                raise ApiError(503, str(e)) from None
            try:
                img = await run_in_threadpool(service.decode_upload, data)
            except TooLargeError as e:
                raise ApiError(413, str(e), "file") from None
            except ImageError as e:
                raise ApiError(415, str(e), "file") from None
            entry = await run(ENCODE, service.encode, image_id, img)
        h, w = entry.state.original_size
        return ImageInfo(id=image_id, width=w, height=h)

    @app.post("/api/images/{image_id}/prompt", tags=["images"], responses=error_responses(404, 413, 415, 422, 503))
    async def prompt(image_id: str, body: PromptRequest) -> dict[str, Any]:
        """Masks for point/box/mask prompts (shapes as in ``SAM(...)``: ``points`` ``[[x, y], ...]`` is
        one object per point, ``[[[x, y], ...]]`` one object with several points; labels 1/0), in
        prompt order, each with COCO RLE, score, bbox and a ``logits_id`` usable as ``mask_input``."""
        entry = cached(image_id)
        prompts = body.prompts(max_prompts)
        if body.mask_input is not None:
            ids = [body.mask_input] if isinstance(body.mask_input, str) else list(body.mask_input)
            try:
                prompts["masks"] = service.logits_for(image_id, ids)
            except KeyError as e:
                raise ApiError(422, e.args[0], "mask_input") from None
        return await run(PROMPT, service.prompt, entry, prompts, body.multimask_output, body.png, body.polygons)

    @app.post("/api/images/{image_id}/everything", tags=["images"], responses=error_responses(404, 413, 415, 422, 503))
    async def everything(image_id: str, body: EverythingRequest | None = None) -> dict[str, Any]:
        """Segment everything (Meta's automatic mask generator parameters, bounded)."""
        entry = cached(image_id)
        body = body or EverythingRequest()
        return await run(EVERYTHING, service.everything, entry, body.options(), body.png, body.polygons)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    # StaticFiles serves only files inside STATIC (no path escapes it).
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _field_of(message: str) -> str:
    """The request field a PromptError message is about."""
    low = message.lower()
    hits = [(low.find(word), field) for word, field in _FIELDS if word in low]
    return min(hits)[1] if hits else "prompt"
