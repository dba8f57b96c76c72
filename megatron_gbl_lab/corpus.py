"""Multi-domain text for the demo: a built-in synthetic corpus, JSONL reading and checks, byte
tokens (pure Python: the command line checks data files before torch is imported;
batches.py turns the text into token streams and batches).

The built-in corpus is generated offline from a seeded RNG, nothing is downloaded or copied.
Each domain is a small artificial language with its own alphabet (a random subset of a shared
character pool, so domains overlap in bytes like English and code do), its own lexicon and its
own word-to-word grammar (a first-order Markov chain). Its parameters are fixed below and were
not tuned on the demo's outcome.
"""

from __future__ import annotations

import json
import os
import random
import string

EOD = 256  # end-of-document token after the 256 byte values
VOCAB_SIZE = 257

_CHAR_POOL = string.ascii_lowercase + string.digits + "()[]{}<>=+-*/_.,;:!?#$%&@"
_ALPHABET_SIZE = 16     # characters per domain, drawn from the 61-character pool
_LEXICON_SIZE = 64      # words per domain
_WORD_LENGTHS = (1, 6)  # inclusive range of word lengths
_SUCCESSOR_WEIGHTS = (0.6, 0.3, 0.1)  # each word's three likely next words
_RESTART_PROBABILITY = 0.1            # chance to jump to a Zipf-drawn word instead
_SENTENCE_WORDS = (5, 12)
_DOC_SENTENCES = (3, 10)


def synthetic_records(num_domains: int, num_docs: int, seed: int, split: str) -> list[dict]:
    """`num_docs` documents per domain as JSONL-shaped records {"text": ..., "domain": ...}.

    The languages depend on `seed` only; `split` ("train"/"valid") draws different documents
    from the same languages.
    """
    records = []
    for d in range(num_domains):
        language = _Language(random.Random(f"{seed}-language-{d}"))
        rng = random.Random(f"{seed}-{split}-{d}")
        records += [{"text": language.document(rng), "domain": f"synthetic-{d}"}
                    for _ in range(num_docs)]
    return records


class _Language:
    def __init__(self, rng: random.Random):
        alphabet = rng.sample(_CHAR_POOL, _ALPHABET_SIZE)
        words = set()
        while len(words) < _LEXICON_SIZE:
            words.add("".join(rng.choices(alphabet, k=rng.randint(*_WORD_LENGTHS))))
        self.words = sorted(words)
        rng.shuffle(self.words)
        self.zipf = [1.0 / (rank + 1) for rank in range(_LEXICON_SIZE)]
        self.successors = [rng.sample(range(_LEXICON_SIZE), len(_SUCCESSOR_WEIGHTS))
                           for _ in range(_LEXICON_SIZE)]

    def document(self, rng: random.Random) -> str:
        word = rng.choices(range(_LEXICON_SIZE), self.zipf)[0]
        sentences = []
        for _ in range(rng.randint(*_DOC_SENTENCES)):
            sentence = []
            for _ in range(rng.randint(*_SENTENCE_WORDS)):
                sentence.append(self.words[word])
                if rng.random() < _RESTART_PROBABILITY:
                    word = rng.choices(range(_LEXICON_SIZE), self.zipf)[0]
                else:
                    word = rng.choices(self.successors[word], _SUCCESSOR_WEIGHTS)[0]
            sentences.append(" ".join(sentence))
        return "\n".join(sentences)


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str, domain_key: str, flag: str) -> list[dict]:
    """Records with a "text" string and a `domain_key` field (the JSONL of Megatron's
    preprocess_data.py plus a domain label). Errors name `flag` and the fix."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file; pass a JSONL file with one "
                         f'{{"text": ..., "{domain_key}": ...}} object per line')
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{flag} {path}:{line_number}: not a JSON object ({error})") \
                    from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{flag} {path}:{line_number}: needs a string field "text"')
            if domain_key not in record:
                raise ValueError(
                    f"{flag} {path}:{line_number}: no domain field {domain_key!r} (fields: "
                    f"{', '.join(sorted(record))}); add it to every line or name the field "
                    f"with --domain-key")
            records.append({"text": record["text"], "domain": str(record[domain_key])})
    if not records:
        raise ValueError(f"{flag} {path}: the file has no records")
    return records


def tokenize(text: str) -> list[int]:
    """Byte-level tokens: the UTF-8 bytes of `text`, ids 0..255."""
    return list(text.encode("utf-8"))


def domain_tokens(records: list[dict], domains: list[str]) -> list[list[int]]:
    """Per domain (in the order of `domains`), its documents' tokens with EOD after each."""
    tokens = {domain: [] for domain in domains}
    for record in records:
        tokens[record["domain"]] += tokenize(record["text"]) + [EOD]
    return [tokens[domain] for domain in domains]


def check_corpus(train_records: list[dict], valid_records: list[dict],
                 min_tokens: int) -> list[str]:
    """The domains of the training records, sorted, once the records can make a demo corpus:
    every domain has at least `min_tokens` tokens in both splits (one sequence plus its
    shifted label) and validation has the same domains as training."""
    domains = sorted({record["domain"] for record in train_records})
    if len(domains) < 2:
        raise ValueError(f"--train-data: found {len(domains)} domain ({', '.join(domains)}); the "
                         "demo compares how domains are routed and needs at least 2")
    valid_domains = sorted({record["domain"] for record in valid_records})
    if valid_domains != domains:
        raise ValueError(f"--valid-data: domains {valid_domains} differ from --train-data's "
                         f"{domains}; both files need the same set of domains")
    for flag, records in (("--train-data", train_records), ("--valid-data", valid_records)):
        for domain, tokens in zip(domains, domain_tokens(records, domains)):
            if len(tokens) < min_tokens:
                raise ValueError(f"{flag}: domain {domain!r} has {len(tokens)} tokens, fewer than "
                                 f"one sequence ({min_tokens}); add text or lower --seq-length")
    return domains
