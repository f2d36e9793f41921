"""GET /: a small status page for people (SPEC 5.1). One HTML document, no external assets; its
inline script reads /stats every few seconds and redraws, so the page never needs a reload."""

from __future__ import annotations

from aiohttp import web

from proxy import __version__

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>casproxy</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; background: #fafafa; }
 h1 { font-size: 1.4em; margin: 0 0 .2em; } .muted { color: #777; }
 table { border-collapse: collapse; margin: 1em 0; background: #fff; }
 th, td { padding: .35em .8em; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
 th:first-child, td:first-child { text-align: left; }
 .closed { color: #1a7f37; } .open { color: #c62828; font-weight: bold; } .half-open { color: #b26a00; }
 .bar { width: 12em; height: .8em; background: #eee; display: inline-block; vertical-align: middle; }
 .bar > span { display: block; height: 100%; background: #4a78c2; }
 .cards span { display: inline-block; margin-right: 2em; } .cards b { font-size: 1.3em; }
</style></head>
<body>
<h1>casproxy <span class="muted">__VERSION__</span></h1>
<div class="cards"><span>hit ratio <b id="ratio">-</b></span><span>uptime <b id="uptime">-</b></span>
<span>in flight <b id="inflight">-</b></span><span class="muted" id="updated"></span></div>
<table><thead><tr><th>tier</th><th>role</th><th>hits</th><th>misses</th><th>errors</th><th>corrupt</th>
<th>bytes served</th><th>breaker</th><th>use / limit</th></tr></thead><tbody id="tiers"></tbody></table>
<p class="muted">Counters are this worker's own; <a href="/metrics">/metrics</a> adds up every worker.
<a href="/stats">/stats</a> · <a href="/readyz">/readyz</a> · <a href="/openapi.json">/openapi.json</a></p>
<script>
"use strict";
const units = ["B", "KiB", "MiB", "GiB", "TiB"];
function bytes(n) { let i = 0; while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i]; }
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m + "m " + Math.floor(s % 60) + "s";
}
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
async function refresh() {
  let stats;
  try { stats = await (await fetch("/stats", {cache: "no-store"})).json(); }
  catch (e) { document.getElementById("updated").textContent = "stats unavailable: " + e; return; }
  const body = document.getElementById("tiers"); body.replaceChildren();
  let hits = 0, misses = 0;
  for (const [name, t] of Object.entries(stats.tiers)) {
    const row = body.insertRow(); row.dataset.tier = name;
    cell(row, name); cell(row, t.role + " (" + t.kind + ")");
    for (const key of ["hits", "misses", "errors", "corrupt"]) cell(row, t[key]).dataset.key = key;
    cell(row, bytes(t.bytes)).dataset.key = "bytes"; cell(row, t.breaker, t.breaker);
    const usage = (stats.usage || {})[name] || (t.size_limit ? {bytes: t.size, limit: t.size_limit} : null);
    const use = cell(row, "");
    if (usage) { const bar = document.createElement("span"), fill = document.createElement("span");
      bar.className = "bar"; fill.style.width = Math.min(100, 100 * usage.bytes / usage.limit) + "%";
      bar.append(fill); use.append(bar, " " + bytes(usage.bytes) + " / " + bytes(usage.limit)); }
    if (t.role === "cache") hits += t.hits; else misses += t.hits;
  }
  document.getElementById("ratio").textContent = hits + misses ? (100 * hits / (hits + misses)).toFixed(1) + " %" : "-";
  document.getElementById("uptime").textContent = duration(stats.process.uptime_s);
  document.getElementById("inflight").textContent = stats.in_flight;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""


_HEADERS = {
    "Cache-Control": "no-store",  # a reload shows the present
    # Its own inline style and script, and /stats: nothing from elsewhere, by the browser's word.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


async def status_page(request: web.Request) -> web.Response:
    return web.Response(text=_PAGE.replace("__VERSION__", __version__), content_type="text/html", headers=_HEADERS)
