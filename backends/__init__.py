"""Built-in storage backends; each module is a plugin registered through ``kvtier_backends``."""
