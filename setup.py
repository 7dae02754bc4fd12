"""Builds put the project's ``pyproject.toml`` inside the package, so an installed wheel is a whole Flower app.

The run config's declared defaults and the app's components live in ``pyproject.toml``
(``[tool.flwr.app]``), which Flower reads. A source checkout reads the file itself; a
wheel has no project folder, so the build copies it to ``common/config/app-pyproject.toml``
(``common.config.run.app_pyproject`` reads whichever is there). Everything else about the
build is in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PACKAGED = Path("common") / "config" / "app-pyproject.toml"


class BuildWithAppConfig(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / PACKAGED
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile("pyproject.toml", target)


setup(cmdclass={"build_py": BuildWithAppConfig})
