"""Which experts each domain uses: a routing collector for any Megatron-Core MoE model, and the
paper's specialisation statistics as pure functions of what it collects.

Collect, inside your own evaluation loop (any model with `TopKRouter`s; no plugin needed):

    from megatron_gbl.analysis import RoutingCollector

    with RoutingCollector(model, domains=["code", "math", "prose"]) as collector:
        for domain_index, tokens in heldout_batches:      # one domain per forward call
            collector.domain = domain_index
            model(tokens, position_ids, None)
    stats = collector.stats()                             # RoutingStats, sums only
    stats.selection_frequency()                           # [L, D, E], paper Fig. 1b

With data parallelism, all-reduce (sum) every tensor of `collector.stats()` over the
data-parallel group (`RoutingStats.all_reduce`) before computing statistics.

Shapes: L MoE layers (in layer order), D domains, E experts, K = router top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch


@dataclass
class RoutingStats:
    """Sums over every token the collector saw; merge runs or ranks by adding them.

    choices:          int64 [L, D, E]  tokens of domain d that chose expert e (top-K, so each
                                       token counts K times)
    tokens:           int64 [L, D]     tokens of domain d
    score_sums:       float64 [L, D, E] sum over tokens of the router score s(x, e), the full
                                       softmax (or normalised sigmoid) over all E experts
    topk_score_sums:  float64 [L, D]   sum over tokens of Σ_{e in top-K(x)} s(x, e)
    micro_lbl_sums:   float64 [L]      sum over forward calls of each call's LBL (eq. 2)
    calls:            int64 [L]        forward calls (micro-batches) per layer
    topk:             K
    """

    choices: torch.Tensor
    tokens: torch.Tensor
    score_sums: torch.Tensor
    topk_score_sums: torch.Tensor
    micro_lbl_sums: torch.Tensor
    calls: torch.Tensor
    topk: int

    @property
    def num_experts(self) -> int:
        return self.choices.shape[-1]

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if f.name != "topk"]

    def all_reduce(self, group=None) -> None:
        """Sum every tensor over `group` in place (e.g. the data-parallel group)."""
        import torch.distributed as dist

        for tensor in self.tensors():
            dist.all_reduce(tensor, group=group)

    def selection_frequency(self) -> torch.Tensor:
        return selection_frequency(self.choices, self.tokens)

    def micro_lbl(self) -> torch.Tensor:
        """[L]: mean over forward calls of the LBL of each call (eq. 3, N_P = calls)."""
        return self.micro_lbl_sums / self.calls.clamp(min=1)

    def global_lbl(self) -> torch.Tensor:
        """[L]: the LBL of all collected tokens together (eq. 4)."""
        return load_balancing_loss(self.choices.sum(1), self.score_sums.sum(1),
                                   self.tokens.sum(1), self.topk)

    def summary(self, high_factor: float = 2.0) -> dict:
        """Every statistic of this module, as nested lists (JSON-ready)."""
        frequency = self.selection_frequency()
        high = high_frequency_experts(frequency, self.topk, high_factor)
        return {
            "topk": self.topk,
            "num_experts": self.num_experts,
            "tokens_per_domain": self.tokens[0].tolist(),
            "selection_frequency": frequency.tolist(),
            "uniform_frequency": self.topk / self.num_experts,
            "mutual_information_bits": mutual_information(self.choices).tolist(),
            "top_expert_frequency": top_expert_frequency(frequency).tolist(),
            "topk_score_sum": (self.topk_score_sums / self.tokens.clamp(min=1)).tolist(),
            "uniform_topk_score_sum": self.topk / self.num_experts,
            "high_frequency_factor": high_factor,
            "high_frequency_experts": [[torch.nonzero(row).flatten().tolist() for row in layer]
                                       for layer in high],
            "high_frequency_overlap": expert_overlap(high).tolist(),
            "micro_lbl": self.micro_lbl().tolist(),
            "global_lbl": self.global_lbl().tolist(),
        }


def load_balancing_loss(counts_E: torch.Tensor, score_sums_E: torch.Tensor,
                        tokens: torch.Tensor, topk: int) -> torch.Tensor:
    """Paper eq. 2, LBL = N_E Σ_i f_i P_i, over the last axis, without the loss coefficient.

    counts_E [..., E]: expert choices c_i;  score_sums_E [..., E]: Σ_x s(x, i);  tokens [...]: T.
    f_i = c_i / (K T) (fraction of choices) and P_i = Σ_x s(x, i) / T (mean score), as in
    Megatron-Core's aux_loss; 1 when routing is perfectly uniform. Returns float64 [...].
    """
    num_experts = counts_E.shape[-1]
    total = tokens.double().clamp(min=1).unsqueeze(-1)
    f = counts_E.double() / (topk * total)
    p = score_sums_E.double() / total
    return num_experts * (f * p).sum(-1)


def selection_frequency(choices_LDE: torch.Tensor, tokens_LD: torch.Tensor) -> torch.Tensor:
    """Paper Fig. 1b: the fraction of domain d's tokens that chose expert e: [L, D, E].

    freq[l, d, e] = choices[l, d, e] / tokens[l, d]; each row sums to K, uniform is K / E.
    """
    return choices_LDE.double() / tokens_LD.double().clamp(min=1).unsqueeze(-1)


def mutual_information(choices_LDE: torch.Tensor) -> torch.Tensor:
    """I(domain; chosen expert) in bits per layer: [L].

    Over all expert choices of a layer, p(d, e) = choices[d, e] / Σ choices, and
    I = Σ_{d,e} p(d, e) log2(p(d, e) / (p(d) p(e))). 0 when every domain uses the experts in the
    same proportions (what micro-batch balance pushes towards); at most log2(min(D, E)).
    """
    joint = choices_LDE.double() / choices_LDE.sum(dim=(1, 2), keepdim=True).clamp(min=1)
    independent = joint.sum(2, keepdim=True) * joint.sum(1, keepdim=True)
    terms = torch.where(joint > 0, joint * torch.log2(joint / independent.clamp(min=1e-300)), 0.0)
    return terms.sum(dim=(1, 2))


def top_expert_frequency(frequency_LDE: torch.Tensor) -> torch.Tensor:
    """Selection frequency of each domain's most used expert: [L, D] (Fig. 1b's peaks)."""
    return frequency_LDE.amax(-1)


def high_frequency_experts(frequency_LDE: torch.Tensor, topk: int,
                           factor: float = 2.0) -> torch.Tensor:
    """Paper Fig. 4b's high-frequency experts: freq >= factor * K / E, bool [L, D, E]."""
    return frequency_LDE >= factor * topk / frequency_LDE.shape[-1]


def expert_overlap(high_LDE: torch.Tensor) -> torch.Tensor:
    """How much two domains share high-frequency experts (Fig. 4b): Jaccard |A ∩ B| / |A ∪ B|
    of their sets per layer, float64 [L, D, D]; NaN where neither has one."""
    high = high_LDE.double()
    shared = high @ high.transpose(1, 2)
    sizes = high.sum(-1)
    union = sizes.unsqueeze(-1) + sizes.unsqueeze(-2) - shared
    return torch.where(union > 0, shared / union.clamp(min=1), math.nan)


class RoutingCollector:
    """Forward hooks on every `TopKRouter` of `model` that sum routing statistics per domain.

    Set `collector.domain` (an index into `domains`) before each forward call; every token of
    that call counts for that domain, and each call is one micro-batch for `micro_lbl`. Counts
    follow the router's own routing map (what the dispatcher used); scores are the full softmax
    (or normalised sigmoid, per `moe_router_score_function`) of the router logits, recomputed
    from the router's input without gradient. Tokens marked by a `padding_mask` argument
    (True = padding) are skipped. Use as a context manager, or call `close()` to remove hooks.
    """

    def __init__(self, model: torch.nn.Module, domains: Sequence[str]):
        from megatron.core.transformer.moe.router import TopKRouter

        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        if not routers:
            raise ValueError("RoutingCollector: the model has no MoE layer (no TopKRouter)")
        self.domains = list(domains)
        self.domain: Optional[int] = None
        layers, experts = len(routers), routers[0].config.num_moe_experts
        num_domains = len(self.domains)
        self._stats = RoutingStats(
            choices=torch.zeros(layers, num_domains, experts, dtype=torch.long),
            tokens=torch.zeros(layers, num_domains, dtype=torch.long),
            score_sums=torch.zeros(layers, num_domains, experts, dtype=torch.float64),
            topk_score_sums=torch.zeros(layers, num_domains, dtype=torch.float64),
            micro_lbl_sums=torch.zeros(layers, dtype=torch.float64),
            calls=torch.zeros(layers, dtype=torch.long),
            topk=routers[0].topk,
        )
        self._handles = [router.register_forward_hook(self._hook(layer), with_kwargs=True)
                         for layer, router in enumerate(routers)]

    def _hook(self, layer: int):
        def record(router, args, kwargs, output):
            if self.domain is None:
                raise RuntimeError("RoutingCollector: set collector.domain before each forward")
            hidden = args[0] if args else kwargs["input"]
            padding = args[1] if len(args) > 1 else kwargs.get("padding_mask")
            with torch.no_grad():
                scores_TE = _router_scores(router, hidden)
                chosen_TE = output[1].reshape(scores_TE.shape).bool()
                if padding is not None:
                    valid_T = ~padding.reshape(-1).bool()
                    scores_TE, chosen_TE = scores_TE[valid_T], chosen_TE[valid_T]
                self.add(layer, self.domain, chosen_TE, scores_TE)
        return record

    def add(self, layer: int, domain: int, chosen_TE: torch.Tensor, scores_TE: torch.Tensor):
        """Count one router call: chosen_TE bool [T, E] routing map, scores_TE [T, E] scores."""
        stats = self._stats
        counts_E = chosen_TE.sum(0).long().cpu()
        score_sums_E = scores_TE.double().sum(0).cpu()
        stats.choices[layer, domain] += counts_E
        stats.tokens[layer, domain] += chosen_TE.shape[0]
        stats.score_sums[layer, domain] += score_sums_E
        stats.topk_score_sums[layer, domain] += \
            scores_TE.double().topk(stats.topk, dim=-1).values.sum().cpu()
        stats.micro_lbl_sums[layer] += load_balancing_loss(
            counts_E, score_sums_E, torch.tensor(chosen_TE.shape[0]), stats.topk)
        stats.calls[layer] += 1

    def stats(self) -> RoutingStats:
        return self._stats

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "RoutingCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _router_scores(router, hidden: torch.Tensor) -> torch.Tensor:
    """Scores over all experts for each token, [T, E] float32 (what Megatron's aux loss uses)."""
    logits = router.gating(hidden).reshape(-1, router.config.num_moe_experts).float()
    if getattr(router, "score_function", "softmax") == "sigmoid":
        scores = torch.sigmoid(logits)
        return scores / (scores.sum(-1, keepdim=True) + 1e-20)
    return torch.softmax(logits, dim=-1)
