"""Installable package for ace: AceGRPO for machine-learning-engineering agents in JAX."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


setup(
    name="ace",
    version="0.1.0",
    description="AceGRPO: RL for LLM agents doing machine-learning engineering, in JAX.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["ace", "ace.*"]),
    install_requires=_requirements(),
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "scipy>=1.11",
            "pyyaml>=6",
            # The CPU build lies on disk on these machines; an unpinned torch pulls CUDA wheels.
            "torch==2.13.0",
            "transformers>=4.51",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
        # The scale path needs a GPU host; see README.
        "sglang": ["sglang==0.5.23", "sglang-router==0.3.2"],
    },
)
