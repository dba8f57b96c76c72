"""The paper's ablations as options: Shuffle LBL (Tab. 2) and the scope switch (Tab. 3).

Mixed weights (Tab. 5) are `micro_coeff`, tested in test_router_dist.py.
"""

import torch

import reference
import workers
from megatron_gbl_lab.harness import run_gloo
from megatron_gbl.lbl import draw_shuffled_counts

TOPK, COEFF, HIDDEN = 2, 1e-2, 32
TOKENS = workers.SEQ * workers.MICRO_BSZ  # per rank and micro-batch


def test_shuffle_draw_is_uniform_without_replacement_and_skips_padding():
    choices_NK = torch.tensor([[0, 1], [2, 3], [-1, -1], [4, 5], [6, 7], [-1, -1], [0, 7]])
    valid = choices_NK[:, 0] >= 0
    generator = torch.Generator().manual_seed(0)
    drawn_total = torch.zeros(7)
    draws = 3000
    for _ in range(draws):
        counts_E, drawn_N = draw_shuffled_counts(choices_NK, torch.tensor(3), 8, generator)
        assert int(drawn_N.sum()) == 3 and not drawn_N[~valid].any()
        assert torch.equal(counts_E, torch.bincount(choices_NK[drawn_N].reshape(-1), minlength=8))
        drawn_total += drawn_N
    # Each of the 5 valid rows is drawn with probability 3/5.
    frequency = drawn_total[valid] / draws
    assert torch.all((frequency - 0.6).abs() < 0.04), frequency


def test_shuffle_lbl_draws_micro_batch_many_tokens_from_all_ranks():
    world_size, microbatches = 4, 2
    results = run_gloo(workers.router_runs, world_size,
                       [dict(scope="shuffle", lbl_type="aux_loss", coeff=COEFF, seed=70,
                             microbatches=microbatches, steps=1, padded=False)])
    hidden, _ = workers.make_hidden(70, microbatches, world_size, HIDDEN, padded=False)
    weight = results[0][0]["weight"]
    sources = torch.zeros(world_size)
    for rank, (result,) in enumerate(results):
        draws = result["draws"]
        assert len(draws) == microbatches  # one draw per micro-batch, however often it is used
        for draw in draws:
            # Same token count as the micro-batch, from the gathered micro-batch of all ranks.
            assert draw["sample_size"] == TOKENS == int(draw["drawn"].sum())
            assert draw["drawn"].shape == (world_size * TOKENS,)
            assert int(draw["counts"].sum()) == TOPK * TOKENS
            sources += draw["drawn"].reshape(world_size, TOKENS).sum(1)
        assert result["seen"][-1]["balance"].tokens == TOKENS
    assert torch.all(sources > 0), f"tokens drawn per source rank: {sources}"
    assert not torch.equal(results[0][0]["draws"][0]["drawn"], results[1][0]["draws"][0]["drawn"])

    # The gradient: eq. 3's mean over ranks and micro-batches of N_E Σ_i f_i P_i^r with f_i
    # from the drawn tokens' plain top-k choices, recomputed here from the data.
    def loss(weight_EH):
        per_call = []
        for k, ranks in enumerate(hidden):
            everyone = torch.cat([h.reshape(-1, HIDDEN) for h in ranks])
            for rank in range(world_size):
                drawn = results[rank][0]["draws"][k]["drawn"]
                _, chosen = reference._route(everyone[drawn], weight_EH, TOPK)
                f_E = chosen.sum(0) / (TOPK * TOKENS)
                probs, _ = reference._route(ranks[rank].reshape(-1, HIDDEN), weight_EH, TOPK)
                per_call.append(weight_EH.shape[0] * (f_E * probs.mean(0)).sum())
        return COEFF * torch.stack(per_call).mean()

    expected = reference.grad_of(loss, weight)
    err = float((results[0][0]["grad"].double() - expected).norm() / expected.norm())
    assert err <= 1e-5, f"shuffle LBL gradient rel. err {err:.2e}"


def test_scope_switch_happens_exactly_at_the_iteration():
    world_size, microbatches, steps, switch = 2, 2, 4, 2
    result = run_gloo(workers.router_runs, world_size,
                      [dict(scope="micro", switch_scope="global", switch_iteration=switch,
                            lbl_type="aux_loss", coeff=COEFF, seed=80,
                            microbatches=microbatches, steps=steps, padded=False)])[0][0]
    tokens = [call["balance"].tokens for call in result["seen"]]
    micro = [TOKENS] * microbatches
    global_prefix = [world_size * TOKENS * (k + 1) for k in range(microbatches)]
    assert tokens == micro * switch + global_prefix * (steps - switch)
    # The last step (global) has the gradient of the global-batch LBL of its own data.
    hidden, _ = workers.make_hidden(80 + steps - 1, microbatches, world_size, HIDDEN, False)
    expected = reference.grad_of(
        lambda w: reference.global_batch_lbl(w, hidden, None, TOPK, COEFF, True)[0],
        result["weight"])
    err = float((result["grad"].double() - expected).norm() / expected.norm())
    assert err <= 1e-5
