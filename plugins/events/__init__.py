"""KV events handed to engines: ``vllm`` returns kvtier's tier events through vLLM's
KV-connector event API (the events themselves live in :mod:`kvtier.core.events`)."""
