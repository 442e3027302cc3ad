"""Serving engines behind one interface (base.py): vLLM replicas and in-process transformers."""
