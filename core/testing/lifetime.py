"""Conformance tests of buffer ownership, close and reopen, and the error contract."""

from __future__ import annotations

import pytest

from kvtier.core.backend import Backend
from kvtier.core.errors import BackendUnavailableError, ConfigError
from kvtier.core.testing.base import SuiteBase
from kvtier.core.testing.harness import (
    INVALID_KEYS,
    BackendHarness,
    assert_blob,
    collect,
    expect_error,
    expect_no_error,
    keyed_calls,
    require,
    scratch,
)


class LifetimeTests(SuiteBase):
    """Who owns which buffer, what survives ``close()``, and which errors are raised."""

    # -- buffer ownership ----------------------------------------------------------------

    def test_put_does_not_take_ownership(self, backend_harness: BackendHarness) -> None:
        """The caller may release a buffer once ``put_many`` returns; the value stays."""
        h = backend_harness
        key, buf = h.key(), h.blob(3 * 4096 + 5)
        want = bytes(buf.view)

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, buf)]) == [True]
            assert buf.refcount >= 1, "put_many released the caller's reference"
            buf.release()
            h.clobber_freed(len(want))
            what = "get_many after the caller released the buffer it put"
            [got] = await expect_no_error(what, lambda: backend.get_many([key]))
            assert_blob(got, want, what)

        h.run(body)

    def test_returned_buffers_belong_to_caller(self, backend_harness: BackendHarness) -> None:
        """Each buffer ``get_many`` returns carries its own reference for the caller: the
        value survives the caller releasing them all."""
        h = backend_harness
        key, buf = h.key(), h.blob(20_000)
        want = bytes(buf.view)

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, buf)]) == [True]
            first, second = await backend.get_many([key, key])
            assert first is not None and second is not None, "get_many missed a stored key"
            first.release()
            h.clobber_freed(len(want))
            assert_blob(second, want, "a returned buffer after another was released")
            second.release()
            buf.release()  # the caller now holds nothing: the value is the backend's alone
            h.clobber_freed(len(want))
            what = "get_many after the caller released every buffer it had"
            [third] = await expect_no_error(what, lambda: backend.get_many([key]))
            assert_blob(third, want, what)

        h.run(body)

    @pytest.mark.parametrize("change", ["overwrite", "delete"])
    def test_returned_buffer_survives_change(
        self, backend_harness: BackendHarness, change: str
    ) -> None:
        """A buffer read earlier keeps its bytes when the key is overwritten or deleted."""
        h = backend_harness
        key, buf, new = h.key(), h.blob(50_000), h.blob(50_000)
        want = bytes(buf.view)

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, buf)]) == [True]
            [got] = await backend.get_many([key])
            buf.release()
            if change == "overwrite":
                assert await backend.put_many([(key, new)]) == [True]
            else:
                assert await backend.delete_many([key]) == [True]
            h.clobber_freed(len(want))
            assert_blob(got, want, f"a buffer read before the {change}")
            [after] = await backend.get_many([key])
            if change == "overwrite":
                assert_blob(after, new, "the new value")
            else:
                assert after is None, "get_many returned a deleted key"

        h.run(body)

    def test_close_releases_buffers(self, backend_harness: BackendHarness) -> None:
        """After ``close()`` the backend holds no reference to any buffer it was given."""
        h = backend_harness
        items = h.items([10, 5000, 70_000])

        async def body(backend: Backend) -> None:
            assert await backend.put_many(items) == [True] * 3
            for got in await backend.get_many([key for key, _ in items]):
                assert got is not None, "get_many missed a stored key"
                got.release()
            await backend.close()
            refs = [buf.refcount for _, buf in items]
            assert refs == [1, 1, 1], f"buffer references after close() (caller's = 1): {refs}"

        h.run(body)

    def test_persistence(self, backend_harness: BackendHarness) -> None:
        """A persistent backend serves its data again after close and reopen."""
        h = backend_harness
        items = h.items([0, 1, 5000, 300_000])

        async def body(backend: Backend) -> None:
            require(backend, "persistent")
            assert await backend.put_many(items) == [True] * len(items)
            await backend.close()
            reopened = await h.open()
            try:
                got = await reopened.get_many([key for key, _ in items])
                for (key, buf), blob in zip(items, got, strict=True):
                    assert_blob(blob, buf, f"{key} after reopening")
                if reopened.capabilities.listing:
                    listed = await collect(reopened.iter_keys(h.prefix))
                    assert sorted(listed) == sorted(key for key, _ in items), (
                        f"iter_keys after reopening listed {len(listed)} of {len(items)} keys"
                    )
            finally:
                await reopened.close()

        h.run(body)

    # -- errors --------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "bad_key", INVALID_KEYS, ids=["dotdot", "slash", "empty", "too-long", "hidden"]
    )
    def test_invalid_key_rejected(self, backend_harness: BackendHarness, bad_key: str) -> None:
        """Every method raises ``ConfigError`` for an invalid key, alone or in a batch."""
        h = backend_harness
        good, buf = h.key(), h.blob(100)

        async def body(backend: Backend) -> None:
            for name, call in keyed_calls(backend, bad_key, buf).items():
                await expect_error(ConfigError, f"{name} with key {bad_key[:20]!r}", call)
            mixed = {
                "get_many": lambda: backend.get_many([good, bad_key]),
                "put_many": lambda: backend.put_many([(good, buf), (bad_key, buf)]),
                "contains_many": lambda: backend.contains_many([good, bad_key]),
                "delete_many": lambda: backend.delete_many([good, bad_key]),
                "read_into_many": lambda: backend.read_into_many(
                    [(good, 0, scratch(16)), (bad_key, 0, scratch(16))]
                ),
            }
            for name, call in mixed.items():
                await expect_error(ConfigError, f"{name} with a valid and an invalid key", call)
            assert await backend.put_many([(good, buf)]) == [True]
            [got] = await backend.get_many([good])
            assert_blob(got, buf, "a valid key after the rejected calls")

        h.run(body)

    def test_closed_backend_is_unavailable(self, backend_harness: BackendHarness) -> None:
        """After ``close()`` (which may be repeated) every method raises
        ``BackendUnavailableError``."""
        h = backend_harness
        key, buf = h.key(), h.blob(100)

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, buf)]) == [True]
            await backend.close()
            await backend.close()
            calls = keyed_calls(backend, key, buf)
            calls["iter_keys"] = lambda: collect(backend.iter_keys())
            calls["stats"] = backend.stats
            for name, call in calls.items():
                await expect_error(BackendUnavailableError, f"{name} after close()", call)

        h.run(body)

    def test_stopped_server_is_unavailable(self, backend_harness: BackendHarness) -> None:
        """With its server stopped, every batch method raises ``BackendUnavailableError``."""
        self.require_hooks("stop_server")
        h = backend_harness
        key, buf = h.key(), h.blob(100)

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, buf)]) == [True]
            self.stop_server(h.url)
            for name, call in keyed_calls(backend, key, buf).items():
                await expect_error(BackendUnavailableError, f"{name} with the server down", call)

        h.run(body)
