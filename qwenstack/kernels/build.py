"""Building and loading the native CPU kernels: which instruction-set level this CPU gets, and one
torch extension per .cpp file next to this module, compiled the first time one of its ops is needed.

Decisions:
- Built with torch.utils.cpp_extension.load (needs a C++ compiler and ninja) into torch's extension cache
  (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR): a few seconds of CPU per file once per machine and
  torch version, then a fraction of a second to load per process. The C++ uses torch's stable API
  (torch >= 2.10) and registers its ops under torch.ops.qwenstack without pybind11.
- Each .cpp file is its own extension, and the ops a file defines are read from its `m.def("name(...")`
  lines: a file that fails to compile disables only its own ops, and adding an op needs no table here.
  (decode_layer_cpu.cpp compiles four other op files into its own extension, for their functions.)
- torch rebuilds an extension when its listed source changes, not its includes; every build gets a digest of
  all the kernel files as a define, so a change to a header or to a file another one includes rebuilds
  what uses it (an upgrade with torch's extension cache kept included).
- SIMD is written with GCC/Clang generic vectors, so the flags pick the instructions. They follow torch's
  own dispatch level (torch.backends.cpu.get_cpu_capability()): AVX512 builds with the AVX-512 F/BW/VL/DQ
  set torch's AVX512 kernels use, AVX2 with AVX2/FMA/F16C, anything else (other x86, ARM) with plain -O3.
  An AVX512 CPU that also has AVX512-BF16 and AVX512-VNNI (Cooper Lake, Sapphire Rapids and later, Zen 4)
  builds at its own level, which adds the bfloat16 and int8 dot-product loops of the linear kernels.
  Not -march=native: the level is part of the library name, so a cache shared between machines (NFS home,
  a copied image) never hands one CPU a binary built for another.
- Availability is decided once per process and per file. A failed build logs one line and the callers keep
  using the pure-torch reference path. QWENSTACK_DISABLE_KERNELS=1 forces that path; it is read once per
  process (a decode step asks hundreds of times), and tests that flip it patch `kernels_disabled` here.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("qwenstack.kernels")

KERNEL_DIR = Path(__file__).parent
SOURCES = tuple(sorted(KERNEL_DIR.glob("*.cpp")))
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx512_bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                    "-mavx512bf16", "-mavx512vnni"],
    "avx512_amx": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                   "-mavx512bf16", "-mavx512vnni", "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}


@functools.cache
def kernels_disabled() -> bool:
    return os.environ.get("QWENSTACK_DISABLE_KERNELS", "").strip() not in ("", "0")


ISA_LEVELS = ("generic", "avx2", "avx512", "avx512_bf16", "avx512_amx")


@functools.cache
def isa_level() -> str:
    """The build level for this CPU; QWENSTACK_KERNEL_ISA picks a lower one (tests build every level the
    machine can run, so the loops of each are exercised). Fixed for the process, and cached: layers ask per
    call (kernels.has_amx), and reading the CPU's capabilities took microseconds each time."""
    forced = os.environ.get("QWENSTACK_KERNEL_ISA", "").strip()
    if forced:
        if forced not in ISA_LEVELS:
            raise ValueError(f"QWENSTACK_KERNEL_ISA={forced!r}: expected one of {', '.join(ISA_LEVELS)}")
        if forced == "avx512_amx" and not _amx_permitted():
            raise ValueError("QWENSTACK_KERNEL_ISA=avx512_amx: the kernel refused this process the AMX tile registers")
        return forced
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if capability == "AVX512" and _has_cpu_features("avx512_bf16", "avx512_vnni"):
        # AMX also needs the kernel's permission to use the tile registers (asked once per process).
        if _has_cpu_features("amx_tile", "amx_bf16", "amx_int8") and _amx_permitted():
            return "avx512_amx"
        return "avx512_bf16"
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "generic")


@functools.cache
def _amx_permitted() -> bool:
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    return bool(init_amx and init_amx())


def _has_cpu_features(*names: str) -> bool:
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    if get_capabilities is None:
        return False
    capabilities = get_capabilities()
    return all(bool(capabilities.get(name)) for name in names)


def sources_digest(directory: Path) -> str:
    """A digest of every .cpp and .h file in `directory`, names and contents."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".cpp", ".h")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def kernel_sources_digest() -> str:
    """The kernel files' digest, part of each build's flags: torch's extension cache hashes the listed source
    alone, and this makes it rebuild when anything a file includes changes."""
    return sources_digest(KERNEL_DIR)


_OP_DEF = re.compile(r'm\.def\(\s*"(\w+)\(')


@functools.cache
def op_sources() -> dict[str, Path]:
    """Each op name -> the .cpp file that defines it."""
    return {name: source for source in SOURCES for name in _OP_DEF.findall(source.read_text())}


# torch's extension build holds a lock file in its build folder while it compiles, and a process stopped
# mid-build without its cleanup (SIGTERM, SIGKILL, a container stopped) leaves the lock behind: every later
# start then waited on it forever, the server saying "loading model(s)". Each qwenstack build marks the folder
# with its PID first (lock.owner.PID), so a lock none of whose markers is a live process is known stale.
# A lock with no marker can only be an older qwenstack's (this one marks before it locks); stale after:
UNMARKED_LOCK_SECONDS = 300


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clear_stale_lock(build_dir: Path) -> bool:
    """Removes the build folder's lock (and its markers) where no live process holds it; whether it did."""
    lock = build_dir / "lock"
    if not lock.exists():
        return False
    owners = [path for path in build_dir.glob("lock.owner.*") if path.suffix[1:].isdigit()]
    if any(_pid_alive(int(path.suffix[1:])) for path in owners):
        return False
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:  # released meanwhile
        return False
    if not owners and age < UNMARKED_LOCK_SECONDS:
        return False
    log.warning("removing the kernel build lock %s: the process that took it stopped mid-build", lock)
    for path in (lock, *owners):
        path.unlink(missing_ok=True)
    return True


def wait_for_build_lock(build_dir: Path, poll_seconds: float = 0.2) -> None:
    """Returns once the build folder has no lock, clearing it where it is stale: torch's own wait on a lock
    never ends when its holder is gone."""
    said = False
    while (build_dir / "lock").exists() and not clear_stale_lock(build_dir):
        if not said:
            log.info("waiting for another process's kernel build in %s", build_dir)
            said = True
        time.sleep(poll_seconds)


def _build(source: Path) -> None:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        # pip's ninja sits next to the interpreter; a venv used without activation is not on PATH.
        bin_dir = Path(sys.executable).parent
        if (bin_dir / "ninja").exists():
            os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    if tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2]) < (2, 10):
        raise RuntimeError(f"needs torch >= 2.10 (stable C++ API), this is {torch.__version__}")
    isa = isa_level()
    name = re.sub(r"\W", "_", f"qwenstack_{source.stem}_{isa}_torch{torch.__version__}")
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    wait_for_build_lock(build_dir)
    owner = build_dir / f"lock.owner.{os.getpid()}"
    owner.touch()
    try:
        cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=["-O3", *_ISA_FLAGS.get(isa, []), f"-DQWENSTACK_KERNEL_SOURCES={kernel_sources_digest()}"],
            is_python_module=False,
            verbose=False,
        )
    finally:
        owner.unlink(missing_ok=True)


@functools.cache
def library_loaded(source: Path) -> bool:
    """Builds (once per machine) and loads one .cpp file's extension; False when that fails."""
    start = time.perf_counter()
    try:
        _build(source)
    except Exception as exc:  # any build or load failure means: use the reference path for this file's ops
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("native CPU kernels of %s unavailable, using the torch path: %s", source.name, first_line[:300])
        return False
    log.info("native CPU kernels of %s ready (%s, %.1f s)", source.name, isa_level(), time.perf_counter() - start)
    return True


def build_all() -> dict[str, bool]:
    """Builds (where not cached) and loads every .cpp file's extension at once, one thread per file: each
    compile is its own compiler process, so on a fresh machine they share the cores instead of queueing
    behind the first op that needs them.
    Each file's name -> whether its ops are available; {} with the kernels disabled."""
    if kernels_disabled():
        return {}
    isa_level()  # probe the CPU once, before the threads
    with ThreadPoolExecutor(max_workers=len(SOURCES) or 1, thread_name_prefix="kernel-build") as pool:
        return dict(zip((source.name for source in SOURCES), pool.map(library_loaded, SOURCES)))


def native_op(name: str) -> Callable[..., torch.Tensor] | None:
    """The native op, or None when it cannot run here (kernels disabled, its file failed to build): the
    caller then takes the torch reference path. Every wrapper in kernels/ops.py goes through this."""
    if kernels_disabled():
        return None
    source = op_sources().get(name)
    if source is None or not library_loaded(source):
        return None
    return _resolved(name)


@functools.cache
def _resolved(name: str) -> Callable[..., torch.Tensor]:
    return getattr(torch.ops.qwenstack, name).default  # the overload itself: skips a dispatch on each call
