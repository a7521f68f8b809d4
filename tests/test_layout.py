"""The repository's shape: the project's modules import each other as one DAG (every import counted, those inside
functions too), and a function-level import of a project module is reserved for deferring a heavy dependency."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}


def project_imports(name: str) -> dict[str, list[int]]:
    """module -> the line numbers where `name`.py imports it (at any depth)."""
    with open(os.path.join(ROOT, name + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    out: dict[str, list[int]] = {}
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for n in names:
            top = n.split(".")[0]
            if top in MODULES and top != name:
                out.setdefault(top, []).append(node.lineno)
    return out


def find_cycle(graph: dict[str, set]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_modules_import_each_other_as_a_dag():
    graph = {m: set(project_imports(m)) for m in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert not graph["common"] and not graph["prompts"], "common.py and prompts.py are leaves"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_project_module_is_imported_inside_a_function():
    """The imports of a module are its header: a reader sees what it depends on. (Heavy third-party packages may be
    imported late; this project's modules are not heavy.)"""
    late = []
    for m in MODULES:
        with open(os.path.join(ROOT, m + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                            [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                    late += [f"{m}.py:{node.lineno} imports {n}" for n in mods if n.split(".")[0] in MODULES]
    assert not late, late
