# All metadata lives in pyproject.toml; this file exists for tools that still call setup.py
# (and for `pip install --no-build-isolation -e .` on machines with an older setuptools).
from setuptools import setup

setup()
