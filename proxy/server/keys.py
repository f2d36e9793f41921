"""Typed application state shared by the handlers."""

from __future__ import annotations

from aiohttp import web

from proxy.config import Config
from proxy.service import Service
from proxy.store.composite import Composite

CONFIG = web.AppKey("config", Config)
SERVICE = web.AppKey("service", Service)
STORE = web.AppKey("store", Composite)  # the same as app[SERVICE].store, for the read path
