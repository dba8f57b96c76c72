"""Corpora of real text, from what every megatron-gbl demo environment has installed: Python's
standard library and the torch, Megatron-Core and matplotlib packages. Nothing is downloaded.

    python -m megatron_gbl_lab.text_corpus out/text [--domains source|genres]
    megatron-gbl demo --train-data out/text/train.jsonl --valid-data out/text/valid.jsonl

`--domains source` (the default): four domains of source text, three of them code.

| domain  | text                                                      |
|---------|-----------------------------------------------------------|
| python  | Megatron-Core's Python source (megatron/core/**/*.py)     |
| cpp     | torch's C++ headers (torch/include/**/*.h)                |
| cuda    | torch's CUDA headers (torch/include/**/*.cuh)             |
| english | the license texts shipped with torch (its dist-info)      |

Their bytes are much alike (C++ and CUDA headers above all): what a single byte tells about its
domain, I(domain; byte), is 0.12 bits of at most 2 (the built-in synthetic corpus: 1.10).

`--domains genres`: five domains that differ in kind, as a pre-training mix does.

| domain  | text                                                                          |
|---------|-------------------------------------------------------------------------------|
| english | prose: Python's language reference (pydoc_data.topics) and torch's licenses   |
| python  | code: Megatron-Core's Python source                                           |
| cpp     | code: torch's C++ headers                                                     |
| numbers | tables of numbers: matplotlib's Adobe font metrics (mpl-data/fonts/**/*.afm)  |
| markup  | YAML: torchgen's operator and derivative declarations (torchgen/packaged)     |

Each source (a file; a topic of the language reference) is cut into documents of about
DOC_BYTES at line breaks. With `source` a whole source goes to the held-out split when a hash of
its name says so (about 1 in 10); with `genres` each document does (a hash of its source's name
and its position: the YAML comes in two large files), and a document already taken is not
taken again (licenses and font files repeat text), so no text is in both splits. Sources are
taken in hash order until a domain has TRAIN_BYTES (VALID_BYTES), so every domain draws on many
of them. sources.json records the domain set, the package versions and each output's sha256:
the same packages give the same corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from megatron_gbl_lab import corpus

DOC_BYTES = 2048
TRAIN_BYTES = 400_000  # per domain, like the built-in corpus (1000 documents of ~250 bytes)
VALID_BYTES = 60_000
VALID_ONE_IN = 10
DOMAIN_SETS = ("source", "genres")
PACKAGES = {"source": ("torch", "megatron-core"),
            "genres": ("torch", "megatron-core", "matplotlib")}


@dataclass(frozen=True)
class Source:
    """A text the corpus draws documents from: `name`, the same in every environment (a path
    from the package's directory on, e.g. torch/include/..., megatron/core/...), orders and
    splits the sources; `read` returns its text."""

    name: str
    read: Callable[[], str]


def domain_sources(domain_set: str = "source") -> dict[str, list[Source]]:
    """Every source of each domain of `domain_set`."""
    import megatron.core
    import torch

    megatron_core = Path(megatron.core.__file__).parent
    include = Path(torch.__file__).parent / "include"
    licenses = [Path(str(file.locate())) for file in metadata.distribution("torch").files
                if "license" in str(file).lower()]
    licenses = sorted(path for path in licenses if path.is_file())
    if domain_set == "source":
        return {"python": _files(megatron_core.rglob("*.py")),
                "cpp": _files(include.rglob("*.h")),
                "cuda": _files(include.rglob("*.cuh")),
                "english": _files(licenses)}
    if domain_set == "genres":
        import matplotlib
        import torchgen
        from pydoc_data.topics import topics

        reference = [Source(f"pydoc_data/topics.py#{key}", lambda text=text: text)
                     for key, text in sorted(topics.items())]
        fonts = Path(matplotlib.get_data_path()) / "fonts"
        return {"english": reference + _files(licenses),
                "python": _files(megatron_core.rglob("*.py")),
                "cpp": _files(include.rglob("*.h")),
                "numbers": _files(fonts.rglob("*.afm")),
                "markup": _files((Path(torchgen.__file__).parent / "packaged").rglob("*.yaml"))}
    raise ValueError(f"--domains {domain_set!r}: unknown; use one of {', '.join(DOMAIN_SETS)}")


def _files(paths) -> list[Source]:
    """Files as sources, named by their path from the package's directory on (torch/...,
    megatron/..., torch-2.13.0.dist-info/..., matplotlib/...)."""
    sources = []
    for path in sorted(paths):
        parts = path.parts
        start = next(i for i, part in enumerate(parts)
                     if part.startswith(("torch", "megatron", "matplotlib")))
        sources.append(Source("/".join(parts[start:]),
                              lambda path=path: path.read_text(encoding="utf-8")))
    return sources


def documents(text: str) -> list[str]:
    """`text` cut at line breaks into pieces of about DOC_BYTES (blank ones dropped)."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line.encode("utf-8"))
        if size >= DOC_BYTES:
            pieces.append("".join(current))
            current, size = [], 0
    pieces.append("".join(current))
    return [piece for piece in pieces if piece.strip()]


def _rank(name: str) -> bytes:
    """A pseudo-random order of sources (and documents), the same in every environment."""
    return hashlib.sha256(name.encode()).digest()


def _held_out(source: Source, index: int, domain_set: str) -> bool:
    """Whether document `index` of `source` goes to the held-out split (1 in VALID_ONE_IN):
    by source (`source`) or by document (`genres`)."""
    name = f"{source.name}#{index}" if domain_set == "genres" else source.name
    return _rank(name)[0] % VALID_ONE_IN == 0


def build(out_dir: str, domain_set: str = "source") -> dict:
    """Write train.jsonl, valid.jsonl and sources.json into `out_dir`; return sources.json."""
    targets = {"train": TRAIN_BYTES, "valid": VALID_BYTES}
    splits = {split: [] for split in targets}
    counts = {}
    seen = set()  # genres: the documents taken so far (licenses and font headers repeat)
    for domain, texts in domain_sources(domain_set).items():
        budget = dict(targets)
        for source in sorted(texts, key=lambda source: _rank(source.name)):
            if max(budget.values()) <= 0:
                break
            try:
                text = source.read()
            except (UnicodeDecodeError, OSError):
                continue
            for index, document in enumerate(documents(text)):
                split = "valid" if _held_out(source, index, domain_set) else "train"
                if domain_set == "genres":
                    if document in seen:
                        continue
                    seen.add(document)
                if budget[split] > 0:
                    splits[split].append({"text": document, "domain": domain})
                    budget[split] -= len(document.encode("utf-8"))
        counts[domain] = {split: targets[split] - budget[split] for split in targets}
    os.makedirs(out_dir, exist_ok=True)
    sources = {"domains": domain_set, "python": sys.version.split()[0],
               "packages": {name: metadata.version(name) for name in PACKAGES[domain_set]},
               "bytes": counts, "sha256": {}}
    for split, records in splits.items():
        path = os.path.join(out_dir, f"{split}.jsonl")
        corpus.write_jsonl(path, records)
        with open(path, "rb") as f:
            sources["sha256"][f"{split}.jsonl"] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(out_dir, "sources.json"), "w") as f:
        json.dump(sources, f, indent=1)
    return sources


if __name__ == "__main__":
    import megatron_gbl_lab.quiet  # noqa: F401 - before torch and Megatron-Core are imported

    parser = argparse.ArgumentParser(prog="python -m megatron_gbl_lab.text_corpus",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="where train.jsonl, valid.jsonl and sources.json go")
    parser.add_argument("--domains", choices=DOMAIN_SETS, default="source",
                        help="source: python, cpp, cuda, english; genres: english, python, cpp, "
                             "numbers, markup (default: %(default)s)")
    args = parser.parse_args()
    print(json.dumps(build(args.out_dir, args.domains), indent=1))
