# The hub image: one `sourcenet-hub serve` process per container (compose.yaml runs three behind
# HAProxy). Not exercised in this repository: no container runtime runs where its tests run; the
# same topology is tested with real processes by tests/test_cluster.py (`make cluster`).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 PORT=8080 DATA_DIR=/data LOG_FORMAT=json

WORKDIR /app
# The server finds static/ and migrations/ next to its packages, so the checkout is installed in
# place (editable) rather than copied into site-packages. Dependencies first: a code change alone
# does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p server handlers db && touch server/__init__.py handlers/__init__.py db/__init__.py \
    && pip install -e . && rm -rf server handlers db
COPY server server
COPY handlers handlers
COPY db db
COPY migrations migrations
COPY static static

RUN useradd --system --uid 10001 --home-dir /data hub && mkdir -p /data && chown hub /data
USER hub
VOLUME ["/data"]
EXPOSE 8080

# The same probe HAProxy uses: 200 while PostgreSQL and Redis answer.
HEALTHCHECK --interval=5s --timeout=2s --start-period=30s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2).status != 200)"

# SIGTERM (docker stop, a rolling update) shuts down gracefully: clients are told and reconnect
# through HAProxy to another hub. Give it SHUTDOWN_TIMEOUT plus a little (stop_grace_period).
CMD ["sourcenet-hub", "serve", "--no-demo-data"]
