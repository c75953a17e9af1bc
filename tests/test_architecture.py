"""The package's imports run one way (docs/architecture.md), read from the source with `ast`:

    errors, logging < config < data, kernels < ops < model < parallel < checkpoint < inference < training
    < cli, testing

A module imports from its own package or from a lower layer, never from a higher one; `megamoe.data` rests on
config, errors and logging alone; no import cycle; and no import inside a function unless it guards
an optional dependency (or the Triton kernels, which must wait for TRITON_INTERPRET and a CUDA tensor); and
the Topology is the one module that reaches megatron-core's process groups.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {"megamoe.errors": 0, "megamoe.logging": 0, "megamoe.config": 1, "megamoe.data": 2, "megamoe.kernels": 2,
          "megamoe.ops": 3, "megamoe.model": 4, "megamoe.parallel": 5, "megamoe.checkpoint": 6,
          "megamoe.inference": 7, "megamoe.training": 8, "megamoe.cli": 9, "megamoe.testing": 9}
DATA_RESTS_ON = {"megamoe.config", "megamoe.errors", "megamoe.logging", "megamoe.data"}
# What may be imported inside a function: dependencies a machine may lack, and the Triton kernels.
OPTIONAL = ("apex", "transformer_engine", "mpi4py", "torch.utils.tensorboard", "wandb", "megamoe.kernels", "pyarrow",
            "tokenizers")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict:
    files = list((ROOT / "megamoe").rglob("*.py"))
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in files}


def _imports(tree: ast.Module, modules: set) -> list:
    """(imported megamoe module or third-party name, line, inside a function) of every import in `tree`."""
    out, in_function = [], set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from megamoe import checkpoint` imports the module megamoe.checkpoint, `from megamoe.config import
            # Config` the module megamoe.config; outside megamoe the full name is kept (megatron.core.parallel_state)
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                     or not node.module.startswith("megamoe") else node.module for a in node.names]
        out += [(name, node.lineno, id(node) in in_function) for name in names]
    return out


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def upward_imports(graph: dict) -> list:
    """Imports of a higher layer (or, from data, of anything but what it rests on)."""
    against = []
    for module, imports in graph.items():
        unit = _unit(module)
        if module == "megamoe":
            continue
        for name, line, _ in imports:
            if not name.startswith("megamoe.") or _unit(name) == unit:
                continue
            target = _unit(name)
            if LAYERS[target] >= LAYERS[unit] or (unit == "megamoe.data" and target not in DATA_RESTS_ON):
                against.append(f"{module}:{line} imports {name}")
    return against


def import_cycles(graph: dict) -> list:
    """Import cycles, each as 'a -> b -> a' (an import inside a function closes a cycle too)."""
    edges = {m: sorted({n for n, _, _ in imports if n in graph and n != m})
             for m, imports in graph.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in edges[m]:
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return cycles


def group_doors(graph: dict) -> list:
    """Modules other than the Topology's that reach megatron-core's process groups directly."""
    return [f"{m}:{line} imports {name}" for m, imports in graph.items() for name, line, _ in imports
            if name.startswith("megatron.core.parallel_state") and m != "megamoe.parallel.topology"]


def lazy_imports(graph: dict) -> list:
    """Imports inside functions of anything but an optional dependency."""
    return [f"{m}:{line} imports {name}" for m, imports in graph.items() for name, line, inside in imports
            if inside and not name.startswith(OPTIONAL)]


@pytest.fixture(scope="module")
def graph():
    sources = _sources()
    modules = set(sources)
    return {m: _imports(tree, modules) for m, tree in sources.items()}


def test_every_module_has_a_layer(graph):
    assert sorted({_unit(m) for m in graph if m != "megamoe"} - set(LAYERS)) == []


def test_imports_run_down_the_layers(graph):
    assert upward_imports(graph) == []


def test_no_import_cycle(graph):
    assert import_cycles(graph) == []


def test_topology_is_the_one_door_to_process_groups(graph):
    assert group_doors(graph) == []


def test_imports_inside_functions_guard_optional_dependencies(graph):
    assert lazy_imports(graph) == []


def test_the_checks_catch_what_they_forbid():
    """A planted upward import, a cycle, a lazy import and data reaching past config are each reported."""
    sources = {
        "megamoe.model.lm": "from megamoe.training import train\n",
        "megamoe.training.step": "from megamoe.training.loop import run\n",
        "megamoe.training.loop": "from megamoe.training.step import one\n\ndef f():\n    import yaml\n",
        "megamoe.data.datasets": "from megamoe.model import MambaLM\nfrom megamoe.config import Config\n",
        "megamoe.parallel.pipeline": "from megatron.core import parallel_state\n",
    }
    graph = {m: _imports(ast.parse(src), set(sources)) for m, src in sources.items()}
    assert upward_imports(graph) == ["megamoe.model.lm:1 imports megamoe.training",
                                     "megamoe.data.datasets:1 imports megamoe.model"]
    assert import_cycles(graph) == ["megamoe.training.loop -> megamoe.training.step -> megamoe.training.loop"]
    assert lazy_imports(graph) == ["megamoe.training.loop:4 imports yaml"]
    assert group_doors(graph) == ["megamoe.parallel.pipeline:1 imports megatron.core.parallel_state"]
