"""Packaging details pyproject.toml cannot express: the recipes folder installed as ``zoo/_recipes``.

``recipes/`` stays at the top of the checkout (the design card fixes the layout), but a wheel can only carry files
inside packages, so it is mapped into the ``zoo`` package here; ``zoo.resources`` finds it in either place.
Everything else (metadata, dependencies, package data) is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["zoo", "zoo.*", "data", "data.*", "eval", "eval.*"]), "zoo._recipes"],
    package_dir={"zoo._recipes": "recipes"},
)
