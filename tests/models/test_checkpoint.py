"""Orbax checkpoints: a state saved on one mesh restores onto another with identical values."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from ace.models import checkpoint
from ace.models.configs import TINY
from ace.models.qwen3 import abstract_params, param_shardings
from ace.models.sharding import make_mesh


def _mesh(shape: dict) -> Mesh:
    devices = np.array(jax.devices()[: int(np.prod(list(shape.values())))])
    return Mesh(devices.reshape(tuple(shape.values())), tuple(shape.keys()))


def _state(seed: int, mesh: Mesh):
    """A learner-like state: params of an MoE-ish layer, adamw state, step and a typed RNG key."""
    rng = np.random.default_rng(seed)
    params = {
        "experts": rng.normal(size=(8, 16, 4)).astype(np.float32),
        "embed": rng.normal(size=(32, 16)).astype(np.float32),
        "norm": rng.normal(size=(16,)).astype(np.float32),
    }
    spec = {"experts": P("fsdp"), "embed": P("fsdp", None), "norm": P()}
    params = {k: jax.device_put(v, NamedSharding(mesh, spec[k])) for k, v in params.items()}
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    # One real update so the moments are not all zeros.
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    _, opt_state = opt.update(grads, opt_state, params)
    return {"params": params, "opt_state": opt_state, "step": seed, "rng": jax.random.key(seed)}


def _assert_same_values(got, want):
    got_leaves = jax.tree.leaves(got)
    want_leaves = jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        if isinstance(w, jax.Array) and jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _target_mesh_shardings(state, mesh: Mesh):
    """Every array split over `expert` on its leading axis (when it divides), the rest replicated."""

    def pick(x):
        if np.ndim(x) >= 1 and np.shape(x)[0] % mesh.shape["expert"] == 0:
            return NamedSharding(mesh, P("expert"))
        return NamedSharding(mesh, P())

    return jax.tree.map(pick, state)


def test_save_on_fsdp8_restores_onto_fsdp2_expert4_with_requested_shardings(tmp_path):
    state = _state(7, _mesh({"fsdp": 8}))
    checkpoint.save(tmp_path, 7, state, {"model": "tiny", "lr": 1e-3, "tags": ["a", "b"]})

    new_mesh = _mesh({"fsdp": 2, "expert": 4})
    shardings = _target_mesh_shardings(state, new_mesh)
    shardings["step"] = 0  # a Python scalar leaf restores as a Python scalar
    restored, metadata = checkpoint.restore(tmp_path, target_shardings=shardings)

    assert metadata == {"model": "tiny", "lr": 1e-3, "tags": ["a", "b"]}
    assert restored["step"] == 7
    assert jax.tree.structure(restored) == jax.tree.structure(state)  # optax NamedTuples survive
    _assert_same_values(restored, state)
    want = jax.tree.leaves(shardings)
    got = [x.sharding for x in jax.tree.leaves(restored) if isinstance(x, jax.Array)]
    assert len(got) == len([s for s in want if isinstance(s, jax.sharding.Sharding)])
    for g, w in zip(got, [s for s in want if isinstance(s, jax.sharding.Sharding)]):
        assert g == w
    # The expert leaf really is split over the 4 expert devices now.
    experts = restored["params"]["experts"]
    assert {s.data.shape for s in experts.addressable_shards} == {(2, 16, 4)}


def test_restore_unsharded_from_abstract_tree_and_from_saved_metadata(tmp_path):
    state = _state(3, _mesh({"fsdp": 8}))
    checkpoint.save(tmp_path, 3, state)
    device = jax.devices()[0]
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=SingleDeviceSharding(device))
        if isinstance(x, jax.Array) else x,
        state,
    )
    restored, metadata = checkpoint.restore(tmp_path, 3, target_shardings=abstract)
    assert metadata == {}
    _assert_same_values(restored, state)
    assert all(x.sharding == SingleDeviceSharding(device)
               for x in jax.tree.leaves(restored) if isinstance(x, jax.Array))

    # Without a target the tree comes back as saved (dicts / lists) on one device.
    plain, _ = checkpoint.restore(tmp_path)
    np.testing.assert_array_equal(np.asarray(plain["params"]["embed"]), np.asarray(state["params"]["embed"]))
    np.testing.assert_array_equal(np.asarray(plain["opt_state"][0]["mu"]["experts"]),
                                  np.asarray(state["opt_state"][0].mu["experts"]))
    assert plain["step"] == 3


def test_keeps_only_newest_steps_and_restores_latest_by_default(tmp_path):
    mesh = _mesh({"fsdp": 8})
    assert checkpoint.latest_step(tmp_path / "none") is None
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(4):
            ckpt.save(step, {"w": jnp.full((8,), float(step))}, {"step": step})
        with pytest.raises(ValueError, match="step 3 already exists"):
            ckpt.save(3, {"w": jnp.zeros((8,))})
    assert checkpoint.all_steps(tmp_path) == [2, 3]
    assert checkpoint.latest_step(tmp_path) == 3
    restored, metadata = checkpoint.restore(tmp_path, target_shardings={"w": NamedSharding(mesh, P("fsdp"))})
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full((8,), 3.0))
    assert metadata == {"step": 3}
    older, _ = checkpoint.restore(tmp_path, 2)
    np.testing.assert_array_equal(np.asarray(older["w"]), np.full((8,), 2.0))


def test_restore_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.restore(tmp_path / "missing")
    checkpoint.save(tmp_path, 1, {"w": jnp.zeros((8, 2))})
    with pytest.raises(FileNotFoundError, match=r"step 5 not in .*saved steps: \[1\]"):
        checkpoint.restore(tmp_path, 5)
    device = SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(4, 2\) but the checkpoint holds shape \(8, 2\)"):
        checkpoint.restore(tmp_path, target_shardings={"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=device)})
    with pytest.raises(ValueError, match=r"\['v'\] is not in the checkpoint"):
        checkpoint.restore(tmp_path, target_shardings={"v": device})
    with pytest.raises(ValueError, match="metadata must be a JSON object"):
        checkpoint.save(tmp_path, 2, {"w": jnp.zeros(2)}, ["not", "a", "dict"])


@pytest.mark.parametrize("target_mesh", [{"fsdp": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}, None])
def test_model_params_saved_on_fsdp8_restore_onto_other_meshes(tmp_path, target_mesh):
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), abstract_params(TINY))
    params = jax.device_put(host, param_shardings(TINY, make_mesh({"fsdp": 8})))
    checkpoint.save(tmp_path, 1, {"params": params}, {"config": "tiny"})
    if target_mesh is None:
        restored, _ = checkpoint.restore(tmp_path)
        want = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), host)
    else:
        want = param_shardings(TINY, make_mesh(target_mesh))
        restored, _ = checkpoint.restore(tmp_path, target_shardings={"params": want})
    _assert_same_values(restored["params"], host)
    for got, sharding in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(want)):
        assert got.sharding == sharding
