"""The `redis` tier (being built)."""
