"""params.library: a code edit in a rule's script or a module it uses changes its hash; comments,
docstrings, formatting, touching files and edits to modules it does not use do not."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from entroflow.code_version import library_fingerprint, library_modules


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def make_package(tmp_path):
    root = tmp_path / "entroflow"
    write(root / "__init__.py", '__version__ = "1.0"\n')
    write(root / "a.py", "from entroflow.b import helper\n\ndef run():\n    return helper()\n")
    write(root / "b.py", '"""Doc."""\n\ndef helper():\n    return 1  # one\n')
    write(root / "c.py", "def other():\n    return 3\n")
    write(root / "sub" / "__init__.py", "")
    write(root / "sub" / "d.py", "X = 4\n")
    script = tmp_path / "scripts" / "rule.py"
    write(script, "from entroflow import a\n\ndef f():\n    from entroflow.sub import d\n")
    return root, script


def test_modules_are_followed_transitively_and_lazily(tmp_path):
    root, script = make_package(tmp_path)
    assert list(library_modules(script, root)) == [
        "entroflow",
        "entroflow.a",
        "entroflow.b",
        "entroflow.sub",
        "entroflow.sub.d",
    ]


def test_only_code_changes_in_used_modules_count(tmp_path):
    root, script = make_package(tmp_path)
    before = library_fingerprint(script, root)
    b = root / "b.py"
    write(b, '"""Other doc."""\n\n\ndef helper():\n    # a comment\n    return (1)\n')
    os.utime(b)
    write(root / "c.py", "def other():\n    return 30\n")
    write(root / "__init__.py", '__version__ = "2.0"\n')
    assert library_fingerprint(script, root) == before
    write(script, "# touched and commented\n" + script.read_text())
    assert library_fingerprint(script, root) == before
    write(b, "def helper():\n    return 2\n")
    edited = library_fingerprint(script, root)
    assert edited != before
    write(script, script.read_text() + "\nLIMIT = 3\n")  # the script's own code counts too
    assert library_fingerprint(script, root) != edited


def test_every_rule_script_resolves_in_the_real_package():
    scripts = sorted((Path(__file__).parents[2] / "scripts").glob("*.py"))
    assert len(scripts) >= 19
    for script in scripts:
        modules = library_modules(script)
        assert "entroflow.logs" in modules, script  # every script logs through entroflow.logs
