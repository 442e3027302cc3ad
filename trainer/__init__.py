"""Loraplex trainer: typed config + chat JSONL + base model -> LoRA adapter directory.

A plain library. It knows nothing of HTTP, SQL or Celery; progress, checkpoints and
cancellation reach it through callbacks. `trainer.config` and `trainer.formats` import no
torch, so the control plane may use them.
"""
