"""Mixture-of-experts MLP: softmax top-k router, dropless ragged and grouped dispatch, dense reference, aux loss.

Shapes: N tokens (flattened batch x length), D hidden, E experts, k experts per token, F expert
hidden size. Expert weights are stacked: gate/up [E, D, F], down [E, F, D], router [D, E].
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ace.models.autoselect import choose_moe
from ace.models.sharding import logical_to_spec

MOE_IMPLS = ("ragged", "grouped", "dense", "auto")


class Routing(NamedTuple):
    """The router's decision for N tokens.

    probs: [N, E] float32 softmax over all experts (the aux loss needs all of them).
    weights: [N, k] float32 gate of each chosen expert (renormalised when norm_topk_prob).
    ids: [N, k] int32 chosen experts (the replayed ones under routing replay).
    own_ids: [N, k] int32 the experts this router's own top-k picks; equal to `ids` unless replayed
      (their disagreement measures how far the sampler's routing is from the learner's).
    """

    probs: jax.Array
    weights: jax.Array
    ids: jax.Array
    own_ids: jax.Array


def route(x: jax.Array, router: jax.Array, *, top_k: int, norm_topk_prob: bool,
          routing: jax.Array | None = None) -> Routing:
    """Softmax router in float32 with top-k choice, or replay of given expert ids.

    Args:
      x: [N, D] token activations.
      router: [D, E] router weight.
      top_k: experts per token.
      norm_topk_prob: renormalise the k chosen probabilities to sum to one (Qwen3-MoE does).
      routing: optional [N, k] int32 expert ids to use instead of the top-k choice (routing replay);
        the gate weights are still recomputed from this router's probabilities at those ids, so
        gradients reach the router. Ids must lie in [0, E).
    Returns:
      `Routing(probs [N, E] f32, weights [N, k] f32, ids [N, k] int32, own_ids [N, k] int32)`.
    """
    if x.ndim != 2 or router.ndim != 2 or x.shape[1] != router.shape[0]:
        raise ValueError(f"route: x must be [N, D] and router [D, E], got x {x.shape} router {router.shape}")
    logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    top_weights, own_ids = jax.lax.top_k(probs, top_k)
    if routing is None:
        weights, ids = top_weights, own_ids
    else:
        if routing.shape != (x.shape[0], top_k):
            raise ValueError(f"route: routing must be [N, k] = {(x.shape[0], top_k)}, got {routing.shape}")
        ids = routing
        weights = jnp.take_along_axis(probs, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(probs, weights, ids.astype(jnp.int32), own_ids.astype(jnp.int32))


def ragged_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array,
                   down: jax.Array) -> jax.Array:
    """Dropless dispatch: sort the N*k (token, expert) pairs by expert, grouped SwiGLU, scatter back.

    Args:
      x: [N, D]; ids: [N, k] int32; weights: [N, k] float32.
      gate, up: [E, D, F]; down: [E, F, D].
    Returns:
      [N, D] in x.dtype: sum over the k chosen experts of weight * down(silu(gate x) * up x).
    """
    n, k = ids.shape
    num_experts = gate.shape[0]
    flat_ids = ids.reshape(-1)
    # Stable sort keeps tokens of one expert in token order; every pair is kept (no capacity drop).
    # Ids >= E (pairs owned by another expert shard) sort last and fall outside every group.
    order = jnp.argsort(flat_ids, stable=True)
    token_of_pair = order // k
    xs = jnp.take(x, token_of_pair, axis=0)  # [N*k, D]
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, group_sizes)) * jax.lax.ragged_dot(xs, up, group_sizes)
    ys = jax.lax.ragged_dot(h, down, group_sizes)  # [N*k, D], sorted by expert
    # Rows past the last group are unspecified on some backends; zero them explicitly.
    covered = jnp.arange(n * k) < jnp.sum(group_sizes)
    ys = jnp.where(covered[:, None], ys, jnp.zeros((), ys.dtype))
    unsorted = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)
    per_choice = unsorted.reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", per_choice, weights.astype(per_choice.dtype))


def grouped_tile(num_pairs: int, num_experts: int, max_tile: int) -> int:
    """Rows per tile of `grouped_experts` for M = `num_pairs` pairs over E experts: a power of two,
    about a quarter of the mean group (M / E), at least 32 unless the mean group is smaller, at most
    `max_tile`. Fewer, larger tiles cost less per tile; smaller ones pad less (padding is under
    E * tile rows). Measured on CPU (D = F = 128, E = 8, k = 2), fwd+bwd fastest at N = 128, 512,
    1024, 4096 tokens: tile 32, 32-64, 64, 256."""
    per_expert = 1 << (max(1, num_pairs // num_experts).bit_length() - 1)
    return max(1, min(max_tile, max(min(32, per_expert), per_expert // 4)))


def grouped_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array,
                    down: jax.Array, *, tile: int = 256) -> jax.Array:
    """Dropless dispatch without a ragged kernel: the M = N*k (token, expert) pairs sorted by expert,
    each expert's group padded to whole tiles of `tile` rows, SwiGLU as batched matmuls over the
    tiles with each tile's expert weights gathered, and each pair's row gathered back.

    Static shapes: NT = min(M, ceil(M / tile) + min(E, M) - 1) tiles, the most any routing needs
    (each non-empty expert wastes under one tile); padding rows and the unused tail tiles compute on
    a repeated real token, are never read and get zero gradient. Only routed tokens (plus that
    padding) are computed: about
    (M + E * tile) * D * F per matmul, against E * N * D * F for `dense_experts`. Every pair is
    kept; ids outside [0, E) (pairs owned by another expert shard) get no row and contribute zero.

    Args:
      x: [N, D]; ids: [N, k] int32; weights: [N, k] float32.
      gate, up: [E, D, F]; down: [E, F, D].
      tile: rows per tile (>= 1); see `grouped_tile` for the size `moe_mlp` picks.
    Returns:
      [N, D] in x.dtype, as `ragged_experts`.
    """
    if not isinstance(tile, int) or tile <= 0:
        raise ValueError(f"grouped_experts: tile must be a positive int, got {tile!r}")
    n, k = ids.shape
    num_experts = gate.shape[0]
    m = n * k
    flat_ids = ids.reshape(-1)
    mine = (flat_ids >= 0) & (flat_ids < num_experts)
    key = jnp.where(mine, flat_ids, num_experts)  # foreign pairs sort last, outside every group
    order = jnp.argsort(key, stable=True)  # sorted slot -> pair
    sizes = jnp.bincount(key, length=num_experts).astype(jnp.int32)  # key == E is dropped
    tiles = (sizes + tile - 1) // tile
    tile_end = jnp.cumsum(tiles)
    tile_begin, group_begin = tile_end - tiles, jnp.cumsum(sizes) - sizes
    num_tiles = min(m, -(-m // tile) + min(num_experts, m) - 1)
    tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)
    # Tile i belongs to the expert whose tile range holds i (unused tail tiles: the last expert).
    tile_expert = jnp.minimum(jnp.sum(tile_end[None, :] <= tile_ids[:, None], axis=1), num_experts - 1)
    offset = (tile_ids - tile_begin[tile_expert])[:, None] * tile + jnp.arange(tile, dtype=jnp.int32)
    row_used = offset < sizes[tile_expert][:, None]  # [NT, tile]
    pair_of_row = order[jnp.where(row_used, group_begin[tile_expert][:, None] + offset, 0)]
    xs = jnp.take(x, pair_of_row // k, axis=0)  # [NT, tile, D]; padding rows repeat a real token
    wg, wu, wd = (jnp.take(w, tile_expert, axis=0) for w in (gate, up, down))
    h = jax.nn.silu(jnp.einsum("ntd,ndf->ntf", xs, wg)) * jnp.einsum("ntd,ndf->ntf", xs, wu)
    ys = jnp.einsum("ntf,nfd->ntd", h, wd).reshape(num_tiles * tile, -1)
    # Row of each pair: its expert's first tile plus its rank within the expert's group.
    sorted_key = key[order]
    last = jnp.minimum(sorted_key, num_experts - 1)
    row_sorted = tile_begin[last] * tile + jnp.arange(m, dtype=jnp.int32) - group_begin[last]
    row_sorted = jnp.where(sorted_key < num_experts, row_sorted, 0)  # foreign pairs: any row, gate 0
    row_of_pair = jnp.zeros(m, jnp.int32).at[order].set(row_sorted, unique_indices=True)
    per_choice = jnp.take(ys, row_of_pair, axis=0).reshape(n, k, -1)
    gates = jnp.where(mine, weights.reshape(-1), 0.0).reshape(n, k).astype(per_choice.dtype)
    return jnp.einsum("nkd,nk->nd", per_choice, gates)


def _expert_parallel_specs(n: int, gate_shape, mesh):
    """PartitionSpecs for the shard_map expert-parallel path, or None when it does not apply: no mesh,
    experts not split, or the expert mesh axes not among those that split the tokens."""
    if mesh is None or mesh.empty:
        return None
    shape = dict(mesh.shape)
    tok = logical_to_spec(("batch", None), shape, (n, gate_shape[1]))
    w = logical_to_spec(("experts", "expert_embed", "expert_mlp"), shape, gate_shape)
    down = logical_to_spec(("experts", "expert_mlp", "expert_embed"),
                           shape, (gate_shape[0], gate_shape[2], gate_shape[1]))
    as_tuple = lambda entry: () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    tok_axes, e_axes = as_tuple(tok[0]), as_tuple(w[0])
    if not e_axes or not set(e_axes) <= set(tok_axes):
        return None
    return tok, w, down, e_axes, as_tuple(w[1]), as_tuple(w[2])


def expert_parallel_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array,
                            down: jax.Array, *, mesh, specs, local=ragged_experts) -> jax.Array:
    """Expert parallelism with `shard_map`: each expert shard gathers the tokens of its expert group,
    runs `local` (`ragged_experts` or `grouped_experts`) on its local experts only, and
    reduce-scatters the partial outputs back.

    Same I/O as `ragged_experts`; `specs` comes from `_expert_parallel_specs`. Expert weights stay
    local (only their fsdp-split hidden dim is gathered); tokens move, not weights. `local` must
    give zero to ids >= its number of experts (the pairs of other shards).
    """
    tok, w_spec, down_spec, e_axes, d_axes, f_axes = specs

    def kernel(x, ids, weights, gate, up, down):
        if d_axes:
            gate = jax.lax.all_gather(gate, d_axes, axis=1, tiled=True)
            up = jax.lax.all_gather(up, d_axes, axis=1, tiled=True)
            down = jax.lax.all_gather(down, d_axes, axis=2, tiled=True)
        x, ids, weights = (jax.lax.all_gather(a, e_axes, axis=0, tiled=True) for a in (x, ids, weights))
        local_experts = gate.shape[0]
        local_ids = ids - jax.lax.axis_index(e_axes) * local_experts
        mine = (local_ids >= 0) & (local_ids < local_experts)
        y = local(x, jnp.where(mine, local_ids, local_experts), jnp.where(mine, weights, 0.0), gate, up, down)
        if f_axes:  # the expert hidden dim is split: each shard holds a partial sum of down(.)
            y = jax.lax.psum(y, f_axes)
        return jax.lax.psum_scatter(y, e_axes, scatter_dimension=0, tiled=True)

    return jax.shard_map(kernel, mesh=mesh, in_specs=(tok, tok, tok, w_spec, w_spec, down_spec), out_specs=tok,
                         check_vma=False)(x, ids, weights, gate, up, down)


def dense_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array,
                  down: jax.Array) -> jax.Array:
    """Reference path: every expert on every token, weighted by the (mostly zero) gate. Same I/O as
    `ragged_experts`; E times the flops, kept for tests and as a baseline."""
    num_experts = gate.shape[0]
    # [N, E] gate: weight at the chosen experts, zero elsewhere.
    dense_gate = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=weights.dtype) * weights[..., None], axis=1)
    # A batched matmul over experts: contracting x [N, D] with gate [E, D, F] directly makes XLA
    # transpose the whole weight to [D, E, F] on every call (2.7x slower on a decode step on CPU).
    xe = jnp.broadcast_to(x, (num_experts, *x.shape))
    h = jax.nn.silu(jnp.einsum("end,edf->enf", xe, gate)) * jnp.einsum("end,edf->enf", xe, up)
    ys = jnp.einsum("enf,efd->end", h, down)
    return jnp.einsum("end,ne->nd", ys, dense_gate.astype(ys.dtype))


def load_balancing_loss(probs: jax.Array, ids: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Switch-Transformer auxiliary loss as Qwen3-MoE / HF compute it for one layer: E * sum_e f_e P_e.

    f_e is the number of (token, choice) pairs routed to e divided by the number of tokens (so sum_e
    f_e = k and a perfectly balanced router gives k), P_e the mean router probability of e (Fedus et
    al. 2021, eqs. 4-6). Only P carries a gradient. Not multiplied by `router_aux_loss_coef`.

    Args:
      probs: [N, E] float32 router softmax; ids: [N, k] chosen experts.
      mask: optional [N] (1 = real token, 0 = padding excluded from both averages).
    Returns:
      scalar float32.
    """
    num_experts = probs.shape[-1]
    m = jnp.ones(probs.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1.0)
    routed = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), axis=1)  # [N, E]
    f = jax.lax.stop_gradient(jnp.sum(routed * m[:, None], axis=0) / count)
    p = jnp.sum(probs * m[:, None], axis=0) / count
    return num_experts * jnp.sum(f * p)


def moe_mlp(params: dict, x: jax.Array, *, top_k: int, norm_topk_prob: bool, impl: str = "ragged",
            tile: int = 256, routing: jax.Array | None = None, mask: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The MoE block of one layer.

    Args:
      params: {"router": [D, E], "gate_proj": [E, D, F], "up_proj": [E, D, F], "down_proj": [E, F, D]}.
      x: [N, D] activations.
      top_k, norm_topk_prob: as in the config.
      impl: one of MOE_IMPLS: "ragged" (sorted dispatch + `jax.lax.ragged_dot`), "grouped" (sorted
        dispatch padded to tiles + batched matmuls, `grouped_experts`), "dense" (reference), or
        "auto" (`ace.models.autoselect.choose_moe`: by backend and N * k). Under a current mesh
        (`sharding.use_mesh`) whose rules split experts over mesh axes that also split the tokens,
        "ragged" and "grouped" run expert-parallel (`expert_parallel_experts`); otherwise GSPMD
        partitions them.
      tile: the most rows per tile of "grouped" (the size used is `grouped_tile`).
      routing: optional [N, k] int32 expert ids to replay.
      mask: optional [N], 1 = real token; only the aux loss uses it.
    Returns:
      (y [N, D] x.dtype, aux_loss scalar float32 (unscaled), ids [N, k] int32 the experts used,
      own_ids [N, k] int32 the router's own top-k, which differs from ids only under replay).
    """
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_mlp: impl must be one of {MOE_IMPLS}, got {impl!r}")
    r = route(x, params["router"], top_k=top_k, norm_topk_prob=norm_topk_prob, routing=routing)
    impl = choose_moe(impl, num_pairs=x.shape[0] * top_k, num_experts=params["gate_proj"].shape[0])
    if impl == "dense":
        experts = dense_experts
    else:
        if impl == "ragged":
            local = ragged_experts
        else:
            def local(x, ids, weights, gate, up, down):
                size = grouped_tile(ids.size, gate.shape[0], tile)
                return grouped_experts(x, ids, weights, gate, up, down, tile=size)
        mesh = jax.sharding.get_abstract_mesh()
        specs = _expert_parallel_specs(x.shape[0], params["gate_proj"].shape, mesh)
        experts = local if specs is None else functools.partial(
            expert_parallel_experts, mesh=mesh, specs=specs, local=local)
    y = experts(x, r.ids, r.weights, params["gate_proj"], params["up_proj"], params["down_proj"])
    return y.astype(x.dtype), load_balancing_loss(r.probs, r.ids, mask=mask), r.ids, r.own_ids
