"""Installable package for ace: AceGRPO for machine-learning-engineering agents in JAX.

The base install is the pure core, `ace.rl` and `ace.curriculum`: jax, jaxlib and numpy, nothing
else, so the GRPO math and the curriculum can be reused in another JAX project. Everything else is
an extra, named by the part of ace that needs it:

  env     ace.env: grading (pandas, scikit-learn), MLE-bench configs (pyyaml), the docker sandbox
  train   ace.models, ace.rollout, ace.train, experiments/: Flax model, optimizer, checkpoints,
          tokenizer, Hydra configs, logging and plots, the SGLang HTTP client
  run     env + train: the main job (`make run`)
  test    run + the test tools (`make test`, `make bench`)
  sglang  run + SGLang and its router: the scale path on GPU hosts (see README)
  bench   test + Tunix, the JAX peer that bench/model.py and bench/sampler.py compare with when
          it is installed (pip resolves transformers to an older 5.x beside it; nothing else changes)
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

BASE = ["jax>=0.10", "jaxlib>=0.10", "numpy>=1.26"]

ENV = [
    "pandas>=2.2",
    "scikit-learn>=1.5",
    "pyyaml>=6",
    "docker>=7.1",
]

TRAIN = [
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "chex>=0.1.90",
    "safetensors>=0.4",
    "tokenizers>=0.21",
    "jinja2>=3.1",
    "hydra-core>=1.3.2",
    "omegaconf>=2.3",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "requests>=2.31",
]

RUN = ENV + TRAIN

TEST = [
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
]

# The JAX peer of the benchmarks (bench/tunix_peer.py); optional, never needed by the tests.
BENCH = ["google-tunix==0.1.7"]

# The scale path needs a GPU host; see README.
SGLANG = ["sglang==0.5.23", "sglang-router==0.3.2"]


def _union(*groups: list[str]) -> list[str]:
    """The requirements of several groups, each once, in first-seen order."""
    return list(dict.fromkeys(req for group in groups for req in group))


setup(
    name="ace",
    version="0.1.0",
    description="AceGRPO: RL for LLM agents doing machine-learning engineering, in JAX.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["ace", "ace.*"]),
    install_requires=BASE,
    extras_require={
        "env": ENV,
        "train": TRAIN,
        "run": RUN,
        "test": _union(RUN, TEST),
        "sglang": _union(RUN, SGLANG),
        "bench": _union(RUN, TEST, BENCH),
    },
)
