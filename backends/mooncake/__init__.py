"""The `mooncake` tier (being built)."""
