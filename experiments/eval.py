"""Evaluates a trained checkpoint on a suite with fixed seeds, prints the `ace.eval` metrics table and
writes MLE-bench's grading reports.

    python experiments/eval.py checkpoint=outputs/<run> suite=held_out seeds=[0,1,2]
    python experiments/eval.py checkpoint=outputs/<run> env=mlebench env.data_dir=<prepared> suite=lite seeds=[0,1,2]

Suites: `train`, `held_out` and `all` (training then held-out) are the run's own competitions;
`lite` is MLE-bench-Lite: the `ace.env.mlebench.MLEBENCH_LITE` competitions prepared under
env.data_dir (it needs env.kind=mlebench; the ones not prepared are listed, and the table then covers
fewer than 22). `lite` prints the MLE-bench-Lite table of the AceGRPO paper (`ace.eval.LITE_ROWS`),
the other suites the full table.

`checkpoint` is a run directory (the `out_dir` of `experiments/run.py`), its `checkpoints/` folder,
or one step folder inside it (default: the newest step). The run directory is all it needs:

  policy     params from the trainer's orbax state (`learner.params`); the model config and the
             tokenizer from the checkpoint's metadata (`model_config`, `tokenizer_dir`) or, failing
             that, the run directory's `model_config.json` and `tokenizer/`; the prompt limits the
             policy was trained with from `prompt_config.json` (default: the SFT corpus's);
  settings   the ones in RUN_SETTINGS (competitions, episode length, reward, prompt overrides,
             held-out cut, eval seeds and temperature, sampling limits) from the run's `config.json`,
             so the evaluation is the run's own; every one of them that this command's arguments
             name is taken from the arguments instead. Without a `config.json` all settings come
             from this command's config (the same Hydra config dir as `run.py`).

The competitions come from `ace.train.experiment.load_competitions` (env.kind builtin or mlebench),
or for `lite` from `ace.env.mlebench.load_mlebench_suite(env.data_dir, "lite")`.

Outputs, under `<run dir>/eval/<suite>-step<step>/`:

  submissions/seed-<seed>/<competition>.csv   each episode's best submission (what `submit` hands in)
  seed-<seed>/<timestamp>_grading_report.json MLE-bench's grading report of that seed's episodes
                                              (`ace.env.reports`: one competition report each)
  transcripts/seed-<seed>/<competition>.json   each episode's actions, outcomes, rewards and observations
  metrics.json                                the metrics as {name: {mean, se, n}} (null for n/a)
  table.txt, lite_table.txt                   the full table and the MLE-bench-Lite rows

Sampling always uses the embedded JAX sampler (rollout.kind=jax_sampler), whatever served the run's
rollouts. With the same checkpoint and seeds, two evaluations print the same table (see
`ace.train.episodes`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

SUITES = ("train", "held_out", "all", "lite")
# Settings of the run's own evaluation, read from <run dir>/config.json unless the command names them.
RUN_SETTINGS = ("seed", "env", "eval", "train.competitions", "rollout.max_new_tokens", "rollout.max_prompt_tokens",
                "rollout.top_p", "rollout.top_k")

# The eval command's own keys on top of the main config (same defaults: model, env, rollout, ...).
ConfigStore.instance().store(name="eval_cli", node={
    "defaults": ["config", "_self_"],
    "checkpoint": "???",   # run dir, its checkpoints/ dir, or one step dir
    "step": None,          # checkpoint step (null = the newest)
    "suite": "held_out",   # train | held_out | all | lite (MLE-bench-Lite: env=mlebench env.data_dir=...)
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
    prompt_cfg: Any = None   # PromptConfig the policy was trained with (None: the SFT corpus's)


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


def _prompt_config(run_dir: Path):
    from ace.env.prompt import PromptConfig

    file = run_dir / "prompt_config.json"
    return PromptConfig(**json.loads(file.read_text())) if file.is_file() else None


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
                  run_dir=run_dir, prompt_cfg=_prompt_config(run_dir))


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys (or config groups) that Hydra command-line overrides set, add or delete."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]


def with_run_settings(cfg: Mapping[str, Any], run_cfg: Mapping[str, Any],
                      overridden: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """`cfg` with each RUN_SETTINGS entry taken from the run's config, except what `overridden` names.

    A setting the command names as a whole (`env=mlebench`, `eval.seeds=[0]`) stays the command's;
    one it names a part of (`env.max_steps=3`) is the run's with that part from the command.
    Returns (the merged config, the settings taken from the run).
    """
    given, run = OmegaConf.create(dict(cfg)), OmegaConf.create(dict(run_cfg))
    out = copy.deepcopy(given)
    missing = object()
    taken = []
    for path in RUN_SETTINGS:
        value = OmegaConf.select(run, path, default=missing)
        if value is missing or any(path == k or path.startswith(k + ".") for k in overridden):
            continue
        OmegaConf.update(out, path, value, merge=False)
        for key in overridden:
            if not key.startswith(path + "."):
                continue
            mine = OmegaConf.select(given, key, default=missing)
            if mine is not missing:
                OmegaConf.update(out, key, mine, merge=False)
            else:  # the command deleted it (~key)
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(out, parent) if parent else out
                if isinstance(node, DictConfig):
                    node.pop(leaf, None)
        taken.append(path)
    return OmegaConf.to_container(out), taken


def lite_competitions(cfg: Mapping[str, Any]) -> list[Any]:
    """The MLE-bench-Lite competitions prepared under env.data_dir (all 22 when every one is);
    prints the ones that are not prepared. Needs env.kind=mlebench."""
    from ace.env.mlebench import MLEBENCH_LITE, load_mlebench_suite

    env = cfg["env"]
    if env.get("kind") != "mlebench":
        raise ValueError(f"suite=lite evaluates on MLE-bench-Lite and needs env.kind=mlebench, got "
                         f"env.kind={env.get('kind')!r}: pass env=mlebench env.data_dir=<the folder "
                         "`mlebench prepare` wrote>")
    data_dir = env.get("data_dir")
    if not data_dir or data_dir == "???":
        raise ValueError("suite=lite needs env.data_dir: the folder `mlebench prepare` wrote "
                         "(<data_dir>/<competition>/prepared/{public,private})")
    root = Path(str(data_dir)).expanduser()
    comps = load_mlebench_suite(root, "lite", competitions_dir=env.get("competitions_dir"))
    loaded = {c.comp_id for c in comps}
    missing = [c for c in MLEBENCH_LITE if c not in loaded]
    if missing:
        print(f"[eval] MLE-bench-Lite: {len(missing)} of {len(MLEBENCH_LITE)} competitions are not prepared "
              f"under {root}; the table covers {len(comps)}. Not prepared: {', '.join(missing)}", flush=True)
    if not comps:
        raise FileNotFoundError(f"suite=lite: none of the {len(MLEBENCH_LITE)} MLE-bench-Lite competitions is "
                                f"prepared under env.data_dir={str(data_dir)!r}; run `mlebench prepare --lite`")
    return comps


def suite_competitions(cfg: Mapping[str, Any], suite: str) -> list[Any]:
    """The competitions of `suite` as the run saw them (`load_competitions`: env.kind, env.data_dir,
    train.competitions and eval.competitions cuts); `all` is training then held-out, each once;
    `lite` is MLE-bench-Lite (`lite_competitions`, no cuts)."""
    from ace.train.experiment import load_competitions

    if suite == "lite":
        return lite_competitions(cfg)
    train, held_out = load_competitions(cfg)
    if suite == "train":
        return train
    if suite == "held_out":
        return held_out
    seen, comps = set(), []
    for comp in (*train, *held_out):
        if comp.comp_id not in seen:
            seen.add(comp.comp_id)
            comps.append(comp)
    return comps


def evaluate_checkpoint(cfg: Mapping[str, Any], *, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """Restores `cfg["checkpoint"]` and evaluates it on `cfg["suite"]` with `cfg["seeds"]`.

    Args:
      cfg: the composed eval config as a plain dict (the main config plus checkpoint, step, suite, seeds).
      overrides: the command line's Hydra overrides. When given, the RUN_SETTINGS that they do not
        name come from the run directory's config.json (see `with_run_settings`); None uses `cfg` as is.
    Returns:
      {"metrics": {name: MeanSE}, "episodes": {seed: [Episode]}, "step": int, "table": str (the printed
      table), "reports": {seed: path of its grading report}, "out_dir": Path, "cfg": dict}.
    """
    from ace.env.sandboxes import sandbox_from_config
    from ace.eval import format_lite_table, format_table
    from ace.train.experiment import evaluate_policy

    run_dir, _, _ = locate_checkpoint(cfg["checkpoint"], cfg.get("step"))
    run_cfg_file = run_dir / "config.json"
    if overrides is not None and run_cfg_file.is_file():
        cfg, taken = with_run_settings(cfg, json.loads(run_cfg_file.read_text()), override_keys(overrides))
        print(f"[eval] from {run_cfg_file}: {', '.join(taken) or 'nothing'}", flush=True)
    suite = cfg["suite"]
    if suite not in SUITES:
        raise ValueError(f"suite={suite!r}, expected one of {SUITES}")
    seeds = cfg["seeds"] if cfg.get("seeds") is not None else cfg["eval"]["seeds"]
    if isinstance(seeds, int):
        seeds = [seeds]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds=[]: expected at least one seed, e.g. seeds=[0,1,2]")
    if cfg["rollout"]["kind"] != "jax_sampler":
        raise ValueError(f"rollout.kind={cfg['rollout']['kind']!r}: this command samples with the embedded JAX "
                         "sampler; drop the override or pass rollout=jax_sampler")
    comps = suite_competitions(cfg, suite)
    policy = load_policy(cfg["checkpoint"], step=cfg.get("step"))
    print(f"[eval] step {policy.step} of {policy.run_dir}: {len(comps)} {suite} competitions x {len(seeds)} "
          f"seeds {seeds}", flush=True)
    out_dir = policy.run_dir / "eval" / f"{suite}-step{policy.step}"
    submissions_dir = out_dir / "submissions"
    with sandbox_from_config(cfg["env"]) as sandbox:
        result = evaluate_policy(policy.params, policy.model_config, policy.tokenizer, comps, sandbox, seeds=seeds,
                                 cfg=cfg, prompt_cfg=policy.prompt_cfg, submissions_dir=submissions_dir)
    full, lite = format_table(result.metrics), format_lite_table(result.metrics)
    table = lite if suite == "lite" else full
    reports = write_reports(out_dir, comps, result.episodes, result.submission_paths, result.metrics,
                            tables={"table.txt": full, "lite_table.txt": lite})
    what = "MLE-bench-Lite" if suite == "lite" else suite
    print(f"\n{what} evaluation, {len(comps)} competitions (mean ± SE over "
          f"{'seeds' if len(seeds) > 1 else 'episodes'}):")
    print(table, flush=True)
    print(f"[eval] grading reports: {', '.join(str(p) for p in reports.values())}", flush=True)
    return {"metrics": result.metrics, "episodes": result.episodes, "step": policy.step, "table": table,
            "reports": reports, "out_dir": out_dir, "cfg": cfg}


def write_reports(out_dir: Path, comps: Sequence[Any], episodes: Mapping[int, Sequence[Any]],
                  submission_paths: Mapping[tuple[int, str], Path | None],
                  metrics: Mapping[str, Any], *, tables: Mapping[str, str]) -> dict[int, Path]:
    """MLE-bench's grading report per seed, `metrics.json` and the tables, under `out_dir`.

    Args:
      comps: the competitions, in the order of each seed's episodes.
      episodes: {seed: [Episode]} (`EvalResult.episodes`).
      submission_paths: {(seed, comp_id): the saved best submission, or None} (`EvalResult.submission_paths`).
      metrics: {name: MeanSE}; written as {name: {mean, se, n}} with null for nan.
      tables: {file name: text} written beside metrics.json.
    Returns:
      {seed: path of `<out_dir>/seed-<seed>/<timestamp>_grading_report.json`}.
    """
    from ace.env.reports import aggregate_reports, competition_report, write_grading_report, write_transcripts

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed, eps in episodes.items():
        if [ep.comp_id for ep in eps] != [c.comp_id for c in comps]:
            raise ValueError(f"seed {seed}: episodes are for {[ep.comp_id for ep in eps]}, expected the "
                             f"competitions {[c.comp_id for c in comps]} in that order")
        reports = [competition_report(comp, ep.final_grade, submission_paths.get((int(seed), comp.comp_id)))
                   for comp, ep in zip(comps, eps)]
        paths[int(seed)] = write_grading_report(aggregate_reports(reports), out_dir / f"seed-{seed}")
    write_transcripts(episodes, out_dir / "transcripts")
    finite = lambda x: float(x) if math.isfinite(x) else None  # noqa: E731
    (out_dir / "metrics.json").write_text(json.dumps(
        {k: {"mean": finite(v.mean), "se": finite(v.se), "n": int(v.n)} for k, v in metrics.items()}, indent=2))
    for name, text in tables.items():
        (out_dir / name).write_text(text + "\n")
    return paths


@hydra.main(version_base="1.3", config_path="../hydra_configs", config_name="eval_cli")
def main(cfg: DictConfig) -> None:
    # Hydra logs at INFO; orbax's per-restore absl lines would bury the table.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from hydra.core.hydra_config import HydraConfig

    evaluate_checkpoint(OmegaConf.to_container(cfg, resolve=True), overrides=HydraConfig.get().overrides.task)


if __name__ == "__main__":
    main()
