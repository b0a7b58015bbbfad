"""Receiving an upload: the request body streamed into a private file, within a size limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Request

from ..app_import import too_large
from ..errors import InvalidInput

#: after a refusal, read (and drop) at most this much more of the body, so that the client gets to
#: read the answer instead of a connection reset mid-upload
DRAIN_LIMIT = 64 * 1024**2
_FLUSH = 1 << 20


def require_octets(request: Request) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/octet-stream":
        raise InvalidInput(f"the import takes the dump's bytes as application/octet-stream, not "
                           f"{ctype or 'a body without a content type'} (the server opens no path it is sent)",
                           "Send the file's content: `tierbase import FILE` and the SDK's import_dump do")


async def spool(request: Request, body: AsyncIterator[bytes], dest: Path, limit: int) -> int:
    """Write the ``body`` (``request.stream()``) into ``dest``, which the caller removes; refuse it past
    ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    size, buf = 0, bytearray()
    with open(dest, "wb") as fh:
        async for chunk in body:
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            buf += chunk
            if len(buf) >= _FLUSH:  # file writes off the event loop the proxy shares
                await asyncio.to_thread(fh.write, bytes(buf))
                buf.clear()
        await asyncio.to_thread(fh.write, bytes(buf))
    return size


async def drain(body: AsyncIterator[bytes]) -> None:
    """Read what is left of a refused body, up to DRAIN_LIMIT, discarding it."""
    seen = 0
    try:
        async for chunk in body:
            seen += len(chunk)
            if seen > DRAIN_LIMIT:
                return
    except Exception:  # the client went away, or the body was read already: nothing to drain
        return
