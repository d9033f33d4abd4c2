"""The package's shape: no import cycles between qwenstack modules, and the scheduling layer (sampling
parameters, sequences, block manager, state-slot pool, scheduler) imports and schedules without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwenstack"
SCHEDULING_LAYER = ["qwenstack.engine.params", "qwenstack.engine.sequence", "qwenstack.engine.block_manager",
                    "qwenstack.engine.slot_pool", "qwenstack.engine.scheduler"]


def module_imports() -> dict[str, set[str]]:
    """Every qwenstack module and the qwenstack modules it imports anywhere in its body (function-level
    and TYPE_CHECKING imports included: a cycle hidden in a function is still a cycle in the design)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in modules and t != name and t != "qwenstack"}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert cycles(module_imports()) == []


def test_scheduling_layer_imports_without_torch() -> None:
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch' or name.startswith('torch.'):\n"
               "            raise ImportError('torch is blocked in this test')\n"
               "sys.meta_path.insert(0, Block())\n"
               f"for name in {SCHEDULING_LAYER!r}:\n"
               "    __import__(name)\n"
               "from qwenstack.engine.block_manager import BlockManager\n"
               "from qwenstack.engine.params import SamplingParams\n"
               "from qwenstack.engine.scheduler import Scheduler, SchedulerConfig\n"
               "from qwenstack.engine.sequence import Sequence\n"
               "scheduler = Scheduler(SchedulerConfig(), BlockManager(num_blocks=8, block_size=4))\n"
               "seq = Sequence(0, 'r', 0, [1, 2, 3, 4, 5], SamplingParams(seed=7, temperature=0.5), max_tokens=4)\n"
               "scheduler.add([seq])\n"
               "batch = scheduler.schedule()\n"
               "assert batch.seqs == [seq] and seq.block_table and seq.generator is None\n"
               "from qwenstack.engine.slot_pool import SlotPool\n"
               "slots = SlotPool(1)\n"
               "hybrid = Scheduler(SchedulerConfig(), BlockManager(num_blocks=8, block_size=4), state_slots=slots)\n"
               "a, b = (Sequence(i, 'r', 0, [1, 2, 3], SamplingParams(), max_tokens=4) for i in (1, 2))\n"
               "hybrid.add([a, b])\n"
               "assert hybrid.schedule().seqs == [a] and a.state_slot == 0 and not slots.free  # b waits for a slot\n"
               "hybrid.finish(a, 'stop')\n"
               "assert hybrid.schedule().seqs == [b] and b.state_slot == 0\n"
               "assert 'torch' not in sys.modules\n"
               "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
