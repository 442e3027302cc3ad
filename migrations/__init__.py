"""Alembic environment and versions; `loraplex db upgrade` runs them."""
