"""Request bodies of the JSON routes, read one way: bounded in size (the app's client_max_size,
a 413), and anything that is not a JSON document we can hold is a 400, never a 500."""

from __future__ import annotations

import json

from aiohttp import web

from proxy.errors import BadRequest


async def read_json(request: web.Request, example: str) -> object:
    """The body as JSON; ``example`` shows the caller what was expected."""
    text = await request.read()  # raises 413 past client_max_size
    try:
        return json.loads(text)
    # ValueError: malformed JSON, bad UTF-8, or an integer past Python's 4300-digit limit;
    # RecursionError: nesting deeper than the decoder's stack (it unwinds cleanly).
    except (ValueError, RecursionError) as error:
        raise BadRequest(f"the body is not JSON ({type(error).__name__}: {str(error)[:120]}); want {example}") from None


async def read_json_object(request: web.Request, example: str) -> dict[str, object]:
    body = await read_json(request, example)
    if not isinstance(body, dict):
        raise BadRequest(f"want a JSON object like {example}")
    return body
