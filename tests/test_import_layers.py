"""Import layers of the three packages, read from their source (no import needed, except one torch-free check).

- ``trainer`` never imports ``dino_ctl`` or ``curation``; ``curation`` never imports ``dino_ctl``.
- Importing ``dino_ctl`` (any of its modules) never loads torch.
- Only ``dino_ctl/kube.py`` talks to the Kubernetes API server (imports the ``kubernetes`` client).
- No import cycle between modules, and no function-level import that only hides one: a function-level import is
  allowed only where it defers a heavy dependency on purpose (:data:`DEFERRED`, each with its reason), directly or
  through a project module that loads one the importing module does not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "dino_ctl", "curation")

DEFERRED = {
    "torch": "the trainer's maths: the CLI, the spec and curation's planning start without it",
    "torchvision": "image transforms and pretrained-model plumbing (loads torch)",
    "safetensors": "weight files, only when exporting or loading a backbone",
    "xformers": "optional CUDA attention kernels",
    "streaming": "MDS reading and writing (mosaicml-streaming pulls boto3/azure clients)",
    "faiss": "k-NN and k-means for curation",
    "scipy": "connected components of the duplicate graph only",
    "matplotlib": "the report plot of dino-ctl run",
    "pydantic": "the spec models: dino-ctl --help and other commands start without them",
    "numpy": "array maths of data preparation: the control plane's commands start without it",
    "PIL": "image decoding, only when preparing or reading images",
    "rich": "console tables and progress bars, only when printing them",
    "kubernetes": "the API client (dino_ctl/kube.py), only for commands that talk to a cluster",
    "urllib3": "the API client's transport errors (dino_ctl/kube.py)",
    "kopf": "the controller's operator framework, only when the controller runs",
    "torchx": "the TorchX backend's dry run, only when rendering it",
    "helm_python": "rendering the chart, a development tool",
    "jsonschema": "strict offline validation of rendered objects, a development tool",
    "kubernetes_validate": "strict offline validation of rendered objects, a development tool",
}
"""Third-party packages that modules import inside a function on purpose, and why."""

# dino_ctl modules allowed to import the kubernetes package, and what for.
KUBERNETES_USERS = {
    "dino_ctl.kube": "the one module that talks to the API server",
    "dino_ctl.render.torchx": "ApiClient.sanitize_for_serialization turns torchx's dry-run objects into plain dicts "
                              "(no API call)",
}


@dataclass
class Module:
    name: str
    path: Path
    top: set[str] = field(default_factory=set)
    """Modules imported at module level (project modules by name, third-party ones by top-level package)."""
    deferred: list[tuple[int, str]] = field(default_factory=list)
    """(line, module) of the imports inside functions."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Module]:
    paths = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    modules = {_module_name(p): Module(_module_name(p), p) for p in paths}
    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"))
        _collect(tree, module, modules, in_function=False)
    return modules


def _targets(node: ast.Import | ast.ImportFrom, modules: dict[str, Module], here: str) -> list[str]:
    """What an import statement imports: project modules by full name (a ``from`` name may be a submodule),
    everything else by its top-level package."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative import
            package = here.split(".")[: len(here.split(".")) - node.level + (here in _packages(modules))]
            base = ".".join([*package, *([node.module] if node.module else [])])
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    return [name if name.split(".")[0] in PACKAGES else name.split(".")[0] for name in names]


def _packages(modules: dict[str, Module]) -> set[str]:
    return {name for name, module in modules.items() if module.path.name == "__init__.py"}


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _collect(node: ast.AST, module: Module, modules: dict[str, Module], *, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            continue  # annotations only, never executed
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            for target in _targets(child, modules, module.name):
                if in_function:
                    module.deferred.append((child.lineno, target))
                else:
                    module.top.add(target)
        _collect(child, module, modules,
                 in_function=in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a submodule runs its packages' ``__init__`` first."""
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


@cache
def _loads(name: str) -> frozenset[str]:
    """Every module (project and third-party) that importing project module ``name`` loads at module level."""
    modules = _modules()
    seen: set[str] = set()
    pending = _with_parents(name)
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in modules:
            for target in modules[current].top:
                pending.extend(_with_parents(target) if target in modules else [target])
    return frozenset(seen)


def _third_party(loaded: frozenset[str]) -> set[str]:
    return {name for name in loaded if name.split(".")[0] not in PACKAGES}


def test_trainer_imports_neither_the_control_plane_nor_curation() -> None:
    for name, module in _modules().items():
        imported = module.top | {target for _, target in module.deferred}
        if name.startswith("trainer"):
            assert not {t for t in imported if t.startswith(("dino_ctl", "curation"))}, name
        if name.startswith("curation"):
            assert not {t for t in imported if t.startswith("dino_ctl")}, name


def test_no_control_plane_module_loads_torch_when_imported() -> None:
    loaders = {name: sorted(_third_party(_loads(name)) & {"torch", "torchvision"})
               for name in _modules() if name.startswith("dino_ctl")}
    assert {name: found for name, found in loaders.items() if found} == {}


def test_importing_the_cli_and_the_controller_really_is_torch_free() -> None:
    code = ("import sys; import dino_ctl, dino_ctl.cli.main, dino_ctl.validation, dino_ctl.render, dino_ctl.reconcile,"
            " dino_ctl.controller.handlers; print(sorted(m for m in ('torch', 'torchvision', 'streaming')"
            " if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_only_kube_py_talks_to_the_api_server() -> None:
    users = {name for name, module in _modules().items()
             if "kubernetes" in module.top | {target for _, target in module.deferred}}
    assert users <= set(KUBERNETES_USERS), sorted(users - set(KUBERNETES_USERS))
    source = (ROOT / "dino_ctl/render/torchx.py").read_text()
    assert source.count("import ApiClient") == 1 and "ApiClient()." in source and "kubernetes.config" not in source


def test_no_module_level_import_cycle() -> None:
    modules = _modules()
    graph = {name: {t for t in module.top if t in modules} for name, module in modules.items()}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for target in graph[name]:
            if target.startswith(name + "."):
                continue  # a package re-exporting its own submodules
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            assert visit(name, [name]) is None


def test_function_level_imports_only_defer_heavy_dependencies() -> None:
    modules = _modules()
    unjustified = []
    for name, module in sorted(modules.items()):
        already = _third_party(_loads(name))
        for line, target in module.deferred:
            if target in modules:
                gained = (_third_party(_loads(target)) - already) & set(DEFERRED)
                hides_cycle = name in _loads(target) and not target.startswith(name + ".")
                if not gained or hides_cycle:
                    unjustified.append(f"{module.path.relative_to(ROOT)}:{line}: {target}"
                                       + (" (hides an import cycle)" if hides_cycle else " (loads nothing heavy)"))
            elif target not in DEFERRED:
                unjustified.append(f"{module.path.relative_to(ROOT)}:{line}: {target} (not a deferred dependency)")
    assert unjustified == []
