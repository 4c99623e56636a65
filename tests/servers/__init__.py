"""Real servers for backend tests, started on 127.0.0.1 by pytest fixtures.

Each module here is loaded as a pytest plugin by ``tests/conftest.py``. A server whose
package is not installed skips its tests, unless ``KVTEST_REQUIRE_SERVERS=1`` (set by
``.ci/run``), which turns the skip into a failure so CI never passes by skipping.
"""
