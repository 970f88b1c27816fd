"""Build hook: ship the Streamlit app (``app/`` of the checkout) inside the wheel as ``echosearch/app``.

Everything else is configured in pyproject.toml. ``echosearch.appcore.launch.app_script`` finds the installed copy,
so ``pip install "echosearch[app]"`` then ``echosearch serve`` works without a source checkout; an editable
install keeps using the checkout's ``app/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

APP_DIR = Path(__file__).resolve().parent / "app"


class BuildWithApp(build_py):
    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib) / "echosearch" / "app"
        for src in sorted(APP_DIR.rglob("*")):
            if src.is_file() and "__pycache__" not in src.parts and src.suffix in (".py", ".toml", ".css", ".md"):
                target = dest / src.relative_to(APP_DIR)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)


setup(cmdclass={"build_py": BuildWithApp})
