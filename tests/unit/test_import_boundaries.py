"""The producer side never imports the GPU side: no module of ``fleet`` pulls in torch,
diffsynth, anything under ``workers``, or celery (the Celery app lives in ``workers/``).

Every module of the package is found by ``pkgutil.walk_packages``, so modules added later
are checked without touching this file. All of them are imported one by one in ONE fresh
interpreter; after each import, ``sys.modules`` is searched for forbidden names, and the
module whose import first loaded one is named.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("torch", "diffsynth", "workers", "celery")
_REPO = Path(__file__).resolve().parents[2]

# Runs in the fresh interpreter: argv = [package, forbidden prefixes (JSON), extra sys.path (JSON)].
# The walk is consumed lazily: walk_packages yields a package before it imports it to look
# inside, so each module is imported (and blamed) by us before the walk touches it.
_CHECK = r"""
import importlib, json, pkgutil, sys, traceback

package, forbidden, extra_path = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
sys.path[:0] = extra_path

def bad(name):
    return any(name == p or name.startswith(p + ".") for p in forbidden)

seen = {m for m in sys.modules if bad(m)}
result = {"preloaded": sorted(seen), "path": [], "checked": [], "skipped": [], "offenders": {}, "errors": {}}

def check(name):
    try:
        importlib.import_module(name)
    except BaseException as e:  # SystemExit included: a module that exits on import is an error too
        result["errors"][name] = "".join(traceback.format_exception_only(type(e), e)).strip()
    result["checked"].append(name)
    new = {m for m in sys.modules if bad(m)} - seen
    if new:
        result["offenders"][name] = sorted(m for m in new if "." not in m) or sorted(new)
        seen.update(new)

check(package)
if package not in result["errors"]:
    pkg = sys.modules[package]
    result["path"] = list(getattr(pkg, "__path__", []))
    def onerror(name):
        result["errors"].setdefault(name, "could not be walked: " + repr(sys.exc_info()[1]))
    for info in pkgutil.walk_packages(pkg.__path__, package + ".", onerror=onerror):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # importing it would run the program
            result["skipped"].append(info.name)
            continue
        check(info.name)
print("@@RESULT@@" + json.dumps(result))
"""


def import_report(package: str, forbidden: tuple[str, ...] = FORBIDDEN, path: tuple[Path, ...] = (),
                  cwd: Path = _REPO) -> dict:
    """Import ``package`` and each of its modules in a fresh interpreter; return what was checked,
    skipped, which module first loaded which forbidden top-level modules (``offenders``) and
    which modules failed to import (``errors``)."""
    r = subprocess.run([sys.executable, "-c", _CHECK, package, json.dumps(list(forbidden)),
                        json.dumps([str(p) for p in path])], cwd=cwd, capture_output=True, text=True, timeout=120)
    out = [line for line in r.stdout.splitlines() if line.startswith("@@RESULT@@")]
    assert r.returncode == 0 and out, f"the import check itself failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(out[-1][len("@@RESULT@@"):])


def boundary_problems(report: dict) -> list[str]:
    """One line per violation: a module that loaded a forbidden one, or a module that does not import."""
    lines = [f"{mod} imports {', '.join(pulled)} (directly or through its imports)"
             for mod, pulled in report["offenders"].items()]
    lines += [f"{mod} does not import: {err}" for mod, err in report["errors"].items()]
    if report["preloaded"]:
        lines.append(f"already loaded before any import: {', '.join(report['preloaded'])}")
    return lines


def test_fleet_never_imports_torch_diffsynth_workers_or_celery() -> None:
    report = import_report("fleet")
    problems = boundary_problems(report)
    assert not problems, "the producer side (fleet/) must not import the GPU side:\n" + "\n".join(problems)
    # The walk saw every module on disk (a sub-folder without __init__.py would be missed silently).
    on_disk = {".".join(("fleet", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
               for root in map(Path, report["path"]) for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    missed = on_disk - set(report["checked"]) - set(report["skipped"])
    assert not missed, f"modules of fleet/ the walk did not reach (a folder without __init__.py?): {sorted(missed)}"
    assert report["path"] and len(report["checked"]) > 1, report


# ---- the check itself can fail ---------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_the_check_passes_a_clean_package(tmp_path: Path) -> None:
    _write(tmp_path, {"fakeheavy/__init__.py": "", "cleanpkg/__init__.py": "import json\n",
                      "cleanpkg/a.py": "import json\n", "cleanpkg/sub/__init__.py": "",
                      "cleanpkg/sub/b.py": "from cleanpkg import a\n"})
    report = import_report("cleanpkg", ("fakeheavy",), (tmp_path,), cwd=tmp_path)
    assert boundary_problems(report) == []
    assert report["checked"] == ["cleanpkg", "cleanpkg.a", "cleanpkg.sub", "cleanpkg.sub.b"]


def test_the_check_names_the_module_that_pulls_in_a_forbidden_one(tmp_path: Path) -> None:
    _write(tmp_path, {
        "fakeheavy/__init__.py": "", "fakeheavy/cuda.py": "", "fakeother.py": "",
        "dirtypkg/__init__.py": "",
        "dirtypkg/a_clean.py": "import json\n",
        "dirtypkg/b_light.py": "import fakeheavy_not_forbidden_by_prefix_rule\n",
        "fakeheavy_not_forbidden_by_prefix_rule.py": "",
        "dirtypkg/c_via.py": "from dirtypkg.deep import d_heavy\n",  # through another module of the package
        "dirtypkg/deep/__init__.py": "",
        "dirtypkg/deep/d_heavy.py": "import fakeheavy.cuda\n",
        "dirtypkg/deep/e_other.py": "import fakeother\n",
        "dirtypkg/f_broken.py": "raise ImportError('half-written')\n",
        "dirtypkg/__main__.py": "import fakeother\nraise SystemExit('ran the program')\n",
    })
    report = import_report("dirtypkg", ("fakeheavy", "fakeother"), (tmp_path,), cwd=tmp_path)
    assert report["offenders"] == {"dirtypkg.c_via": ["fakeheavy"], "dirtypkg.deep.e_other": ["fakeother"]}
    assert list(report["errors"]) == ["dirtypkg.f_broken"] and "half-written" in report["errors"]["dirtypkg.f_broken"]
    assert report["skipped"] == ["dirtypkg.__main__"]
    problems = boundary_problems(report)
    assert "dirtypkg.c_via imports fakeheavy (directly or through its imports)" in problems
    assert len(problems) == 3
