import os
import sys
import tempfile
from pathlib import Path

# Idle OpenMP workers sleep instead of spinning: on 2 shared cores, spinning threads starve the test's
# own work; results are unchanged. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "support"))  # fixture builders and helpers
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))  # tokenizer_training: builds fixture tokenizers
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers built without a database path keep their chat and response stores here, not in the user's home.
os.environ.setdefault("QWENSTACK_HOME", tempfile.mkdtemp(prefix="qwenstack-tests-"))
# Under scripts/test.sh's workers (pytest-xdist, one more than the cores) each worker's torch runs one
# thread; a test that needs more sets its own.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if WORKER else max(1, min(2, os.cpu_count() or 1)))

from checkpoints import build_hf_checkpoint, dense_config, moe_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", dense_config())


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe", moe_config())


@pytest.fixture(scope="session")
def native_omni(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random Qwen3-Omni Instruct checkpoint of the server, Talker-batch and voice-mode tests (built once:
    it takes a good part of a minute on shared cores). Its Talker never says EOS on their short prompts."""
    from omni_checkpoints import build_native_omni_checkpoint

    return build_native_omni_checkpoint(tmp_path_factory.mktemp("omni"), seed=5)


# Files that take longest go first: the workers take whole files in collection order, and a long file taken
# last leaves the other worker idle at the end (the browser tests and these are the suite's longest files).
FIRST = ("tests/ui/", "tests/serving/test_fuzz_api.py", "tests/translate/test_translate_session.py",
         "tests/serving/test_faults.py", "tests/audio/test_live_transcription.py")


def pytest_sessionstart(session: pytest.Session) -> None:
    # scripts/install.sh has compiled the native kernels, so they only load here; a pytest run without it
    # compiles them first, all files at once (two workers share the builds).
    from qwenstack.kernels import build_all

    build_all()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if WORKER is not None:
        items.sort(key=lambda item: not item.nodeid.startswith(FIRST))  # stable: the order within stays
