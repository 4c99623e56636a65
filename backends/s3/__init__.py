"""The `s3` tier (being built)."""
