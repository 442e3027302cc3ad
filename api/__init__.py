"""Loraplex control plane: settings, database, auth, artifact store, REST routes.

Never imports torch, transformers, peft or vllm: it must start fast on a machine with no GPU.
"""
