"""An entry script in the shape of Megatron-LM's pretrain_gpt.py, for the tests.

It drives the INSTALLED `megatron.training` (megatron-core wheels ship it; 0.17 and 0.18 need
pyyaml besides) the way Megatron-LM's own script of that release does:

- 0.19: arguments parsed and validated by `parse_and_validate_args` (where `megatron_gbl.launch`
  adds and checks the --moe-lbl-* flags), the GPT model config and the config container derived
  from them, `pretrain(container, datasets, model_type, forward_step)`;
- 0.18: the same without a model config: `pretrain` gets a model provider besides;
- 0.17: `pretrain(datasets, model_provider, model_type, forward_step)` parses and validates
  itself (in `initialize_megatron`).

Written for the tests: mock data only (--mock-data, NullTokenizer), no tensor parallelism.
"""

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import (
    GPTDatasetConfig,
    MockGPTDataset,
    MockGPTLowLevelDataset,
)
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.training import argument_utils, arguments, get_args, get_tokenizer, pretrain

STAGE_INPUTS = ("tokens", "position_ids", "attention_mask")  # what the first stage embeds
STAGE_TARGETS = ("labels", "loss_mask")  # what the last stage scores


class FewMockDocuments(MockGPTLowLevelDataset):
    """Megatron's mock documents (token ramps, each ending in EOD), 1000 of up to 64 tokens
    instead of 100000 of up to 4096: the sample index of a few tiny steps then takes
    milliseconds to build, not seconds per rank."""

    size = 1000
    max_sequence_length = 64


class FewMockGPTDataset(MockGPTDataset):
    @staticmethod
    def build_low_level_dataset(dataset_path, config):
        return FewMockDocuments(config.tokenizer)


def gpt_moe_model(pre_process=True, post_process=True, vp_stage=None, config=None,
                  pg_collection=None):
    """The model provider for 0.17 and 0.18: this stage's GPT of local layers, MoE where
    --moe-layer-freq says."""
    args = get_args()
    config = config or arguments.core_transformer_config_from_args(args)
    layers = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                        normalization=args.normalization, vp_stage=vp_stage)
    return GPTModel(
        config, layers, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
        post_process=post_process, position_embedding_type=args.position_embedding_type,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        vp_stage=vp_stage, pg_collection=pg_collection)


def masked_token_loss(loss_mask, output_tensor):
    """Sum of the per-token losses where loss_mask is 1, with the token count (the
    per-token-loss contract of Megatron-LM's training loop)."""
    loss_mask = loss_mask.view(-1).float()
    loss = (output_tensor.view(-1).float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    batch = next(data_iterator) if first or last else {}
    inputs = {name: batch.get(name) if first else None for name in STAGE_INPUTS}
    targets = {name: batch.get(name) if last else None for name in STAGE_TARGETS}
    output_tensor = model(inputs["tokens"], inputs["position_ids"], inputs["attention_mask"],
                          labels=targets["labels"])
    return output_tensor, partial(masked_token_loss, targets["loss_mask"])


def mock_datasets_provider(num_samples):
    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, split=args.split,
        tokenizer=get_tokenizer(), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=args.create_attention_mask_in_dataloader)
    # Only the stages that read the batch build the datasets (the others get None).
    built_here = lambda: parallel_state.is_pipeline_first_stage() or \
        parallel_state.is_pipeline_last_stage()  # noqa: E731
    return BlendedMegatronDatasetBuilder(FewMockGPTDataset, num_samples, built_here,
                                         config).build()


if __name__ == "__main__":
    mock_datasets_provider.is_distributed = True  # every rank calls it (core datasets)
    gpt = ModelType.encoder_or_decoder
    if not hasattr(arguments, "parse_and_validate_args"):  # 0.17
        pretrain(mock_datasets_provider, gpt_moe_model, gpt, forward_step)
    else:
        args = arguments.parse_and_validate_args()
        if hasattr(argument_utils, "gpt_config_from_args"):  # 0.19
            container = argument_utils.pretrain_cfg_container_from_args(
                args, argument_utils.gpt_config_from_args(args))
            pretrain(container, mock_datasets_provider, gpt, forward_step)
        else:  # 0.18
            container = argument_utils.pretrain_cfg_container_from_args(args)
            pretrain(container, mock_datasets_provider, gpt_moe_model, gpt, forward_step)
