"""Domain logic as plain functions with keyword-only arguments. No FastAPI here.

Every query for tenant-owned data takes the tenant: scoping cannot be forgotten.
"""
