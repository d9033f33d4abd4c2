"""`qwenstack models`: what can be run offline: the bundled demo model and the local Hugging Face cache
(where `qwenstack pull` puts models), with sizes and how the weights are stored (dtype or quantization)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from qwenstack.commands import Command
from qwenstack.commands._common import human_size
from qwenstack.resolve import DEMO_NAMES

DEMO_NAME = DEMO_NAMES[0]


@dataclass
class LocalModel:
    name: str
    path: str
    size_bytes: int
    model_type: str | None  # config.json model_type; None when unreadable
    qwen3: bool  # a Qwen3-family architecture (qwen3, qwen3_moe, qwen3_next, qwen3_vl, ...)
    bundled: bool = False
    quantization: str | None = None  # "fp8", "awq 4-bit", "gptq 8-bit", ... or the weights' dtype


def _read_config(model_dir: Path) -> dict:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def read_model_type(model_dir: Path) -> str | None:
    model_type = _read_config(model_dir).get("model_type")
    return model_type if isinstance(model_type, str) else None


def quantization_of(config: dict) -> str | None:
    """How the checkpoint's weights are stored: its quantization_config, else its dtype."""
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method"):
        bits = quant.get("bits") or quant.get("w_bit")
        return f"{quant['quant_method']}" + (f" {bits}-bit" if bits else "")
    dtype = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype")
    return dtype if isinstance(dtype, str) else None


def _local_model(name: str, path: Path, size: int, bundled: bool = False) -> LocalModel:
    config = _read_config(path)
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    return LocalModel(name, str(path), size, model_type, bool(model_type and model_type.startswith("qwen3")), bundled,
                      quantization_of(config))


def demo_model() -> LocalModel:
    from qwenstack.loading import DEMO_MODEL_DIR

    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.rglob("*") if f.is_file()) if DEMO_MODEL_DIR.is_dir() else 0
    return _local_model(DEMO_NAME, DEMO_MODEL_DIR, size, bundled=True)


def cache_dir() -> Path:
    from qwenstack.resolve import hub_cache_dir

    explicit = hub_cache_dir()
    if explicit:
        return Path(explicit)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_models(directory: Path) -> tuple[list[LocalModel], list[str]]:
    """Model repositories in the cache (newest revision each), and warnings about unreadable entries."""
    if not directory.is_dir():
        return [], []
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(directory)
    except Exception as exc:  # noqa: BLE001 - a broken cache is reported, not a crash
        return [], [f"could not read the cache at {directory}: {exc}"]
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = next((r for r in repo.revisions if "main" in r.refs), None)
        revision = revision or max(repo.revisions, key=lambda r: r.last_modified)
        models.append(_local_model(repo.repo_id, Path(revision.snapshot_path), repo.size_on_disk))
    return models, [str(w) for w in info.warnings]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.add_argument("--qwen3-only", action="store_true", help="list only Qwen3-family models")


def run(args: argparse.Namespace) -> int:
    directory = cache_dir()
    cached, warnings = cached_models(directory)
    models = [demo_model()] + cached
    if args.qwen3_only:
        models = [m for m in models if m.qwen3]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"cache_dir": str(directory), "models": [asdict(m) for m in models]}, indent=2))
        return 0
    rows = [("NAME", "SIZE", "TYPE", "QUANTIZATION", "QWEN3", "PATH")]
    for m in models:
        name = m.name if not m.bundled else f"{m.name} (bundled{'' if m.size_bytes else ', missing'})"
        size = human_size(m.size_bytes) if m.size_bytes else "-"
        rows.append((name, size, m.model_type or "?", m.quantization or "?", "yes" if m.qwen3 else "no", m.path))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5])
    where = f"{len(cached)} cached" if directory.is_dir() else "no cache yet"
    print(f"\nHugging Face cache: {directory} ({where}). Run one with `qwenstack chat NAME`.")
    return 0


COMMANDS = [Command("models", "List the models available offline (local Hugging Face cache, bundled demo)",
                    add_arguments, run, order=40)]
