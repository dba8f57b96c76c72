"""The pure loss function (megatron_gbl.loss) against hand-computed values."""

import torch

from megatron_gbl.loss import load_balancing_loss, load_balancing_weights


def test_hand_computed_value():
    # 2 tokens, 3 experts, top-1: token 0 -> expert 0, token 1 -> expert 2.
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    counts = torch.tensor([1, 0, 1])
    loss = load_balancing_loss(probs.sum(0), counts, torch.tensor(2), torch.tensor(2), 1, 3, 0.5)
    # f = [1/2, 0, 1/2], P = [0.4, 0.25, 0.35]: 0.5 * 3 * (0.2 + 0 + 0.175) = 0.5625
    assert loss.item() == torch.tensor(0.5625).item()


def test_uniform_routing_gives_the_coefficient():
    tokens, experts, topk = 64, 8, 2
    probs = torch.full((tokens, experts), 1 / experts)
    counts = torch.full((experts,), tokens * topk // experts)
    loss = load_balancing_loss(probs.sum(0), counts, torch.tensor(tokens), torch.tensor(tokens),
                               topk, experts, 1e-2)
    torch.testing.assert_close(loss, torch.tensor(1e-2))


def test_f_and_p_may_come_from_different_token_sets():
    # Eq. 6: global f (buffered counts over 1000 tokens), local P (mean over 4 tokens).
    probs = torch.rand(4, 5).softmax(-1)
    counts = torch.tensor([400, 300, 200, 100, 0])
    loss = load_balancing_loss(probs.sum(0), counts, torch.tensor(500), torch.tensor(4), 2, 5, 1.0)
    expected = 5 * ((counts / 1000.0) * probs.mean(0)).sum()
    torch.testing.assert_close(loss, expected)


def test_counts_beyond_float32_integers_stay_exact():
    # 2^24 + 1 is not a float32 number; the ratio must still see the +1.
    big = 2**24 + 1
    counts = torch.tensor([big, 2**25 - big], dtype=torch.int64)
    probs_sum = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loss = load_balancing_loss(probs_sum, counts, torch.tensor(2**24), torch.tensor(1), 2, 2, 1.0)
    assert loss.item() == 2 * big / 2**25


def test_empty_token_set_gives_zero_not_nan():
    zeros = torch.zeros(4)
    loss = load_balancing_loss(zeros, torch.zeros(4, dtype=torch.int64), torch.tensor(0),
                               torch.tensor(0.0), 2, 4, 1.0)
    assert loss.item() == 0.0


def test_nonzero_token_counts_skip_only_the_empty_set_guard():
    # The shortcut for T_f, T_p >= 1 (no padding) gives the guarded weights bit for bit.
    counts = torch.tensor([[7, 0, 5], [3, 3, 6]])
    num_tokens_for_f, num_tokens_for_p = torch.tensor([[6], [4]]), torch.tensor([[1], [4]])
    guarded = load_balancing_weights(counts, num_tokens_for_f, num_tokens_for_p, 2, 3, 1e-2)
    shortcut = load_balancing_weights(counts, num_tokens_for_f, num_tokens_for_p, 2, 3, 1e-2,
                                      tokens_nonzero=True)
    assert guarded.dtype == shortcut.dtype == torch.float64
    assert torch.equal(guarded, shortcut)
    # 1e-2 * 3 experts / (2 choices * T_f * T_p): row 0 divides by 12, row 1 by 32.
    expected = counts.double() * 1e-2 * 3 / (2 * torch.tensor([[6.0], [16.0]], dtype=torch.float64))
    torch.testing.assert_close(shortcut, expected, rtol=1e-15, atol=0)
