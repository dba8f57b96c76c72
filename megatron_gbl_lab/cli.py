"""`megatron-gbl demo` and `megatron-gbl analyze` (console script megatron_gbl_lab.cli:main).

Every argument is checked, and every data file read, before torch or Megatron-Core is imported
(so help and argument errors answer at once) and before a process starts; a bad one ends the
command with exit status 2 and a one-line message that names the flag and the fix.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Optional, Sequence

from megatron_gbl_lab import corpus
from megatron_gbl_lab.runs import (
    DEFAULT_PRESET, PRESETS, DemoSettings, check_settings, checkpoint_path, describe_preset,
    parse_scopes, parse_seeds, preset_settings,
)

BUILTIN_DOMAINS = 4
BUILTIN_TRAIN_DOCS = 1000   # per domain, about 250 KB of text each
BUILTIN_VALID_DOCS = 100
BUILTIN_CORPUS_SEED = 0     # fixed: --seed changes initial weights and data order, not the text


def main(argv: Optional[Sequence[str]] = None) -> int:
    import megatron_gbl_lab.quiet  # noqa: F401 - before torch and Megatron-Core are imported

    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except ValueError as error:
        args.subparser.error(str(error))


class _Parser(argparse.ArgumentParser):
    """Errors as one line naming the flag and the fix, without the usage block above it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    defaults = DemoSettings()
    tiny = PRESETS[DEFAULT_PRESET]

    def preset_default(value) -> str:
        """The default of a preset's setting in --help, with the default preset's value."""
        return f"(default: the preset's; {DEFAULT_PRESET}: {value})"
    parser = _Parser(
        prog="megatron-gbl",
        description="Global-batch load balancing for Megatron-Core MoE (Qiu et al. 2025).")
    commands = parser.add_subparsers(required=True, metavar="{demo,compare,analyze}",
                                     parser_class=_Parser)

    demo = commands.add_parser(
        "demo", help="train a tiny GPT-MoE per load-balancing scope on CPU and compare them",
        description="Train a tiny Megatron-Core GPT-MoE on CPU (gloo data-parallel ranks, "
                    "gradient accumulation) once per scope, from the same initial weights and "
                    "data order, with single-domain micro-batches; print held-out loss and "
                    "expert specialisation per scope.")
    demo.add_argument("--scopes", default="micro,global",
                      help="comma-separated runs: LBL scopes micro, seq, dp, global, shuffle, "
                           "dp:N, global:N (N ranks per balance block); auxfree-micro, "
                           "auxfree-dp, auxfree-global (and :N): auxiliary-loss-free balancing "
                           "(expert bias, no LBL) at that scope; qb-micro, qb-dp, qb-global (and "
                           ":N): quantile balancing at that scope (Megatron-Core >= 0.19); "
                           "dp/global(:N)+micro or "
                           "+micro=R: plus a micro-batch LBL at R (default 0.01) times the LBL "
                           "weight; A-then-B@S: A for the first S steps, then B, e.g. "
                           "micro-then-global@250 (default: %(default)s)")
    demo.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                      help="named settings, each overridden by any flag given: "
                           + "; ".join(describe_preset(name) for name in PRESETS)
                           + " (default: %(default)s)")
    demo.add_argument("--steps", type=int, help=preset_default(tiny.steps))
    demo.add_argument("--ranks", type=int,
                      help="data-parallel gloo processes, at least 4 " + preset_default(tiny.ranks))
    seeds = demo.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=defaults.seed,
                       help="initial weights and data order (default: %(default)s)")
    seeds.add_argument("--seeds",
                       help="comma-separated seeds: every run at every seed, summarised as mean "
                            "± sd and paired differences against the first run with 95%% "
                            "intervals, e.g. 0,1,2,3,4")
    demo.add_argument("--resume", action="store_true",
                      help="with --seeds: take the seeds already trained in --out (each seed's "
                           "runs.json, written as soon as its runs end) instead of training "
                           "them again; they must have the same settings, runs and corpus")
    demo.add_argument("--microbatches", type=int,
                      help="micro-batches per rank per step " + preset_default(tiny.microbatches))
    demo.add_argument("--micro-batch-size", type=int,
                      help="sequences per micro-batch " + preset_default(tiny.micro_batch_size))
    demo.add_argument("--seq-length", type=int,
                      help="bytes per sequence " + preset_default(tiny.seq_length))
    demo.add_argument("--eval-sequences", type=int,
                      help="held-out sequences per domain " + preset_default(tiny.eval_sequences))
    demo.add_argument("--lr", type=float,
                      help="peak learning rate of Adam: linear warm-up over 5%% of the steps, "
                           "then cosine decay to 10%% " + preset_default(f"{tiny.lr:g}"))
    demo.add_argument("--device-groups", type=int,
                      help="expert-parallel devices to simulate for the device-level LBL "
                           "(+device runs) and the micro-batch device load violation: the "
                           "experts in that many groups, the tokens of that many consecutive "
                           "ranks in one all-to-all " + preset_default(tiny.device_groups))
    demo.add_argument("--eval-checkpoints", type=int,
                      help="held-out loss: the mean over this many last checkpoints, 5%% of "
                           "training apart " + preset_default(tiny.eval_checkpoints))
    demo.add_argument("--train-data", help="JSONL with a text and a domain field per line "
                                           "(default: the built-in synthetic corpus)")
    demo.add_argument("--valid-data", help="held-out JSONL, same domains as --train-data")
    demo.add_argument("--domain-key", default="domain",
                      help="name of the domain field in the JSONL (default: %(default)s)")
    demo.add_argument("--out", default=os.path.join("out", "demo"),
                      help="output directory (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(command=_demo, subparser=demo)

    compare = commands.add_parser(
        "compare", help="a demo's results over seeds, paired against another of its runs",
        description="Print the summary over seeds of a results.json written by `megatron-gbl "
                    "demo --seeds`, with the paired differences against the run --against "
                    "instead of the first run of --scopes.")
    compare.add_argument("results", help="results.json of a `megatron-gbl demo --seeds` run")
    compare.add_argument("--against", required=True, help="the run to pair every other run with")
    compare.set_defaults(command=_compare, subparser=compare)

    analyze = commands.add_parser(
        "analyze", help="expert selection per domain of a model saved by the demo",
        description="Per-layer, per-domain expert selection frequencies (paper Fig. 1b), top-K "
                    "score sums (Fig. 4a) and high-frequency expert overlap (Fig. 4b) of a "
                    "saved demo model on domain-labelled JSONL.")
    analyze.add_argument("--model", required=True,
                         help="a scope directory written by the demo, e.g. out/demo/global")
    analyze.add_argument("--data", required=True, help="JSONL with a text and a domain field")
    analyze.add_argument("--domain-key", default="domain",
                         help="name of the domain field (default: %(default)s)")
    analyze.add_argument("--max-sequences", type=int, default=defaults.eval_sequences,
                         help="sequences per domain (default: %(default)s)")
    analyze.add_argument("--micro-batch-size", type=int,
                         help="sequences per forward call (default: the model's training value)")
    analyze.add_argument("--out", help="output directory (default: MODEL/analysis)")
    analyze.set_defaults(command=_analyze, subparser=analyze)
    return parser


def demo_settings(args) -> tuple[DemoSettings, list[int]]:
    """The settings of `megatron-gbl demo ARGS`: the preset's, with every flag given in its
    place, and the seeds."""
    seeds = [args.seed] if args.seeds is None else parse_seeds(args.seeds)
    if args.resume and len(seeds) < 2:
        raise ValueError("--resume continues a run over several seeds from the seeds already in "
                         "--out; give --seeds with at least two seeds, e.g. --seeds 0,1,2,3")
    settings = preset_settings(
        args.preset, steps=args.steps, ranks=args.ranks, seed=seeds[0],
        microbatches=args.microbatches, micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length, eval_sequences=args.eval_sequences,
        eval_checkpoints=args.eval_checkpoints, device_groups=args.device_groups, lr=args.lr)
    check_settings(settings)
    return settings, seeds


def require_lab_packages(*names: str) -> None:
    """The lab's own dependencies (the [demo] extra, which a plain `pip install megatron-gbl`
    leaves out) checked before any work, instead of a traceback inside a forked rank."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"{' and '.join(missing)} not installed (the lab's extra): "
                         'pip install "megatron-gbl[demo]"')


def _demo(args) -> int:
    require_lab_packages("tqdm", "matplotlib")
    settings, seeds = demo_settings(args)
    scopes = parse_scopes(args.scopes, settings)
    if (args.train_data is None) != (args.valid_data is None):
        raise ValueError("--train-data and --valid-data go together; pass both, or neither for "
                         "the built-in corpus")
    if args.train_data is None:
        train = corpus.synthetic_records(BUILTIN_DOMAINS, BUILTIN_TRAIN_DOCS, BUILTIN_CORPUS_SEED,
                                         "train")
        valid = corpus.synthetic_records(BUILTIN_DOMAINS, BUILTIN_VALID_DOCS, BUILTIN_CORPUS_SEED,
                                         "valid")
    else:
        train = corpus.read_jsonl(args.train_data, args.domain_key, "--train-data")
        valid = corpus.read_jsonl(args.valid_data, args.domain_key, "--valid-data")
    domains = corpus.check_corpus(train, valid, settings.seq_length + 1)
    if args.train_data is None:
        os.makedirs(args.out, exist_ok=True)
        # Written out so that `analyze` (and a re-run with --train-data) can use the same text.
        corpus.write_jsonl(os.path.join(args.out, "train.jsonl"), train)
        corpus.write_jsonl(os.path.join(args.out, "valid.jsonl"), valid)
    print(f"megatron-gbl demo: {len(scopes)} run(s) x {len(seeds)} seed(s) x {settings.steps} "
          f"steps, {settings.ranks} "
          f"gloo ranks x {settings.microbatches} micro-batches x {settings.micro_batch_size} "
          f"sequences of {settings.seq_length} bytes, {settings.num_layers} layers of "
          f"{settings.num_experts} experts, domains: {', '.join(domains)}", file=sys.stderr)
    from megatron_gbl_lab import batches, demo, report

    data = batches.build_corpus(train, valid, domains)
    results = demo.run_demo(settings, scopes, seeds, data, args.out,
                            progress=not args.no_progress, resume=args.resume)
    print(report.format_table(results))
    models = [run["model_dir"] for per_seed in results["per_seed"].values()
              for run in per_seed["scopes"].values()]
    print(f"\n{results['wall_seconds']:.0f} s. Results: {os.path.join(args.out, 'results.json')}; "
          f"figures: {', '.join(results['files'].values())}; models: "
          f"{', '.join(models) if len(models) <= 8 else os.path.join(args.out, 'seed*', '*')}")
    return 0


def _compare(args) -> int:
    from megatron_gbl_lab import report

    try:
        with open(args.results) as f:
            results = json.load(f)
        seeds, per_seed = results["seeds"], results["per_seed"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{args.results}: not a results.json of `megatron-gbl demo` ({error}); "
                         "pass OUT/results.json of a `megatron-gbl demo --seeds` run") from None
    if len(seeds) < 2:
        raise ValueError(f"{args.results}: one seed ({seeds[0]}), nothing to pair; run the demo "
                         "with --seeds")
    results.update(report.summarize(per_seed, seeds, baseline=args.against))
    print(report.format_seeds_table(results))
    return 0


def _analyze(args) -> int:
    require_lab_packages("matplotlib")
    if args.max_sequences < 1:
        raise ValueError(f"--max-sequences {args.max_sequences}: must be at least 1")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size}: must be at least 1")
    checkpoint_path(args.model)  # a wrong --model fails before the data is read
    records = corpus.read_jsonl(args.data, args.domain_key, "--data")
    out = args.out or os.path.join(args.model, "analysis")
    from megatron_gbl_lab import demo

    result = demo.analyze_model(args.model, records, out, args.max_sequences,
                                args.micro_batch_size)
    routing = result["routing"]
    print(f"{args.model} ({result['scope']}) on {args.data}, uniform frequency "
          f"{routing['uniform_frequency']:.3g}, uniform top-K score sum "
          f"{routing['uniform_topk_score_sum']:.3g}")
    for layer, mi in enumerate(routing["mutual_information_bits"]):
        tops = ", ".join(f"{domain} {routing['top_expert_frequency'][layer][d]:.2f}"
                         for d, domain in enumerate(result["domains"]))
        print(f"layer {layer + 1}: MI(domain; expert) {mi:.3f} bits; top-expert frequency {tops}; "
              f"LBL micro {routing['micro_lbl'][layer]:.3f}, "
              f"global {routing['global_lbl'][layer]:.3f}")
    print(f"Written: {os.path.join(out, 'analysis.json')}, {', '.join(result['files'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
