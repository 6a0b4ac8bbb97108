"""The pure core installs alone: the base requirements are jax, jaxlib and numpy, and `ace.rl` and
`ace.curriculum` import and run with every other dependency missing; README's example runs."""
from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README_HEADING = "## Using ace.rl in your own training step"

# Top-level modules of every non-base dependency the core must not need (by import name).
BLOCKED = ("flax", "optax", "orbax", "chex", "hydra", "omegaconf", "pandas", "sklearn", "torch",
           "transformers", "sglang", "sglang_router", "tokenizers", "safetensors", "docker",
           "tensorboardX", "matplotlib", "tqdm", "jinja2", "requests", "yaml")


def setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to `setuptools.setup`, captured without installing."""
    captured: dict = {}
    with mock.patch("setuptools.setup", lambda **kwargs: captured.update(kwargs)):
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    if not captured:
        raise AssertionError("setup.py did not call setuptools.setup")
    return captured


def requirement_name(requirement: str) -> str:
    """The normalised project name of a requirement string ("scikit-learn>=1.5" -> "scikit-learn")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a project name from requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def readme_example() -> str:
    """The fenced python block under README's `README_HEADING`."""
    text = (ROOT / "README.md").read_text()
    if README_HEADING not in text:
        raise AssertionError(f"README.md has no section {README_HEADING!r}")
    section = text.split(README_HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    if len(blocks) != 1:
        raise AssertionError(f"README section {README_HEADING!r} holds {len(blocks)} python blocks, expected 1")
    return blocks[0]


def test_base_requirements_are_jax_jaxlib_numpy():
    names = {requirement_name(r) for r in setup_kwargs()["install_requires"]}
    assert names == {"jax", "jaxlib", "numpy"}


def test_run_extra_installs_what_the_main_job_imports():
    extras = setup_kwargs()["extras_require"]
    run = {requirement_name(r) for r in extras["run"]}
    assert {"flax", "optax", "orbax-checkpoint", "hydra-core", "pandas", "scikit-learn", "tokenizers",
            "docker", "safetensors", "matplotlib"} <= run
    for extra in ("test", "sglang", "bench"):  # all run the main job's code too
        assert run <= {requirement_name(r) for r in extras[extra]}, extra
    # `make bench` with the peers: the test tools (transformers, torch) and Tunix, pinned.
    assert {requirement_name(r) for r in extras["test"]} <= {requirement_name(r) for r in extras["bench"]}
    assert "google-tunix==0.1.7" in extras["bench"]


def test_requirements_txt_is_base_plus_run():
    kwargs = setup_kwargs()
    want = kwargs["install_requires"] + kwargs["extras_require"]["run"]
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    got = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    assert sorted(got) == sorted(want)


def test_makefile_installs_the_extras():
    makefile = (ROOT / "Makefile").read_text()
    assert 'pip install --quiet -e ".[run]"' in makefile
    assert 'pip install --quiet -e ".[run,test]"' in makefile


_CORE_ONLY = textwrap.dedent('''
    import importlib.abc, sys

    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{name} is blocked: the core must not need it", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import jax
    import jax.numpy as jnp
    import ace.curriculum as cur
    import ace.rl as rl

    adv = rl.group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), 4, mode="grpo").advantages
    mask = jnp.ones((4, 3))
    loss, metrics = rl.policy_loss(jnp.zeros((4, 3)), jnp.zeros((4, 3)), adv, mask,
                                   eps_low=0.2, eps_high=0.2, agg="token_mean")
    table = cur.init_table(8)
    rows = cur.make_rows([-1, -1], [0, 1], [0, 0], [cur.state_hash("a"), cur.state_hash("b")])
    table, result = cur.insert(table, rows, step=0)
    picked = cur.sample(jax.random.key(0), table, 2, temperature=1.0, eps_uniform=0.1,
                        potential="success_variance")
    table = cur.update_stats(table, picked, jnp.array([[1.0, 0.0], [0.0, 0.0]]),
                             jnp.array([[True, False], [False, False]]), 1)
    assert float(loss) == 0.0, float(loss)
    assert sorted(int(i) for i in picked) == [0, 1], picked
    loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
    assert not loaded, loaded
    print("core ok")
''')


def test_core_imports_and_runs_without_other_dependencies():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CORE_ONLY, ",".join(BLOCKED)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "core ok" in proc.stdout


def test_readme_example_runs():
    pytest.importorskip("optax")
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    logits = np.asarray(namespace["params"]["logits"])
    assert np.isfinite(logits).all()
    assert np.abs(logits).max() > 0, "one optax step with non-zero advantages left the params unchanged"
