"""The OpenAPI 3.1 description of every route, served at /openapi.json.

Kept beside the routes in app.py by a test that compares the two, validated by
openapi-spec-validator, and fuzzed by schemathesis in the test suite."""

from __future__ import annotations

from typing import Any

from proxy import __version__

_HEX_LENGTH = {"sha1": 40, "sha256": 64}
_EMPTY = {  # the digests of no bytes at all: examples every reader can check
    "sha1": "da39a3ee5e6b4b0d3255bfef95601890afd80709",
    "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
}
_STATUS_TEXT = {
    304: "the client's copy (by ETag) is current",
    400: "bad request: a malformed name, body or header",
    401: "a token is needed",
    403: "the token, ticket or origin is refused",
    404: "no such blob or object",
    405: "the route does not serve this method (see Allow)",
    409: "conflict with the resource's state",
    412: "If-Match does not name this blob",
    413: "the body is larger than server.max_upload_size",
    414: "the request line is too long",
    416: "the range is outside the blob",
    422: "the request is well-formed but cannot be followed",
    431: "a header field is too large, or there are too many",
    502: "a tier failed and none had the blob: retry",
    503: "not ready",
    507: "no tier has room to store the blob",
}
# What any route can answer, whatever it is: the parser's refusals.
_ANY = (400, 414, 431)
_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_BLOB_HEADERS = {
    name: {"schema": {"type": "string"}}
    for name in ("ETag", "Cache-Control", "Accept-Ranges", "X-Cache", "X-Cache-Tier", "Content-Length")
}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
_LFS = "application/vnd.git-lfs+json"


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": _STATUS_TEXT[code], "content": _PROBLEM} for code in sorted({*codes, *_ANY})}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _hash(algorithm: str) -> dict[str, Any]:
    length = _HEX_LENGTH[algorithm]
    return {
        "name": "hash",
        "in": "path",
        "required": True,
        "description": f"the {algorithm} of the blob's bytes: {length} hex digits, any case",
        "schema": {"type": "string", "pattern": f"^[0-9a-fA-F]{{{length}}}$"},
        "example": _EMPTY[algorithm],
    }


def _header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": {"type": "string"}}


def _ticket_json(algorithm: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [algorithm, "url", "ticket", "expires"],
        "properties": {
            algorithm: {"type": "string"},
            "size": {"type": "integer"},
            "url": {"type": "string"},
            "ticket": {"type": "string", "description": "url?expires=<unix>&sig=<hex>"},
            "expires": {"type": "integer"},
        },
    }


def _blob_routes(algorithm: str) -> dict[str, Any]:
    name = _hash(algorithm)
    read_parameters = [
        name,
        _header("Range", "one byte range: bytes=a-b, a- or -n (ignored on HEAD)"),
        _header("If-None-Match", "304 when it names the ETag (or is *) and the blob exists"),
        _header("If-Match", "412 unless it names the ETag (or is *) of a blob that exists"),
        _header("If-Range", "the ETag; anything else gives the whole blob"),
        {"name": "expires", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "sig", "in": "query", "required": False, "schema": {"type": "string"}},
    ]
    whole = {"description": "the blob, verified against its name", "headers": _BLOB_HEADERS, "content": _BINARY}
    read: dict[str, Any] = {
        "parameters": read_parameters,
        "security": [{}, *_BEARER, {"ticket": []}],  # with auth.require_ticket: a token or a ticket
        "responses": {
            "200": whole,
            "206": {"description": "a byte range of the blob", "headers": _BLOB_HEADERS, "content": _BINARY},
            "304": {"description": _STATUS_TEXT[304]},
            **_errors(403, 404, 412, 416, 502),
        },
    }
    head = {
        **read,
        "responses": {
            "200": {"description": "GET's headers", "headers": _BLOB_HEADERS},
            **{
                code: {"description": answer["description"]}
                for code, answer in read["responses"].items()
                if code != "200"
            },
        },
    }
    blob_body = {"required": True, "content": _BINARY}
    stored = {
        "200": _json("already stored: its ticket", _ticket_json(algorithm)),
        "201": _json("stored: its ticket", _ticket_json(algorithm)),
    }
    return {
        f"/{algorithm}/{{hash}}": {
            "get": {"summary": f"Read a blob by its {algorithm}", "operationId": f"get_{algorithm}", **read},
            "head": {
                "summary": "GET's headers; uses cheap existence checks",
                "operationId": f"head_{algorithm}",
                **head,
            },
            "put": {
                "summary": "Upload a blob under its name (gzip/deflate Content-Encoding accepted)",
                "operationId": f"put_{algorithm}",
                "parameters": [name, _header("Content-Encoding", "identity, gzip or deflate")],
                "security": [{}, *_BEARER, {"uploadUrl": []}],
                "requestBody": blob_body,
                "responses": {**stored, **_errors(401, 403, 413, 502, 507)},
            },
            "delete": {
                "summary": "Remove a blob from the cache tiers (admin token); sources keep it",
                "operationId": f"delete_{algorithm}",
                "parameters": [name],
                "security": _BEARER,
                "responses": {"204": {"description": "removed"}, **_errors(401, 403)},
            },
        },
        f"/{algorithm}": {
            "post": {
                "summary": f"Upload a blob; the server computes its {algorithm}",
                "operationId": f"post_{algorithm}",
                "security": [{}, *_BEARER],
                "requestBody": blob_body,
                "responses": {**stored, **_errors(401, 403, 413, 502, 507)},
            }
        },
        f"/{algorithm}/missing": {
            "post": {
                "summary": "Which of these hashes no tier has",
                "operationId": f"missing_{algorithm}",
                "security": [{}, *_BEARER],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["hashes"],
                                "properties": {
                                    "hashes": {"type": "array", "maxItems": 10000, "items": {"type": "string"}}
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        "the missing ones",
                        {"type": "object", "properties": {"missing": {"type": "array", "items": {"type": "string"}}}},
                    ),
                    **_errors(401, 403, 502),
                },
            }
        },
    }


def _bulk_routes() -> dict[str, Any]:
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    signed = [
        name,
        {"name": "expires", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "sig", "in": "query", "required": False, "schema": {"type": "string"}},
    ]
    slot = {
        "type": "object",
        "properties": {
            "expiration": {"type": "integer"},
            "presignedPost": {"type": "object"},
            "presignedPut": {"type": "object"},
            "presignedGet": {"type": "string"},
        },
    }
    size = _json("stored", {"type": "object", "properties": {"size": {"type": "integer"}}})
    read: dict[str, Any] = {
        "parameters": signed,
        "responses": {
            "200": {"description": "the stored bytes with their Content-Encoding", "content": _BINARY},
            "304": {"description": _STATUS_TEXT[304]},
            **_errors(403, 404),
        },
    }
    return {
        "/bulk-data": {
            "post": {
                "summary": "Presigned POST/PUT/GET slots (upload token)",
                "operationId": "bulk_slots",
                "security": [{}, *_BEARER],
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "count": {"type": "integer", "minimum": 1},
                                    "content_encoding": {"enum": ["identity", "gzip", "deflate"]},
                                    "accelerate": {"type": "boolean"},
                                },
                            }
                        }
                    }
                },
                "responses": {"200": _json("the slots", {"type": "array", "items": slot}), **_errors(401, 403)},
            }
        },
        "/bulk-data/{name}": {
            "get": {"summary": "A slot's presigned GET", "operationId": "bulk_get", **read},
            "head": {
                "summary": "A slot's presigned GET, headers only",
                "operationId": "bulk_head",
                **{**read, "responses": {k: {"description": v["description"]} for k, v in read["responses"].items()}},
            },
            "put": {
                "summary": "A slot's presigned PUT (Content-Encoding as the slot says)",
                "operationId": "bulk_put",
                "parameters": [*signed, {"name": "content-encoding", "in": "query", "schema": {"type": "string"}}],
                "requestBody": {"required": True, "content": _BINARY},
                "responses": {"201": size, **_errors(403, 404, 413)},
            },
            "post": {
                "summary": "A slot's presigned POST: the slot's form fields, then the file",
                "operationId": "bulk_post",
                "parameters": [name],
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": {"type": "object"}}},
                },
                "responses": {"201": size, **_errors(403, 404, 413)},
            },
        },
    }


def _lfs_route() -> dict[str, Any]:
    lfs_error = {
        "type": "object",
        "required": ["message"],
        "properties": {"message": {"type": "string"}, "documentation_url": {"type": "string"}},
    }
    batch = {
        "type": "object",
        "required": ["operation", "objects"],
        "properties": {
            "operation": {"enum": ["download", "upload"]},
            "transfers": {"type": "array", "items": {"type": "string"}},
            "objects": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["oid", "size"],
                    "properties": {"oid": {"type": "string"}, "size": {"type": "integer"}},
                },
            },
            "hash_algo": {"type": "string"},
        },
    }
    error = {"content": {_LFS: {"schema": lfs_error}}}
    return {
        "summary": "Git LFS batch API, basic transfer (also under any …/info/lfs/objects/batch)",
        "security": [{}, *_BEARER, {"basic": []}],
        "requestBody": {"required": True, "content": {_LFS: {"schema": batch}, "application/json": {"schema": batch}}},
        "responses": {
            "200": {"description": "an answer per object: actions or an error", "content": {_LFS: {"schema": {}}}},
            **{str(code): {"description": _STATUS_TEXT[code], **error} for code in (400, 401, 403, 413, 502)},
            **{str(code): {"description": _STATUS_TEXT[code], "content": _PROBLEM} for code in (414, 431)},
        },
    }


def _ops_routes() -> dict[str, Any]:
    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    action = {"name": "action", "in": "path", "required": True, "schema": {"enum": ["pause", "resume", "cancel"]}}
    text = {"text/plain": {"schema": {"type": "string"}}}
    admin = {"security": _BEARER}
    return {
        "/": {
            "get": {
                "summary": "Status page for people: tiers, hit ratio, disk use; refreshes from /stats",
                "operationId": "status_page",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "operationId": "healthz", "responses": {"200": _json("alive")}}},
        "/readyz": {
            "get": {
                "summary": "Readiness: every cache tier writable, no cache breaker open",
                "operationId": "readyz",
                "responses": {"200": _json("ready"), "503": _json("not ready, with per-tier state")},
            }
        },
        "/stats": {
            "get": {
                "summary": "Per-tier counters and cache use",
                "operationId": "stats",
                "responses": {"200": _json("stats")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text format, every worker aggregated; names prefixed casproxy_",
                "operationId": "metrics",
                "responses": {"200": {"description": "text format 0.0.4", "content": text}},
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "operationId": "openapi", "responses": {"200": _json("OpenAPI 3.1")}}
        },
        "/jobs": {
            "post": {
                "summary": "Start an export or import job: the fields of casproxy export/import (admin token)",
                "operationId": "create_job",
                **admin,
                "requestBody": {"required": True, "content": _JSON_OBJECT},
                "responses": {"202": _json("the job, with Location: /jobs/{id}"), **_errors(401, 403, 413)},
            },
            "get": {
                "summary": "Every job with its progress (admin token)",
                "operationId": "list_jobs",
                **admin,
                "responses": {"200": _json("the jobs"), **_errors(401, 403)},
            },
        },
        "/jobs/{id}": {
            "get": {
                "summary": "A job: state, done, total, bytes, rate, eta_s, errors (admin token)",
                "operationId": "get_job",
                **admin,
                "parameters": [job_id],
                "responses": {"200": _json("the job"), **_errors(401, 403, 404)},
            }
        },
        "/jobs/{id}/{action}": {
            "post": {
                "summary": "Pause, resume or cancel a job (admin token)",
                "operationId": "change_job",
                **admin,
                "parameters": [job_id, action],
                "responses": {"202": _json("the job"), **_errors(401, 403, 404, 409)},
            }
        },
    }


def openapi() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "casproxy", "version": __version__, "description": "Content-addressed caching blob proxy"},
        "paths": {
            **_blob_routes("sha1"),
            **_blob_routes("sha256"),
            **_bulk_routes(),
            "/lfs/objects/batch": {"post": {"operationId": "lfs_batch", **_lfs_route()}},
            **_ops_routes(),
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an upload or admin token"},
                "basic": {"type": "http", "scheme": "basic", "description": "Git LFS: the token as the password"},
                "ticket": {"type": "apiKey", "in": "query", "name": "sig", "description": "with expires: a ticket"},
                "uploadUrl": {"type": "apiKey", "in": "query", "name": "sig", "description": "a signed upload URL"},
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                }
            },
        },
    }
