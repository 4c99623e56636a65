"""One vLLM (CPU) engine with kvtier's connector in vLLM's default multi-process mode:
the engine core (scheduler and worker, with their connectors and kvtier) runs in a
process of its own, apart from this one.

    python vllm_vineyard_app.py MODEL_DIR SPEC.json RESULT.json

The spec: ``{"kvtier": {...}, "rounds": [[{"tokens": [...]}, ...], ...]}``, with
``kvtier`` the connector's ``kv_connector_extra_config``. Each round is one greedy
``generate`` of its prompts; the result records each prompt's output tokens and
``num_cached_tokens`` (with vLLM's own prefix cache off, the tokens kvtier loaded).
This process never sees the connector: every hit is counted by the engine core.

Used by ``tests/test_vllm_vineyard.py``. Not a test module (no ``test_`` name).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "vllm_apps"))
if "VLLM_ENABLE_V1_MULTIPROCESSING" in os.environ:
    raise SystemExit("run without VLLM_ENABLE_V1_MULTIPROCESSING: this app tests vLLM's default")
import kvtier_app

os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: multi-process


def main() -> None:
    model, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    llm = kvtier_app.make_llm(model, spec["kvtier"], 1024)
    core = llm.llm_engine.engine_core
    rounds = [kvtier_app.generate(llm, {"generate": prompts}) for prompts in spec["rounds"]]
    result = {"rounds": rounds, "engine_core": type(core).__name__}
    core.shutdown()  # the engine core closes kvtier (queued saves are written first)
    del llm
    gc.collect()
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
