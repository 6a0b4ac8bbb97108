"""bench/learner.py times the same GRPO update on both sides: from the same weights, ace's jitted
update and the PyTorch update over the transformers model get the same gradient norm."""
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import learner  # noqa: E402  (bench/learner.py)
from peer_configs import model_config  # noqa: E402

from ace.models import init_params  # noqa: E402


@pytest.mark.parametrize("name", ["A", "B"])
def test_ace_and_torch_updates_compute_the_same_gradient(name):
    pytest.importorskip("transformers")
    config = model_config(name)
    samples, adv = learner.make_samples(config, rows=8, prompt=12, new=8)
    params = init_params(config, jax.random.key(0))
    norms = []
    for make in (learner.ace_update, learner.torch_update):
        update = make(config, params, samples, adv, pad_to=24, micro_batches=2)
        norms.append(update())
    assert norms[0] > 0.01
    assert norms[0] == pytest.approx(norms[1], rel=1e-3)
