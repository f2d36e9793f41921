# casproxy: docker build -t casproxy .
#           docker run -p 8080:8080 -e CASPROXY_UPLOAD_TOKEN=... -e CASPROXY_ADMIN_TOKEN=... casproxy
# Config: /etc/casproxy/config.toml (deploy/docker/config.toml; mount your own over it or set
# CASPROXY_SECTION__KEY variables). State: the disk cache in /var/cache/casproxy, uploaded blobs
# in /var/lib/casproxy. See deploy/README.md.

# -- build: the wheel, then a virtualenv with it and its dependencies (the gcs extra too) --------
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY proxy proxy
# What users install is the wheel, not this tree: build it and install that, as pip would.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/casproxy \
    && /opt/casproxy/bin/python -m pip install "$(ls /wheels/casproxy-*.whl)[gcs]" \
    && /opt/casproxy/bin/python -m compileall -q /opt/casproxy/lib

# -- run: the slim base, the virtualenv, nothing of the build -------------------------------------
FROM python:3.11-slim-bookworm

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="casproxy" \
      org.opencontainers.image.description="A content-addressed caching HTTP proxy for blobs named by their digest" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric id, so Kubernetes' runAsNonRoot can check it and volumes can be chowned to it.
RUN groupadd --system --gid 10001 casproxy \
    && useradd --system --no-log-init --uid 10001 --gid casproxy \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin casproxy \
    && install -d -o casproxy -g casproxy -m 0700 /var/cache/casproxy /var/lib/casproxy

# Owned by root and run as casproxy: the service cannot rewrite its own code.
COPY --from=build /opt/casproxy /opt/casproxy
COPY deploy/docker/config.toml /etc/casproxy/config.toml

ENV PATH=/opt/casproxy/bin:$PATH \
    CASPROXY_CONFIG=/etc/casproxy/config.toml

USER 10001:10001
VOLUME ["/etc/casproxy", "/var/cache/casproxy", "/var/lib/casproxy"]
EXPOSE 8080
# The slim image has no curl; the port follows CASPROXY_SERVER__PORT when that is how it was moved.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CASPROXY_SERVER__PORT', '8080'), timeout=4)"]
# Exec form: casproxy is PID 1 and gets SIGTERM itself (aiohttp finishes requests in flight).
CMD ["casproxy", "serve"]
