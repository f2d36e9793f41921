"""The OpenAPI description of every route, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from proxy import __version__

_HASH = {
    "name": "hash",
    "in": "path",
    "required": True,
    "description": "hex digest of the blob's bytes (40 for sha1, 64 for sha256), any case",
    "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{40}([0-9a-fA-F]{24})?$"},
}
_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_BLOB_HEADERS = {
    name: {"schema": {"type": "string"}}
    for name in ("ETag", "Cache-Control", "Accept-Ranges", "X-Cache", "X-Cache-Tier", "Content-Length")
}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": "problem details", "content": _PROBLEM} for code in codes}


def _blob_routes(algorithm: str) -> dict[str, Any]:
    read = {
        "parameters": [
            _HASH,
            {"name": "Range", "in": "header", "schema": {"type": "string"}},
            {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
        ],
        "responses": {
            "200": {
                "description": "the blob, verified against its name",
                "headers": _BLOB_HEADERS,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
            "206": {"description": "a byte range of the blob"},
            "304": {"description": "the client's copy (by ETag) is current"},
            **_errors(400, 404, 416, 502),
        },
    }
    return {
        f"/{algorithm}/{{hash}}": {
            "get": {"summary": f"Read a blob by its {algorithm}", **read},
            "head": {"summary": "Headers of GET without the body; uses cheap existence checks", **read},
        },
        f"/{algorithm}/missing": {
            "post": {
                "summary": "Which of these hashes no tier has",
                "requestBody": {
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
                    }
                },
                "responses": {
                    "200": {
                        "description": "the missing ones",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"missing": {"type": "array", "items": {"type": "string"}}},
                                }
                            }
                        },
                    },
                    **_errors(400, 502),
                },
            }
        },
    }


def openapi() -> dict[str, Any]:
    json_ok = {"200": {"description": "JSON", "content": {"application/json": {"schema": {"type": "object"}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "casproxy", "version": __version__, "description": "Content-addressed caching blob proxy"},
        "paths": {
            **_blob_routes("sha1"),
            **_blob_routes("sha256"),
            "/healthz": {"get": {"summary": "Liveness", "responses": json_ok}},
            "/readyz": {
                "get": {
                    "summary": "Readiness: every cache tier writable",
                    "responses": {**json_ok, "503": {"description": "not ready, with per-tier state"}},
                }
            },
            "/stats": {"get": {"summary": "Per-tier counters and cache sizes", "responses": json_ok}},
            "/jobs": {
                "post": {
                    "summary": "Start an export or import job (admin token): the fields of casproxy export/import",
                    "responses": {"202": {"description": "the job, with Location: /jobs/{id}"}},
                },
                "get": {"summary": "Every job with its progress (admin token)", "responses": json_ok},
            },
            "/jobs/{id}": {
                "get": {"summary": "A job: state, done, total, bytes, rate, eta_s, errors", "responses": json_ok}
            },
            "/jobs/{id}/{action}": {
                "post": {
                    "summary": "pause, resume or cancel a job (admin token)",
                    "responses": {"202": {"description": "the job"}, "409": {"description": "it has finished"}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus text format, every worker aggregated; names prefixed casproxy_",
                    "responses": {"200": {"description": "text/plain; version=0.0.4"}},
                }
            },
            "/openapi.json": {"get": {"summary": "This document", "responses": json_ok}},
        },
        "components": {
            "schemas": {
                "Problem": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                }
            }
        },
    }
