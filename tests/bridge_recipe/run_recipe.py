"""A recipe script in the shape of Megatron-Bridge's scripts/training/run_recipe.py (which is
not in the wheel), for the tests: a recipe of `megatron.bridge.recipes` by name, the trailing
KEY=VALUE overrides applied by Bridge's own override processing, then Bridge's `pretrain` or
`finetune` with its GPT step. Both entry points are bound when the script is imported.

    python run_recipe.py --recipe olmoe_7b_pretrain_config [--mode finetune] KEY=VALUE ...
"""

import argparse

from megatron.bridge import recipes
from megatron.bridge.training.finetune import finetune
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--recipe", required=True, help="a recipe function of megatron.bridge.recipes")
    parser.add_argument("--mode", choices=("pretrain", "finetune"), default="pretrain")
    args, overrides = parser.parse_known_args()
    if any(not override.partition("=")[1] for override in overrides):
        parser.error(f"expected KEY=VALUE overrides, got {overrides}")
    config = process_config_with_overrides(getattr(recipes, args.recipe)(), cli_overrides=overrides)
    train = pretrain if args.mode == "pretrain" else finetune
    train(config, forward_step)


if __name__ == "__main__":
    main()
