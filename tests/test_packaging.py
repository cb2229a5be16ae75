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
