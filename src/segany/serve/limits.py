"""Request size limits and the API's error type."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# What a client over the body cap can do, and what the server's operator can.
FIX = ("send a smaller file, or start the server with a larger cap "
       "(segany serve max_body_mb=, create_app(max_body_bytes=))")


class ApiError(HTTPException):
    """An error answered as JSON ``{"detail": ..., "field": ...}`` with an HTTP status.

    An ``HTTPException`` so that FastAPI's body parsing passes it through (a body over the cap
    found while FastAPI reads a JSON body must stay a 413)."""

    def __init__(self, status: int, detail: str, field: str | None = None) -> None:
        super().__init__(status_code=status, detail=detail)
        self.status, self.field = status, field


# A JSON body (a prompt or segment-everything request) of the largest valid request is ~100 kB;
# FastAPI parses and validates it on the event loop, where 30 MB of JSON held every request ~6 s.
JSON_BODY_BYTES = 1 << 20
JSON_FIX = f"a valid prompt request is far smaller (at most {JSON_BODY_BYTES} bytes of JSON)"


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` (JSON bodies over :data:`JSON_BODY_BYTES`): at once from
    ``Content-Length``, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["max_body_bytes"] = self.max_bytes
        headers = dict(scope.get("headers") or [])
        cap, fix = self.max_bytes, FIX
        if headers.get(b"content-type", b"").lower().startswith(b"application/json"):
            cap, fix = min(cap, JSON_BODY_BYTES), JSON_FIX
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            from starlette.responses import JSONResponse

            bad = not length.isdigit()
            resp = JSONResponse({"detail": "bad Content-Length" if bad else
                                 f"body of {int(length)} bytes is over the cap of {cap} bytes; {fix}",
                                 "field": "body"}, status_code=400 if bad else 413)
            await resp(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > cap:  # chunked upload without a length: stop reading
                    raise ApiError(413, f"body over the cap of {cap} bytes; {fix}", "body")
            return msg

        await self.app(scope, limited, send)


async def read_body(request: Request) -> bytes:
    """The uploaded image bytes: the ``file`` field of a multipart form, or the raw body."""
    try:
        data = await request.body()
    except ClientDisconnect:  # the client went away mid-upload: nobody to answer, nothing to log
        raise ApiError(400, "the client disconnected before the upload ended", "file") from None
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith("multipart/form-data"):
        return data
    replay: list[Any] = [{"type": "http.request", "body": data, "more_body": False}]

    async def receive() -> Message:
        return replay.pop() if replay else {"type": "http.disconnect"}

    try:
        form = await Request(request.scope, receive).form(max_files=1, max_fields=8)
    except Exception as e:  # a broken form is the client's input, not a server failure
        raise ApiError(400, f"malformed multipart form: {e}", "file") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "the multipart form needs a file field named 'file'", "file")
        return await upload.read()
    finally:
        await form.close()
