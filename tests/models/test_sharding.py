"""Sharding rules: valid shardings for every 30B param, and sharded runs equal unsharded ones."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.models import QWEN3_30B_A3B, TINY, abstract_params, forward, init_params
from ace.models.logprobs import model_token_logprobs
from ace.models.qwen3 import param_shardings, shard_params
from ace.models.sharding import MESH_AXES, RULES, logical_to_sharding, logical_to_spec, make_mesh, use_mesh

MESHES = [{"fsdp": 8}, {"fsdp": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}]

fwd = jax.jit(forward, static_argnames=("config", "return_routing"))


@pytest.fixture(scope="module")
def setup():
    params = init_params(TINY, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 6), 0, TINY.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(6), (8, 6))
    logits, aux = fwd(params, TINY, tokens, positions, return_routing=True)
    return params, tokens, positions, logits, aux


def _spec_is_valid(spec, shape, mesh_shape):
    used = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    if len(used) != len(set(used)):
        return False
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        if dim % math.prod(mesh_shape[a] for a in axes):
            return False
    return True


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_sharded_forward_equals_unsharded(setup, mesh_shape):
    params, tokens, positions, logits, aux = setup
    mesh = make_mesh(mesh_shape)
    sharded = shard_params(params, TINY, mesh)
    expert_spec = sharded["layers"]["mlp"]["gate_proj"].sharding.spec
    assert ("expert" in expert_spec) == (mesh_shape.get("expert", 1) > 1)
    batch = logical_to_sharding(("batch", "length"), mesh)
    with use_mesh(mesh):
        got, got_aux = fwd(sharded, TINY, jax.device_put(tokens, batch), jax.device_put(positions, batch),
                           return_routing=True)
    assert len(got.sharding.device_set) == 8
    # Experts split over `expert` run the shard_map expert-parallel kernel; otherwise GSPMD partitions.
    with use_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(lambda p: forward(p, TINY, tokens, positions))(sharded))
    assert ("shard_map" in jaxpr) == (mesh_shape.get("expert", 1) > 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(logits), atol=2e-5)
    np.testing.assert_allclose(float(got_aux.aux_loss), float(aux.aux_loss), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got_aux.routing), np.asarray(aux.routing))


def test_sharded_rematerialised_gradient_equals_unsharded(setup):
    params, tokens, positions, _, _ = setup
    targets = jnp.roll(tokens, -1, axis=1)

    def loss(p, remat):
        logp, aux = model_token_logprobs(p, TINY, tokens, positions, targets, chunk_size=4, remat=remat)
        return -jnp.mean(logp) + TINY.router_aux_loss_coef * aux.aux_loss

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    want = grad(params, False)
    mesh = make_mesh(MESHES[2])
    with use_mesh(mesh):  # the sharded run also recomputes layers (remat): same numbers either way
        got = grad(shard_params(params, TINY, mesh), True)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "expert": 4}, {"expert": 8}, {"tensor": 8},
                                        {"data": 2, "fsdp": 2, "tensor": 2}], ids=str)
def test_every_30b_param_gets_a_valid_sharding(mesh_shape):
    mesh = make_mesh(mesh_shape)
    shardings = param_shardings(QWEN3_30B_A3B, mesh)
    shapes = abstract_params(QWEN3_30B_A3B)
    pairs = list(zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)))
    assert len(pairs) == len(jax.tree.leaves(shapes)) == 15
    for sharding, shape in pairs:
        assert _spec_is_valid(sharding.spec, shape.shape, dict(mesh.shape)), (sharding.spec, shape.shape)
        sharding.shard_shape(shape.shape)  # raises on an invalid sharding
    experts = shardings["layers"]["mlp"]["down_proj"].spec
    assert ("expert" in experts) == ("expert" in mesh_shape)


def test_logical_to_spec_drops_non_dividing_and_repeated_mesh_axes():
    mesh_shape = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    # 3 is not divisible by tensor=2: replicated rather than invalid.
    assert logical_to_spec(("embed", "heads"), mesh_shape, (4, 3)) == jax.sharding.PartitionSpec("fsdp", None)
    # batch takes fsdp and expert; a later dim mapped to fsdp must not reuse it.
    spec = logical_to_spec(("batch", "embed"), mesh_shape, (8, 8))
    assert spec == jax.sharding.PartitionSpec(("fsdp", "expert"), None)
    with pytest.raises(ValueError, match="'nonsense'"):
        logical_to_spec(("nonsense",), mesh_shape)
    assert set(MESH_AXES) >= {a for v in RULES.values() if v for a in ((v,) if isinstance(v, str) else v)}


def test_make_mesh_fills_remaining_devices_and_rejects_bad_shapes():
    mesh = make_mesh({"fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh({"fsdp": 3, "tensor": 2})
    with pytest.raises(ValueError, match="'pipeline'"):
        make_mesh({"pipeline": 2})
    with pytest.raises(ValueError, match="at most one axis"):
        make_mesh({"fsdp": -1, "tensor": -1})
