"""Celery workers: glue between a job row in the database and the trainer.

Tasks take job ids only; the row is the job's state machine; the ML stack is imported
inside the task body, so the control plane can enqueue without importing torch.
"""
