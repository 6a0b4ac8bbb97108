"""Evaluates a trained checkpoint on a suite with fixed seeds and prints the `ace.eval` metrics table.

    python experiments/eval.py checkpoint=outputs/<run> suite=held_out seeds=[0,1,2]

`checkpoint` is a run directory (the `out_dir` of `experiments/run.py`), its `checkpoints/` folder,
or one step folder inside it (default: the newest step). The policy is rebuilt from the checkpoint:
params from the trainer's orbax state (`learner.params`), the model config and the tokenizer from
the checkpoint's metadata (`model_config`, `tokenizer_dir`) or, failing that, from the run
directory (`model_config.json`, `tokenizer/`). Environment, rollout and `eval.*` settings come from
this command's config (the same Hydra config dir as `run.py`), so they can be overridden here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

SUITES = ("train", "held_out", "all")

# The eval command's own keys on top of the main config (same defaults: model, env, rollout, ...).
ConfigStore.instance().store(name="eval_cli", node={
    "defaults": ["config", "_self_"],
    "checkpoint": "???",   # run dir, its checkpoints/ dir, or one step dir
    "step": None,          # checkpoint step (null = the newest)
    "suite": "held_out",   # train | held_out | all
    "seeds": None,         # null = eval.seeds
})


@dataclasses.dataclass
class Policy:
    """A restored policy: params (float32 pytree), its ModelConfig and tokenizer, and where it came from."""

    params: Any
    model_config: Any
    tokenizer: Any
    step: int
    run_dir: Path


def locate_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[Path, Path, int | None]:
    """(run dir, checkpoint root, step or None = newest) for any of the accepted `checkpoint` paths."""
    from ace.models import checkpoint as ckpt_lib

    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint={str(path)!r}: no such directory; expected a run dir (with "
                                "checkpoints/), its checkpoints/ dir or one step dir")
    if (p / "checkpoints").is_dir():
        return p, p / "checkpoints", step
    if p.name.isdigit() and ckpt_lib.all_steps(p.parent):
        if step is not None and int(step) != int(p.name):
            raise ValueError(f"checkpoint={str(path)!r} names step {p.name} but step={step} was given")
        return p.parent.parent, p.parent, int(p.name)
    if ckpt_lib.all_steps(p):
        return p.parent, p, step
    raise FileNotFoundError(f"checkpoint={str(path)!r} holds no orbax checkpoint steps (looked in {p} and "
                            f"{p / 'checkpoints'})")


def _model_config(meta: Mapping[str, Any], run_dir: Path):
    from ace.models.configs import ModelConfig

    if meta.get("model_config"):
        return ModelConfig(**meta["model_config"])
    file = run_dir / "model_config.json"
    if file.is_file():
        return ModelConfig(**json.loads(file.read_text()))
    raise FileNotFoundError(f"no model config for the checkpoint: metadata has no 'model_config' and "
                            f"{file} does not exist")


def _tokenizer(meta: Mapping[str, Any], run_dir: Path):
    from ace.models.tokenizer import Tokenizer

    candidates = [Path(meta["tokenizer_dir"])] if meta.get("tokenizer_dir") else []
    candidates.append(run_dir / "tokenizer")
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            return Tokenizer.from_dir(folder)
    raise FileNotFoundError(f"no tokenizer for the checkpoint: looked for tokenizer.json in "
                            f"{[str(c) for c in candidates]}")


def load_policy(path: str | os.PathLike, *, step: int | None = None) -> Policy:
    """Restores params, model config and tokenizer of a trainer checkpoint (see the module docstring).

    Raises:
      FileNotFoundError: no checkpoint, model config or tokenizer where they should be.
      ValueError: the params' shapes do not match the model config.
    """
    import jax

    from ace.models import checkpoint as ckpt_lib
    from ace.models.qwen3 import abstract_params

    run_dir, root, step = locate_checkpoint(path, step)
    with ckpt_lib.Checkpointer(root) as ckpt:
        step = ckpt.latest_step() if step is None else int(step)
        state, meta = ckpt.restore(step)
    if "learner" not in state or "params" not in state["learner"]:
        raise ValueError(f"checkpoint {root}/{step}: expected the trainer's state with learner.params, "
                         f"got top-level keys {sorted(state)}")
    params = state["learner"]["params"]
    model_config = _model_config(meta, run_dir)
    want = jax.tree.map(lambda s: tuple(s.shape), abstract_params(model_config))
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if want != got:
        raise ValueError(f"checkpoint {root}/{step}: param shapes {got} do not match the model config {want}")
    return Policy(params=params, model_config=model_config, tokenizer=_tokenizer(meta, run_dir), step=int(step),
                  run_dir=run_dir)


def evaluate_checkpoint(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Restores `cfg["checkpoint"]` and evaluates it on `cfg["suite"]` with `cfg["seeds"]`.

    Args:
      cfg: the composed eval config as a plain dict (the main config plus checkpoint, step, suite, seeds).
    Returns:
      {"metrics": {name: MeanSE}, "episodes": {seed: [Episode]}, "step": int, "table": str}.
    """
    from ace.env.sandbox import make_sandbox
    from ace.env.suites import load_suite
    from ace.eval import format_table
    from ace.train.experiment import evaluate_policy

    suite = cfg["suite"]
    if suite not in SUITES:
        raise ValueError(f"suite={suite!r}, expected one of {SUITES}")
    seeds = cfg["seeds"] if cfg.get("seeds") is not None else cfg["eval"]["seeds"]
    if isinstance(seeds, int):
        seeds = [seeds]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds=[]: expected at least one seed, e.g. seeds=[0,1,2]")
    if cfg["env"]["kind"] != "builtin":
        raise ValueError(f"env.kind={cfg['env']['kind']!r}: this command evaluates on the built-in suite ('builtin')")
    policy = load_policy(cfg["checkpoint"], step=cfg.get("step"))
    comps = load_suite(suite, seed=int(cfg["env"]["suite_seed"]))
    limit = cfg["eval"].get("competitions")
    if limit:
        comps = comps[:int(limit)]
    print(f"[eval] step {policy.step} of {policy.run_dir}: {len(comps)} {suite} competitions x {len(seeds)} "
          f"seeds {seeds}", flush=True)
    with make_sandbox(cfg["env"]["sandbox"]) as sandbox:
        result = evaluate_policy(policy.params, policy.model_config, policy.tokenizer, comps, sandbox, seeds=seeds,
                                 cfg=cfg)
    table = format_table(result.metrics)
    print(f"\n{suite} evaluation (mean ± SE over {'seeds' if len(seeds) > 1 else 'episodes'}):")
    print(table, flush=True)
    return {"metrics": result.metrics, "episodes": result.episodes, "step": policy.step, "table": table}


@hydra.main(version_base="1.3", config_path="../hydra_configs", config_name="eval_cli")
def main(cfg: DictConfig) -> None:
    # Hydra logs at INFO; orbax's per-restore absl lines would bury the table.
    logging.getLogger("absl").setLevel(logging.WARNING)
    evaluate_checkpoint(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
