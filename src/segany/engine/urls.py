"""Downloads of image and video URLs (http/https) with urllib: ``URL_TIMEOUT`` seconds per
connect and read, the URL encoded as a browser sends it, every failure an ``ImageError`` naming it."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO

from segany.errors import ImageError

URL_TIMEOUT = 30.0  # seconds for connect and each read of a URL download


def is_url(s: str) -> bool:
    """Whether ``s`` is an http(s) URL (any case)."""
    return s[:8].lower().startswith(("http://", "https://"))


def download(url: str, out: BinaryIO, what: str) -> None:
    """Copy ``url`` into ``out`` a chunk at a time; any failure, a cut-off body included, is an
    ImageError naming the URL (``what``: "image" or "video")."""
    request = urllib.request.Request(encoded_url(url), headers={"User-Agent": "segany"})
    reason = None
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as response:
            expected, got = response.headers.get("Content-Length", ""), 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                got += len(chunk)
        # read(n) ends quietly where the connection closed, short of Content-Length or not
        if expected.isdigit() and got < int(expected):
            reason = f"the connection closed after {got} bytes, {int(expected) - got} more were expected"
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = (f"the connection closed after {len(e.partial)} bytes, {e.expected} more were expected"
                  if isinstance(e, http.client.IncompleteRead) else str(e) or type(e).__name__)
    if reason is not None:
        raise ImageError(f"could not download {what} {url}: {reason}")


def encoded_url(url: str) -> str:
    """``url`` as a browser or curl sends it: spaces and non-ASCII letters of the path, query and
    fragment percent-encoded (what is already encoded, and the delimiters, stay), a non-ASCII
    host name in IDNA form (bücher.de → xn--bcher-kva.de)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.hostname and not parts.hostname.isascii():
        try:
            netloc = netloc.replace(parts.hostname, parts.hostname.encode("idna").decode("ascii"))
        except UnicodeError:
            pass  # left as it is: the download reports the failure
    safe = "/?#[]@!$&'()*+,;=%~:"
    return urllib.parse.urlunsplit((parts.scheme, netloc, urllib.parse.quote(parts.path, safe=safe),
                                    urllib.parse.quote(parts.query, safe=safe),
                                    urllib.parse.quote(parts.fragment, safe=safe)))
