"""pretrain(): build a real Megatron-Core GPT-MoE, train it, log like Megatron-LM's training_log."""

import json
import os

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import track_moe_metrics

from megatron.training.initialize import initialize_megatron

VOCAB = 64


def pretrain():
    args = initialize_megatron()
    from megatron_gbl_lab import harness

    config = harness.moe_config(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=args.moe_router_bias_update_rate)
    model = harness.build_gpt_moe(config, VOCAB, args.seq_length)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    num_microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    init_num_microbatches_calculator(0, None, args.global_batch_size, args.micro_batch_size,
                                     args.data_parallel_size)
    writer = None
    if args.tensorboard_dir and torch.distributed.get_rank() == args.world_size - 1:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=args.tensorboard_dir)
    dp_rank = parallel_state.get_data_parallel_rank()
    position_ids = torch.arange(args.seq_length).unsqueeze(0).expand(args.micro_batch_size, -1)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        output = model(tokens, position_ids, None, labels=tokens)
        return output, lambda output_tensor: (output_tensor.float().mean(), {})

    for iteration in range(1, args.train_iters + 1):
        args.curr_iteration = iteration - 1  # as Megatron-LM's train() sets it, 0-based
        gen = torch.Generator().manual_seed(1000 * iteration + dp_rank)
        batches = [torch.randint(0, VOCAB, (args.micro_batch_size, args.seq_length), generator=gen)
                   for _ in range(num_microbatches)]
        model.zero_grad(set_to_none=True)
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=num_microbatches, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False)
        for param in model.parameters():
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.AVG,
                                             group=parallel_state.get_data_parallel_group())
        optimizer.step()
        training_log(args, iteration, writer, num_microbatches)
    if writer is not None:
        writer.close()
    if args.tensorboard_dir:
        with open(os.path.join(args.tensorboard_dir, f"rank{torch.distributed.get_rank()}.json"),
                  "w") as f:
            json.dump({"dp": args.data_parallel_size, "microbatches": num_microbatches}, f)
    # Every rank leaves together: gloo aborts a process whose peer exits mid-collective.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def training_log(args, iteration, writer, num_microbatches):
    """The MoE part of Megatron-LM's training_log: every rank, every iteration."""
    if args.num_experts is None:
        return
    lbl_types = args.moe_router_load_balancing_type
    track_names = []
    if "aux_loss" in lbl_types:
        track_names.append("load_balancing_loss")
    if "seq_aux_loss" in lbl_types:
        track_names.append("seq_load_balancing_loss")
    if "global_aux_loss" in lbl_types:
        track_names.append("global_load_balancing_loss")
    track_moe_metrics(
        loss_scale=1 / num_microbatches, iteration=iteration, writer=writer,
        total_loss_dict={}, per_layer_logging=True, force_initialize=True,
        track_names=track_names, num_layers=args.num_layers)
