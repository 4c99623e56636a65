"""The `nixl` tier (being built)."""
