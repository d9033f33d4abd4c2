"""Fixtures the server tests share."""
from __future__ import annotations

import openai
import pytest

from server_utils import BackgroundServer


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    """The official SDK against the module's `server` fixture (each test module starts its own server)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
