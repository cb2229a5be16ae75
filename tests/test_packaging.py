"""A built wheel carries the configs: installed without the source tree, the CLI composes the default config
and every preset from a folder outside the repository."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_every_preset_composes_outside_the_repo(tmp_path):
    source = tmp_path / "src"  # a clean copy: no build/ left over from earlier builds
    for name in ("modeconn", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("modeconn-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, cwd=tmp_path)
    assert (target / "modeconn" / "conf" / "config.yaml").is_file()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    def modeconn(*args, entry=(sys.executable, "-m", "modeconn.run.cli")):
        done = subprocess.run([*entry, *args, "--cfg", "job"], cwd=outside, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = subprocess.run([sys.executable, "-c", "import modeconn.run.cli as c; print(c.__file__, c.CONF_DIR)"],
                           cwd=outside, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where == [str(target / "modeconn" / "run" / "cli.py"), str(target / "modeconn" / "conf")]
    assert "name: default" in modeconn(entry=(str(target / "bin" / "modeconn"),))
    for preset in PRESETS:
        assert "name:" in modeconn(f"experiment={preset}"), preset
    assert not list(outside.iterdir())  # --cfg job writes nothing


MODULE_OF = {"scikit-learn": "sklearn", "hydra-core": "hydra", "pytest-xdist": "xdist"}  # distribution -> import
REQUIRED_BY_CORE = {"PIL", "yaml"}  # pillow (required by matplotlib and torchvision), PyYAML (by omegaconf)


def test_the_tests_import_no_optional_dependency_at_module_level():
    """``pytest`` must collect under ``pip install -e .[test]`` alone: a test file imports, at module level,
    only the standard library, the core and test dependencies and its own folder; an optional one (an extra
    such as launchers, or a package no extra names) goes through ``conftest.requires`` or
    ``pytest.importorskip``, so its tests skip without it."""
    import ast
    import re
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    dists = {re.match(r"[A-Za-z0-9_.-]+", n).group(0).lower() for n in names}
    allowed = {MODULE_OF.get(d, d.replace("-", "_")) for d in dists} | set(sys.stdlib_module_names) | {"modeconn"}
    allowed |= REQUIRED_BY_CORE
    allowed |= {p.stem for p in (REPO / "tests").glob("*.py")}
    found = []
    for file in sorted((REPO / "tests").glob("*.py")):
        for node in ast.parse(file.read_text()).body:  # module level only; imports inside a test run when it runs
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            found += [f"{file.name}:{node.lineno} imports {r}" for r in roots if r not in allowed]
    assert not found, "; ".join(found)
