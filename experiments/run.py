"""Hydra entry point of ace. `python experiments/run.py` runs the tiny CPU experiment."""
import sys

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path="../hydra_configs", config_name="config")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=False))
    print("The AceGRPO trainer is not implemented yet: this run only composed the config.", file=sys.stderr)


if __name__ == "__main__":
    main()
