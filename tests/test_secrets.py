"""A tier's password never shows: not in stats, not in the CLI's tables and titles,
not in errors, whatever characters it holds (issue 11, item 5)."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import torch
from test_cli import run

from kvtier.core import KVLayout, KVTier
from kvtier.core.errors import KVTierError

PASSWORD = "S3cr#t/p@ss:w0rd"
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)


@pytest.fixture
def guarded_url(valkey_factory) -> str:
    """A redis tier URL with a password (percent-encoded, as URLs need) to a server
    that requires it."""
    server = valkey_factory("--requirepass", PASSWORD)
    return f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0"


def leaked(text: str) -> bool:
    return any(part in text for part in (PASSWORD, quote(PASSWORD, safe=""), "S3cr"))


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    code, out, err = run(monkeypatch, capsys, *args, columns=300)
    return code, out + err


def test_stats_show_the_url_without_its_password(guarded_url: str) -> None:
    cfg = {"chunk_tokens": 16, "tiers": [{"url": guarded_url}]}
    with KVTier.open(cfg, model="m", layout=LAYOUT) as cache:
        cache.store(torch.arange(16), torch.zeros(LAYOUT.chunk_shape(16), dtype=LAYOUT.dtype))
        cache.flush()
        stats = cache.stats()
    assert stats.tiers[0].stored == 1, "the password was not accepted"
    assert not leaked(json.dumps(stats.as_dict()))
    assert "***@127.0.0.1" in stats.tiers[0].url


def test_cli_tables_and_titles_hide_it(guarded_url: str, tmp_path, monkeypatch, capsys) -> None:
    config = tmp_path / "kvtier.yaml"
    config.write_text(json.dumps({"tiers": [{"url": guarded_url}]}))
    for args in (
        ("config", "validate", str(config)),
        ("ls", guarded_url),
        ("stats", guarded_url),
        ("migrate", guarded_url, f"file://{tmp_path}/copy", "--dst-capacity", "1GiB"),
    ):
        code, output = cli(monkeypatch, capsys, *args)
        assert code == 0, output
        assert not leaked(output), f"kvtier {args[0]} showed the password: {output}"


def test_errors_hide_it(guarded_url: str) -> None:
    wrong = guarded_url.replace(quote(PASSWORD, safe=""), quote(PASSWORD[::-1], safe=""))
    cfg = {"chunk_tokens": 16, "tiers": [{"url": wrong}]}
    try:
        KVTier.open(cfg, model="m", layout=LAYOUT).close()
    except KVTierError as exc:
        assert not any(p in str(exc) for p in (PASSWORD[::-1], "ss@p")), str(exc)


def test_a_password_of_digits_is_a_password_and_is_never_quoted() -> None:
    """YAML reads ``password: 123456`` as an int: it still works, and an options error
    never quotes it (it did, as 'got 123456')."""
    from kvtier.core.factory import build_backend

    backend = build_backend("redis://127.0.0.1:6379/0", options={"password": 8675309})
    assert backend.options.password.get_secret_value() == "8675309"  # type: ignore[attr-defined]
    with pytest.raises(KVTierError) as info:
        build_backend("redis://127.0.0.1:6379/0", options={"password": 8675309, "ttl": -1})
    assert "8675309" not in str(info.value)


def test_a_closed_backend_names_its_url_without_the_password() -> None:
    import asyncio

    from kvtier.core.factory import build_backend

    backend = build_backend(f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:1/0")
    asyncio.run(backend.close())
    with pytest.raises(KVTierError) as info:
        asyncio.run(backend.get_many(["m.0123456789abcdef0123456789abcdef"]))
    assert not leaked(str(info.value)) and "***" in str(info.value)


REFUSED_URLS = {  # a secret in a URL a backend refuses: its error quotes the URL
    "s3 credentials in the URL": "s3://AKIAEXAMPLE:{secret}@bucket/p",
    "s3 query": "s3://bucket/p?token={secret}",
    "mooncake user": "mooncake://u:{secret}@127.0.0.1:50051",
    "vineyard user": "vineyard://u:{secret}@127.0.0.1:9600",
    "file host": "file://u:{secret}@/tmp/kv",
    "nixl query": "nixl://group?secret={secret}",
    "a short password": "file://u:{secret}@/tmp/kv",
}


@pytest.mark.parametrize("case", REFUSED_URLS)
def test_a_refused_url_is_quoted_without_its_secret(case: str, monkeypatch, capsys) -> None:
    secret = "ab" if case == "a short password" else "Very$ecret/42"
    url = REFUSED_URLS[case].format(secret=secret)
    tier = {"url": url, "capacity": "1GiB", "options": {"metadata_server": "P2PHANDSHAKE"}}
    with pytest.raises(KVTierError) as err:
        KVTier.open({"tiers": [tier]}, model="m", layout=LAYOUT).close()
    message = str(err.value)
    assert "***" in message and f":{secret}@" not in message and f"={secret}" not in message
    if len(secret) > 2:
        assert secret not in message, message
