"""SQLModel tables, one module per domain. No FastAPI here: workers reuse these."""

from api.models.files import File
from api.models.tenants import ApiKey, Tenant

__all__ = ["ApiKey", "File", "Tenant"]
