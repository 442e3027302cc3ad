# The control plane: light, no torch. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t loraplex-api .
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY trainer trainer
COPY serving serving
COPY workers workers
COPY migrations migrations
COPY examples examples
RUN pip install '.[s3]' && useradd --system --uid 10001 loraplex
USER loraplex
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=6 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')"
CMD ["loraplex", "api", "--host", "0.0.0.0", "--port", "8000"]
