"""Packaging beside pyproject.toml for the one thing it cannot say: configs/ (a top-level folder of the
repository) ships inside the wheel as the package ``swavkit.recipes``, so ``--config NAME`` works after a
plain ``pip install``. Every configs/*.yaml is picked up (package-data in pyproject.toml); no per-file step."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["swavkit*"]), "swavkit.recipes"], package_dir={"swavkit.recipes": "configs"})
