# healer, and the example app (examples/app) that docker-compose.yml runs from
# the same image with another entrypoint.
#
#   docker build -t healer .
#   docker run --rm -e HEALER_TOKEN="$(cat token)" -p 127.0.0.1:9877:9877 \
#     -v ./healer.yml:/etc/healer/healer.yml:ro -v healer-data:/var/lib/healer healer
#
# The default command listens on 0.0.0.0:9877, a non-loopback address, so healer
# refuses to start without a bearer token: give it the HEALER_TOKEN environment
# variable, or mount a token file where the config's
# server.auth.bearer_token_file points (docker-compose.yml uses a secret at
# /run/secrets/healer_token). The image carries the compose config
# (examples/docker/healer.yml) as /etc/healer/healer.yml; mount your own over it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged UID/GID so that volume ownership is predictable.
# /var/lib/healer holds the SQLite store; /data is the example app's data
# directory (healer's free-disk strategy deletes the app's *.fill files there
# when compose mounts the same volume into both containers). Docker copies this
# ownership into a named volume the first time it is mounted.
RUN groupadd --system --gid 10001 healer \
 && useradd --system --uid 10001 --gid healer --home-dir /var/lib/healer --no-create-home \
      --shell /usr/sbin/nologin healer \
 && mkdir -p /etc/healer /var/lib/healer /data \
 && chown healer:healer /var/lib/healer /data

WORKDIR /opt/healer

# The package first, so that editing examples/ does not reinstall it.
COPY pyproject.toml README.md ./
COPY healer ./healer
RUN pip install . \
 && rm -rf build healer.egg-info

# The example app runs as `python -m examples.app.app` from this directory.
COPY examples ./examples
COPY examples/docker/healer.yml /etc/healer/healer.yml

USER healer:healer

EXPOSE 9877

# Healthy once the store is open: /-/ready answers 200 only then. urlopen
# raises on any other status or on a refused connection, which exits non-zero.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9877/-/ready', timeout=4)"]

# Exec form, so that healer itself receives SIGTERM (`docker stop`) and shuts
# down gracefully. Give `docker stop` more than server.shutdown_timeout
# (compose: stop_grace_period) or running actions are killed mid-way.
ENTRYPOINT ["healer"]
CMD ["serve", "-c", "/etc/healer/healer.yml", "--listen", "0.0.0.0:9877"]
