"""Resumable downloads into the Hugging Face cache (what `qwenstack pull` uses).

Decisions:
- huggingface_hub 2.x writes each file to a process-unique temporary file, so a pull interrupted by Ctrl-C or
  a dropped connection starts that file again from byte 0 on the next run; for multi-GB shards that is the
  difference between a resumable pull and not. Here each missing file is fetched into the cache's own blob
  path + ".partial" with HTTP Range requests continuing whatever is already there, then renamed to the blob;
  snapshot_download then finds every blob present and only links the snapshot (its normal layout: any HF
  tool reads the result).
- The plan (files, sizes, what is already cached) is a snapshot_download dry run, shown before any byte moves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20


@dataclass
class PullPlan:
    repo_id: str
    revision: str | None
    files: list[Any]  # huggingface_hub DryRunFileInfo
    options: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(f.file_size or 0 for f in self.files)

    @property
    def missing_bytes(self) -> int:
        return sum(f.file_size or 0 for f in self.files if f.will_download)

    @property
    def destination(self) -> Path | None:
        return Path(self.files[0].local_path).parent if self.files else None


def plan_pull(repo_id: str, *, revision: str | None, cache_dir: Path, allow_patterns: list[str]) -> PullPlan:
    from huggingface_hub import snapshot_download

    options = {"revision": revision, "cache_dir": cache_dir, "allow_patterns": allow_patterns,
               "endpoint": os.environ.get("HF_ENDPOINT") or None}
    files = snapshot_download(repo_id, dry_run=True, **options)
    return PullPlan(repo_id, revision, list(files), options)


def _fetch_blob(url: str, blob: Path, size: int | None, headers: dict[str, str], progress: Any) -> None:
    import httpx

    partial = blob.with_name(blob.name + ".partial")
    have = partial.stat().st_size if partial.exists() else 0
    if size is not None and have > size:
        partial.unlink()
        have = 0
    progress.update(have)
    if size is None or have < size:
        request_headers = {**headers, **({"Range": f"bytes={have}-"} if have else {})}
        with httpx.stream("GET", url, headers=request_headers, follow_redirects=True, timeout=30) as response:
            response.raise_for_status()
            mode = "ab" if have and response.status_code == 206 else "wb"
            if mode == "wb":
                progress.update(-have)  # the server ignored the range: start over
            with partial.open(mode) as out:
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    out.write(chunk)
                    progress.update(len(chunk))
    if size is not None and partial.stat().st_size != size:
        raise OSError(f"{blob.name}: got {partial.stat().st_size} bytes, expected {size}; run again to resume")
    partial.replace(blob)


def pull(plan: PullPlan) -> Path:
    """Fetches the plan's missing files (resuming partial ones), then links the snapshot. Returns its path."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, snapshot_download
    from huggingface_hub.utils import build_hf_headers
    from tqdm.auto import tqdm

    headers = build_hf_headers()
    todo = [f for f in plan.files if f.will_download]
    with tqdm(total=plan.missing_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=plan.repo_id) as progress:
        for f in todo:
            url = hf_hub_url(plan.repo_id, f.filename, revision=f.commit_hash, endpoint=plan.options["endpoint"])
            meta = get_hf_file_metadata(url, headers=headers)
            repo_dir = Path(f.local_path).parents[2]  # <cache>/models--org--name/snapshots/<commit>/<file>
            blobs = repo_dir / "blobs"
            blobs.mkdir(parents=True, exist_ok=True)
            blob = blobs / meta.etag
            if not blob.exists():
                _fetch_blob(meta.location, blob, meta.size, headers, progress)
    return Path(snapshot_download(plan.repo_id, **plan.options))
