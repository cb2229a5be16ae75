"""Ships the top-level ``conf/`` (the Hydra configs, edited there as the source) inside the package as
``modeconn/conf``, so an installed wheel has them; everything else is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self) -> None:
        shutil.rmtree(Path(self.build_lib) / "modeconn", ignore_errors=True)  # no module left from an old build
        super().run()
        source = Path(__file__).resolve().parent / "conf"
        target = Path(self.build_lib) / "modeconn" / "conf"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConf})
