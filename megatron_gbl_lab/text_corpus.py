"""A corpus of real text in four domains, from files every megatron-gbl environment has: the
installed torch and Megatron-Core packages themselves. Nothing is downloaded.

    python -m megatron_gbl_lab.text_corpus out/text
    megatron-gbl demo --train-data out/text/train.jsonl --valid-data out/text/valid.jsonl

| domain  | text                                                      |
|---------|-----------------------------------------------------------|
| python  | Megatron-Core's Python source (megatron/core/**/*.py)     |
| cpp     | torch's C++ headers (torch/include/**/*.h)                |
| cuda    | torch's CUDA headers (torch/include/**/*.cuh)             |
| english | the license texts shipped with torch (its dist-info)      |

Each file is one source; its text is cut into documents of about DOC_BYTES at line breaks. A
file goes to the held-out split when a hash of its path says so (about 1 in 10), so no text is
in both splits, and files are taken in hash order until a domain has TRAIN_BYTES (VALID_BYTES),
so every domain draws on many files. sources.json records the package versions and each
output's sha256: the same packages give the same corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path

from megatron_gbl_lab import corpus

DOC_BYTES = 2048
TRAIN_BYTES = 400_000  # per domain, like the built-in corpus (1000 documents of ~250 bytes)
VALID_BYTES = 60_000
VALID_ONE_IN = 10


def domain_files() -> dict[str, list[Path]]:
    """Every source file of each domain, sorted."""
    import megatron.core
    import torch

    megatron_core = Path(megatron.core.__file__).parent
    include = Path(torch.__file__).parent / "include"
    licenses = [Path(str(path.locate())) for path in metadata.distribution("torch").files
                if "license" in str(path).lower()]
    return {"python": sorted(megatron_core.rglob("*.py")),
            "cpp": sorted(include.rglob("*.h")),
            "cuda": sorted(include.rglob("*.cuh")),
            "english": sorted(path for path in licenses if path.is_file())}


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


def _rank(path: Path) -> bytes:
    """A pseudo-random order of files, the same in every environment: a hash of the path from
    the package's directory on (torch/..., megatron/..., torch-2.13.0.dist-info/...)."""
    parts = path.parts
    start = next(i for i, part in enumerate(parts) if part.startswith(("torch", "megatron")))
    return hashlib.sha256("/".join(parts[start:]).encode()).digest()


def build(out_dir: str) -> dict:
    """Write train.jsonl, valid.jsonl and sources.json into `out_dir`; return sources.json."""
    targets = {"train": TRAIN_BYTES, "valid": VALID_BYTES}
    splits = {split: [] for split in targets}
    counts = {}
    for domain, files in domain_files().items():
        budget = dict(targets)
        for path in sorted(files, key=_rank):
            split = "valid" if _rank(path)[0] % VALID_ONE_IN == 0 else "train"
            if budget[split] <= 0:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for document in documents(text):
                if budget[split] <= 0:
                    break
                splits[split].append({"text": document, "domain": domain})
                budget[split] -= len(document.encode("utf-8"))
        counts[domain] = {split: targets[split] - budget[split] for split in targets}
    os.makedirs(out_dir, exist_ok=True)
    sources = {"packages": {name: metadata.version(name) for name in ("torch", "megatron-core")},
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

    if len(sys.argv) != 2:
        sys.exit("usage: python -m megatron_gbl_lab.text_corpus OUT_DIR")
    print(json.dumps(build(sys.argv[1]), indent=1))
