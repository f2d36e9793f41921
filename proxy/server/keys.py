"""Typed application state shared by the handlers."""

from __future__ import annotations

from aiohttp import web

from proxy.composite import Composite
from proxy.config import Config

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Composite)
