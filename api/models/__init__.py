"""SQLModel tables, one module per domain. No FastAPI here: workers reuse these."""

from api.models.adapters import Adapter, AdapterVersion, ModelAlias
from api.models.audit import AuditEntry
from api.models.evals import Eval, EvalOutputItem, EvalRun, ShadowSample
from api.models.files import File
from api.models.jobs import Job, JobCheckpoint, JobEvent
from api.models.tenants import ApiKey, Tenant
from api.models.usage import UsageRecord

__all__ = [
    "Adapter",
    "AdapterVersion",
    "ApiKey",
    "AuditEntry",
    "Eval",
    "EvalOutputItem",
    "EvalRun",
    "File",
    "Job",
    "JobCheckpoint",
    "JobEvent",
    "ModelAlias",
    "ShadowSample",
    "Tenant",
    "UsageRecord",
]
