# syntax=docker/dockerfile:1
# Build: docker build -t aiproxy .
# Run:   docker run -p 8000:8000 -e AIPROXY_MASTER_KEY=... \
#          -v "$PWD/config.yaml:/etc/aiproxy/config.yaml:ro" aiproxy
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AIPROXY_CONFIG=/etc/aiproxy/config.yaml \
    AIPROXY_HOST=0.0.0.0 \
    AIPROXY_PORT=8000
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10001 --home-dir /var/lib/aiproxy --create-home aiproxy
# The shipped config and example plugins; mount your own config over the file (or the
# folder) to change them. Listening on 0.0.0.0 requires AIPROXY_MASTER_KEY.
COPY config.yaml /etc/aiproxy/config.yaml
COPY plugins /etc/aiproxy/plugins
VOLUME ["/etc/aiproxy"]
WORKDIR /var/lib/aiproxy
USER aiproxy
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os,urllib.request as u; u.urlopen(f'http://127.0.0.1:{os.environ.get(\"AIPROXY_PORT\",\"8000\")}/health', timeout=2)" || exit 1
CMD ["aiproxy", "serve"]
