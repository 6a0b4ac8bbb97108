"""The rollout engine of a run, chosen by `rollout.kind`, and the checks that follow a weight push.

`open_engine(cfg, policy, out_dir, max_batch=..., mesh=...)` returns a `RunEngine`: the engine the
trainer and the evaluation share (`engine`), and `after_publish(version, params) -> metrics`, which
the trainer calls after each push. For SGLang it reads every server's reported weight version and,
with `rollout.check_logprobs`, scores a fixed probe sequence on every server and with the learner's
own forward pass, so a push that did not land (or landed different weights) shows in the metrics.
`close()` stops whatever the engine launched.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ace.models.hf import save_hf_checkpoint
from ace.models.logprobs import model_token_logprobs
from ace.models.sharding import to_host, use_mesh
from ace.rollout.engine import RolloutEngine
from ace.train.multihost import put_global

# The probe: a fixed text scored after every push when rollout.check_logprobs is on.
PROBE_TEXT = ("import pandas as pd\nfrom sklearn.linear_model import LogisticRegression\n"
              "train = pd.read_csv('train.csv')\nprint(train.shape)\n")
PROBE_TOKENS = 48
PROBE_TRIES = 3       # tries per server when a probe disagrees (see sglang_after_publish)
PROBE_GOOD = 1e-4     # a disagreement below this ends the tries


@dataclasses.dataclass
class RunEngine:
    engine: RolloutEngine
    after_publish: Callable[[int, Any], Mapping[str, float]] | None = None
    pool: Any = None

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Blocks until every server is serving again (SGLang); True at once for the embedded sampler."""
        if self.pool is None:
            return True
        ok = self.pool.engine.wait_all_up(timeout_s)
        self.pool.write_status()
        return ok

    def close(self) -> None:
        if self.pool is not None:
            self.pool.write_status()
            self.pool.close()

    def __enter__(self) -> "RunEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wants_routing(cfg: Mapping[str, Any]) -> bool:
    """Whether the engine must return routed experts: asked for (rollout.return_routing), or needed
    by the learner (train.routing_replay)."""
    return bool(cfg["rollout"].get("return_routing")) or bool(cfg.get("train", {}).get("routing_replay"))


def make_jax_sampler(params: Any, model_config: Any, rollout: Mapping[str, Any], *, max_batch: int, seed: int,
                     return_routing: bool = False):
    """The embedded JAX sampler with two prefill buckets (half and full prompt budget)."""
    from ace.rollout.jax_sampler import JaxSampler

    max_prompt = int(rollout["max_prompt_tokens"])
    # A fresh state's prompt is about a third of the budget, a state with history up to all of it:
    # two prefill buckets (half and full) cover both with two compiles.
    buckets = (max_prompt // 2,) if max_prompt >= 256 else ()
    return JaxSampler(params, model_config, max_batch=max_batch, max_prompt_len=max_prompt,
                      max_new_tokens=int(rollout["max_new_tokens"]), prompt_buckets=buckets, seed=seed,
                      return_routing=return_routing)


def hf_exporter(model_config: Any, tokenizer: Any, source_dir: Path | None) -> Callable[[Any, Path], None]:
    """`exporter(params, folder)`: the params as an HF folder with the tokenizer (and, for a policy
    read from an HF folder, its generation_config.json, which SGLang reads for stop tokens)."""

    def export(params: Any, path: Path | None) -> None:
        save_hf_checkpoint(params, model_config, path, tokenizer=tokenizer, overwrite=True)
        if path is not None and source_dir is not None and (source_dir / "generation_config.json").is_file():
            shutil.copy2(source_dir / "generation_config.json", path / "generation_config.json")

    return export


def _probe_logprobs(model_config: Any, mesh: jax.sharding.Mesh | None):
    @jax.jit
    def score(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
        lp, _ = model_token_logprobs(params, model_config, tokens, positions, targets)
        return lp

    def run(params, tokens: np.ndarray) -> np.ndarray:
        x = np.asarray(tokens[None], np.int32)
        if mesh is None:
            return np.asarray(score(params, jnp.asarray(x)))[0, :-1]
        x = put_global(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        with use_mesh(mesh):
            return to_host(score(params, x))[0, :-1]

    return run


def sglang_after_publish(pool: Any, tokenizer: Any, model_config: Any, mesh, *, check_logprobs: bool):
    """The post-push check of an SGLang pool (see the module docstring)."""
    probe = np.asarray(tokenizer.encode(PROBE_TEXT)[:PROBE_TOKENS], np.int32)
    learner_lp = _probe_logprobs(model_config, mesh) if check_logprobs else None

    def after_publish(version: int, params: Any) -> dict[str, float]:
        versions = pool.engine.server_versions()
        out = {"servers_up": float(sum(v is not None for v in versions)),
               "servers_at_version": float(sum(v == version for v in versions)),
               "server_restarts": float(sum(s.restarts for s in pool.servers))}
        for i, v in enumerate(versions):
            out[f"server{i}_version"] = float("nan") if v is None else float(v)
        if learner_lp is not None:
            want = learner_lp(params, probe)
            # A probe that happens to share a prefill batch with another request (a router health
            # check, a rollout) is computed with other kernel shapes; on an MoE a router near-tie can
            # then pick another expert and move a logprob by ~1e-3. Wrong weights move every try,
            # batch noise does not repeat: the best of PROBE_TRIES tries is reported.
            best = [float("inf")] * len(pool.servers)
            for tries in range(1, PROBE_TRIES + 1):
                for i, got in enumerate(pool.engine.probe_logprobs(probe.tolist())):
                    if got is not None:
                        best[i] = min(best[i], float(np.max(np.abs(got - want))))
                if max(best) <= PROBE_GOOD:
                    break
            diffs = []
            for i, d in enumerate(best):
                d = float("nan") if d == float("inf") else d
                out[f"server{i}_probe_logprob_diff"] = d
                diffs.append(d)
            out["probe_tries"] = float(tries)
            finite = [d for d in diffs if not math.isnan(d)]
            out["probe_logprob_max_diff"] = max(finite) if finite else float("nan")
        pool.write_status(versions)
        return out

    return after_publish


def open_engine(cfg: Mapping[str, Any], policy: Any, out_dir: str | Path, *, max_batch: int,
                mesh: jax.sharding.Mesh | None = None, initial_version: int = 0) -> RunEngine:
    """The engine named by rollout.kind, holding `policy.params` as `initial_version`.

    jax_sampler: the embedded sampler in this process. sglang: an `SGLangPool` (launched or
    connected as `rollout.*` says); the servers start from the policy's HF folder when its weights
    are unchanged from it, else from an export of `policy.params`.
    """
    rollout = cfg["rollout"]
    kind = rollout["kind"]
    if kind == "jax_sampler":
        return RunEngine(make_jax_sampler(policy.params, policy.model_config, rollout, max_batch=max_batch,
                                          seed=int(cfg["seed"]), return_routing=wants_routing(cfg)))
    if kind != "sglang":
        raise ValueError(f"rollout.kind={kind!r}: expected 'jax_sampler' or 'sglang'")
    from ace.rollout.sglang_pool import SGLangPool
    from ace.rollout.sglang_pool_config import SGLangPoolConfig

    pcfg = SGLangPoolConfig.from_cfg({**rollout, "return_routing": wants_routing(cfg)})
    out_dir = Path(out_dir)
    exporter = hf_exporter(policy.model_config, policy.tokenizer, policy.hf_dir)
    if policy.source == "hf" and initial_version == 0:
        model_path = policy.hf_dir
    else:
        # SFT'd, freshly initialised or resumed weights: the servers start from an export of them.
        model_path = out_dir / "rollout" / "initial_policy"
        if model_path.exists():
            shutil.rmtree(model_path)
        exporter(_model_dtype(policy.params, policy.model_config), model_path)
    nbytes = sum(x.size * np.dtype(policy.model_config.param_dtype).itemsize for x in jax.tree.leaves(policy.params))
    pool = SGLangPool.start(pcfg, model_path=model_path, exporter=exporter, out_dir=out_dir,
                            initial_version=initial_version, bytes_per_version=int(nbytes))
    try:
        hook = sglang_after_publish(pool, policy.tokenizer, policy.model_config, mesh,
                                    check_logprobs=pcfg.check_logprobs)
    except BaseException:
        pool.close()
        raise
    return RunEngine(pool.engine, hook, pool)


def open_mirror_engine(cfg: Mapping[str, Any], policy: Any, out_dir: str | Path, *, max_batch: int,
                       mesh: jax.sharding.Mesh | None = None, initial_version: int = 0) -> RunEngine:
    """`open_engine` on a non-controller process of a multi-process run: no servers, but every export
    and learner-side check the controller's engine does is mirrored, since they are collective."""
    from ace.train.multihost import MirrorEngine

    exporter = hf_exporter(policy.model_config, policy.tokenizer, policy.hf_dir)
    if not (policy.source == "hf" and initial_version == 0):
        exporter(_model_dtype(policy.params, policy.model_config), None)  # the controller's initial export
    engine = MirrorEngine(exporter, initial_version=initial_version)
    if not cfg["rollout"].get("check_logprobs"):
        return RunEngine(engine)
    probe = np.asarray(policy.tokenizer.encode(PROBE_TEXT)[:PROBE_TOKENS], np.int32)
    learner_lp = _probe_logprobs(policy.model_config, mesh)

    def mirror_probe(version: int, params: Any) -> dict[str, float]:
        learner_lp(params, probe)  # collective: the controller computes the same forward pass
        return {}

    return RunEngine(engine, mirror_probe)


def _model_dtype(params: Any, model_config: Any) -> Any:
    dtype = model_config.param_dtype
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

