"""A rule's code, script and library, as a rerun trigger.

Snakemake's `code` trigger compares a script's modification time (touching it reruns the job,
GPU jobs included) and never looks at the entroflow modules the script imports (editing
`entroflow/lm/scoring.py` would silently keep stale results). So the profiles leave that trigger
out, and each rule instead gets `params.library`: a hash of the code of its script and of every
entroflow module the script imports, followed transitively. The hash is taken over the parsed
code (`ast.unparse` without docstrings), so comments, docstrings, formatting, the package version
and touching a file change nothing, while a code edit reruns exactly the rules that run it.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "entroflow"


def _package_root() -> Path:
    import entroflow

    return Path(entroflow.__file__).resolve().parent


def _module_file(name: str, root: Path) -> Path | None:
    """entroflow.a.b -> root/a/b.py or root/a/b/__init__.py (None if it is not a module file)."""
    parts = name.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(tree: ast.AST) -> set[str]:
    """entroflow modules named by imports anywhere in the tree (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == PACKAGE
        ):
            names.add(node.module)
            # `from entroflow import x` / `from entroflow.engines import hf`: x may be a module
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _parents(name: str) -> set[str]:
    """Importing entroflow.a.b runs entroflow/__init__ and entroflow/a/__init__ too."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _is_version(node: ast.stmt) -> bool:
    return isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
    )


def _normalize(tree: ast.Module) -> ast.Module:
    """Drop docstrings and `__version__ = ...` (a release bump alone reruns nothing)."""
    tree.body = [node for node in tree.body if not _is_version(node)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


# Every rule hashes its script's modules at each Snakemake start (also inside each cluster job),
# and most rules share most modules: parse and normalise each file version once per process.
@cache
def _parse_version(path: Path, mtime_ns: int, size: int) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


@cache
def _code_version(path: Path, mtime_ns: int, size: int) -> str:
    return ast.unparse(_normalize(ast.parse(path.read_text(), filename=str(path))))


def _parse(path: Path) -> ast.AST:
    stat = path.stat()
    return _parse_version(path, stat.st_mtime_ns, stat.st_size)


def _code(path: Path) -> str:
    """The file's code without comments, docstrings, formatting or `__version__`."""
    stat = path.stat()
    return _code_version(path, stat.st_mtime_ns, stat.st_size)


def library_modules(script: str | Path, root: Path | None = None) -> dict[str, Path]:
    """The entroflow modules a script depends on: module name -> file, transitively."""
    root = root or _package_root()
    found: dict[str, Path] = {}
    pending = sorted(_imported_modules(_parse(Path(script).resolve())))
    while pending:
        name = pending.pop()
        for candidate in sorted({name} | _parents(name)):
            if candidate in found:
                continue
            path = _module_file(candidate, root)
            if path is None:  # an attribute imported from a module, not a module itself
                continue
            found[candidate] = path
            pending += sorted(_imported_modules(_parse(path)) - found.keys())
    return dict(sorted(found.items()))


def library_fingerprint(script: str | Path, root: Path | None = None) -> str:
    """Short hash of the code (not the text) of the script and every entroflow module it uses."""
    digest = hashlib.sha256()
    files = {"<script>": Path(script), **library_modules(script, root)}
    for name, path in files.items():
        digest.update(f"{name}\n{_code(path)}\n".encode())
    return digest.hexdigest()[:16]
