"""Hydra entry point of ace. `python experiments/run.py` runs the tiny CPU experiment (SFT, held-out
evaluation, AceGRPO, evaluation again) and prints the before/after table; `+exp=ace30b` runs the same
pipeline on an HF policy, MLE-bench data and an SGLang pool (see README)."""
import logging
import os
import signal
import sys
from pathlib import Path

# Several fake CPU devices, as in the Makefile, unless the caller chose otherwise.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


@hydra.main(version_base="1.3", config_path="../hydra_configs", config_name="config")
def main(cfg: DictConfig) -> None:
    # A SIGTERM (a scheduler's preemption, `kill`) unwinds like Ctrl-C: the SGLang servers and router
    # this run launched are stopped by their context managers instead of outliving it.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    # Orbax logs every checkpoint file operation at INFO; the run's own lines are enough.
    logging.getLogger("absl").setLevel(logging.WARNING)
    if cfg.dry_run:
        from ace.train.dry_run import run_dry_run  # written with the ace30b experiment
        run_dry_run(OmegaConf.to_container(cfg, resolve=True))
        return
    from ace.train.experiment import run_experiment

    run_experiment(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
