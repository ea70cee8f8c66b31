"""The house rules of the package layout (docs/architecture.md), checked on the source itself:
no import cycle between modules, no folder importing a folder above it, and no underscore name
imported from another module anywhere in the repository."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cogprobe"
# bottom to top: a folder may import only the folders before it (and itself)
FLOORS = ["core", "models", "data", "tuning", "probe", "selection", "plots", "study"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return found


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def edges() -> dict[str, set[str]]:
    """module -> the cogprobe modules it imports (`from cogprobe.x import y` counts y when y is a module)."""
    mods = package_modules()
    out = {m: set() for m in mods}
    for m, p in mods.items():
        for target, names, _ in imports(p):
            if not target.startswith("cogprobe"):
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            out[m] |= set(subs) or ({target} if target in mods else set())
        out[m].discard(m)
    return out


def floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in FLOORS:
        return FLOORS.index(parts[1])
    if len(parts) == 2 and parts[1] in FLOORS:   # a folder's __init__
        return FLOORS.index(parts[1])
    return len(FLOORS)   # the top: cli, exports, checks, the public face


def test_no_import_cycle():
    graph, state, cycles = edges(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if n == "cogprobe":
                continue   # the public face: lazy names, imported by nothing below at import time
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_no_folder_imports_a_folder_above_it():
    upward = [f"{m} -> {n}" for m, targets in edges().items() for n in targets
              if n != "cogprobe" and floor(n) > floor(m)]
    assert not upward, "imports that run up the floors " + " < ".join(FLOORS) + ":\n" + "\n".join(sorted(upward))


def test_no_private_name_crosses_a_module():
    files = [p for d in ("cogprobe", "tests", "analyses", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    crossing = [f"{p.relative_to(ROOT)}:{line}: {name} from {target}"
                for p in files for target, names, line in imports(p)
                for name in names if name.startswith("_") and not name.startswith("__")]
    assert not crossing, "underscore names imported from another module:\n" + "\n".join(crossing)


def test_no_module_is_named_like_a_public_verb():
    import cogprobe
    verbs = {n for n in cogprobe.__all__ if n[0].islower()}
    clashes = sorted(verbs & {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()})
    assert not clashes, f"modules or folders named like a public function: {clashes}"
