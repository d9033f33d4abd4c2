"""Schemathesis against the server's own OpenAPI document: every operation, with generated valid and invalid
requests, must answer without a 5xx and exactly as the document says (status codes, content types, response
schemas). A bounded run in the default suite; `-m slow` runs many more examples per operation.

The served model has a 48-token context, so whatever the fuzzer asks for (n=64, ignore_eos, long prompts)
a generation stays short."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import schemathesis

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, negative_data_rejection, response_schema_conformance, status_code_conformance,
)

from server_utils import BackgroundServer, tiny_served_model  # noqa: E402
from qwenstack.serving.app import create_app  # noqa: E402
from qwenstack.serving.config import ServerConfig  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
FAST = settings(max_examples=4, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
THOROUGH = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_server(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    model = tiny_served_model(tiny_qwen3, max_model_len=48, max_num_seqs=8)
    config = ServerConfig(ui_db_path=str(tmp_path_factory.mktemp("fuzz") / "chats.db"))
    with BackgroundServer(create_app([model], config)) as srv:
        yield srv


def nothing_to_invalidate(operation: Any) -> bool:
    """Whether every input of the operation is a free-form path string: any value is then valid, and negative
    generation only ends Unsatisfiable, after about a second of draws per operation."""
    if list(operation.body) or list(operation.query) or list(operation.headers) or list(operation.cookies):
        return False
    free_form = {"type": "string"}
    return all({k: v for k, v in p.definition.get("schema", {}).items() if k not in ("title", "description")}
               == free_form for p in operation.path_parameters)


def fuzz(server: BackgroundServer, examples: settings) -> list[str]:
    """Runs every operation of the server's document in both generation modes; the failures, one line each."""
    api = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([] if nothing_to_invalidate(operation) else [GenerationMode.NEGATIVE])
        for mode in modes:
            @examples
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                case.call_and_validate(checks=CHECKS, timeout=60)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (no parameters, or a free-form path string)
                continue
            except Exception as exc:  # one line per failing operation and mode, then the next operation
                failures.append(f"{operation.label} [{mode.value}]: {type(exc).__name__}: {str(exc)[:1500]}")
    return failures


def test_every_operation_answers_as_documented(fuzz_server: BackgroundServer) -> None:
    failures = fuzz(fuzz_server, FAST)
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_every_operation_answers_as_documented_thoroughly(fuzz_server: BackgroundServer) -> None:
    failures = fuzz(fuzz_server, THOROUGH)
    assert not failures, "\n\n".join(failures)
