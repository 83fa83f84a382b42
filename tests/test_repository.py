"""The repository stands alone and its house is in order: references resolve, stages import downward
only, the front door exports what it says, configs ship with the package, one device policy."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "tpas"

# The stages, lowest first: a module may import its own stage and the ones below, never above.
STAGES = {"errors": 0, "utils": 0, "config": 0, "data": 1, "models": 2, "search": 3, "eval": 4, "train": 5,
          "serve": 6, "demo": 7, "commands": 8, "cli": 8}


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an unpacked archive): every file counts
        return [p for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]
    return [REPO / line for line in out.stdout.splitlines()]


def _stage(module: str) -> int | None:
    """Stage of ``tpas.X...`` (None for the package itself)."""
    parts = module.split(".")
    if parts[0] != "tpas" or len(parts) == 1:
        return None
    return STAGES[parts[1]]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``tpas`` import in a file, top-level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, m) for line, m in found if m == "tpas" or m.startswith("tpas.")]


def test_stages_import_downward_only():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        own = _stage(module)
        if own is None:
            continue  # tpas/__init__.py is the front door: it may name anything
        for line, imported in _imports(path):
            theirs = _stage(imported)
            if theirs is None and own < STAGES["commands"]:
                problems.append(f"{rel}.py:{line}: imports the top-level package")
            elif theirs is not None and theirs > own:
                problems.append(f"{rel}.py:{line}: {module} (stage {own}) imports {imported} (stage {theirs})")
    assert not problems, "\n".join(problems)


def test_every_package_says_what_it_exports():
    import importlib

    for init in sorted(SRC.rglob("__init__.py")):
        name = ".".join(init.parent.relative_to(SRC.parent).parts)
        module = importlib.import_module(name)
        assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__"
        for export in module.__all__:
            assert getattr(module, export, None) is not None, f"{name}.{export} is listed but missing"


# a path into the repository as prose or code mentions it: src/..., docs/..., tests/..., benchmarks/...
REPO_PATH = re.compile(r"(?<![\w./-])((?:src|docs|tests|benchmarks|configs|\.ci)/[\w./-]*\w)")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
GENERATED = ("benchmarks/results/tmp",)  # written by benchmark runs, ignored by git
EXTERNAL = ("configs/cmp.yaml",)  # upstream CMP's file, named in the X-VLM fixture's key lists


def test_references_to_repository_paths_exist_and_none_leaves_the_checkout():
    problems = []
    for path in tracked_files():
        if path.suffix not in (".md", ".py", ".sh", ".yaml", ".toml", ".txt", ".js", ".html", ".cfg", "") \
                or "fixtures" in path.parts or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        where = path.relative_to(REPO)
        if re.search(r"\.\./shared\b", text):
            problems.append(f"{where}: refers to a folder beside the checkout")
        for match in REPO_PATH.finditer(text):
            ref = match.group(1).rstrip(".")
            if ref.startswith(GENERATED) or ref in EXTERNAL or text[match.end():match.end() + 1] in ("*", "{", "<"):
                continue  # a pattern, not a path
            target = REPO / ref
            if not target.exists() and not list(target.parent.glob(target.name + ".*")):  # a stem: x -> x.json
                problems.append(f"{where}: {ref} does not exist")
        if path.suffix == ".md":
            for match in MD_LINK.finditer(text):
                target = match.group(1).split("#")[0]
                if not target or re.match(r"[a-z]+:", target):
                    continue  # an anchor or a URL
                resolved = (path.parent / target).resolve()
                if REPO.resolve() not in resolved.parents and resolved != REPO.resolve():
                    problems.append(f"{where}: link {target} leaves the repository")
                elif not resolved.exists():
                    problems.append(f"{where}: link {target} does not exist")
    assert not problems, "\n".join(problems)


def test_front_door_exports_resolve_and_import_stays_light():
    import tpas

    for name in tpas.__all__:
        assert getattr(tpas, name) is not None, name
    with pytest.raises(AttributeError):
        tpas.no_such_thing  # noqa: B018
    code = "import sys, tpas, tpas.cli; tpas.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # `import tpas` and `tpas --help` load no torch


def test_configs_ship_with_the_package_and_resolve_by_name(tmp_path, monkeypatch):
    from tpas.config import ConfigError, load_config, resolve_config, shipped_configs

    assert {"minipab-lite", "pab-xvlm", "cuhk-xvlm"} <= set(shipped_configs())
    monkeypatch.chdir(tmp_path)  # from any directory
    assert resolve_config("minipab-lite") == SRC / "configs" / "minipab-lite.yaml"
    assert resolve_config("pab-xvlm.yaml").name == "pab-xvlm.yaml"
    assert load_config("minipab-lite").model.name == "lite"
    mine = tmp_path / "minipab-lite.yaml"
    mine.write_text("name: mine\n")
    assert resolve_config("minipab-lite.yaml").resolve() == mine  # an existing file wins over the shipped name
    with pytest.raises(ConfigError, match="shipped configs: .*minipab-lite"):
        resolve_config("nope")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"configs/*.yaml"' in pyproject  # package data: an installed tpas has them too


def test_one_device_policy():
    import torch

    from tpas.errors import TpasError
    from tpas.models import create_model
    from tpas.utils.device import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected and resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(TpasError, match="unknown device"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(TpasError, match="no CUDA GPU"):
            resolve_device("cuda")
    model = create_model("lite-tiny", device="cpu")
    assert model.device == torch.device("cpu") and not model.training


@pytest.mark.slow
def test_a_non_editable_install_finds_its_configs_from_any_directory(tmp_path):
    """Build the wheel, install it elsewhere, and run from / : configs and page assets are package data."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
                   check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("tpas-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    code = ("import tpas, tpas.config as c, tpas.serve.app as a; "
            "print(tpas.__file__); print(c.resolve_config('minipab-lite')); print((a.STATIC_DIR / 'index.html').is_file())")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, check=True)
    package, config, page = out.stdout.split()
    assert package.startswith(str(site)) and config.startswith(str(site)) and page == "True"
    demo = subprocess.run([sys.executable, "-m", "tpas.cli", "demo", "--help"], cwd="/", env=env, capture_output=True,
                          text=True)
    assert demo.returncode == 0 and "minipab-lite" in demo.stdout
