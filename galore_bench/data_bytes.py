"""The offline Wikipedia text as UTF-8 bytes: a 258-symbol vocabulary, for quality runs where the model body dominates.

Why bytes and not a trained BPE: the vocabulary is fixed by UTF-8 itself, so there is nothing to train, cache or
pin beside the corpus (a SentencePiece model trained here would be one more artefact whose exact bytes depend on
the library version and thread count), and the embedding tables shrink from 2 x 32000 x hidden to 2 x 258 x
hidden: at hidden 192 they are 5% of the parameters instead of 91%. The price is longer sequences per word
(about 4.5 bytes per word-piece token), which a quality comparison between optimizers does not mind: every
method sees the same bytes. Perplexity here is per byte; bits per byte = NLL / ln 2.

Splits: `train` is data.py's train split unchanged (the same documents the 32k-token scenarios train on). data.py's
5% validation documents are halved by a second, independent part of the same hash: `tune` (what learning
rates are chosen on) and `test` (what the final figures are measured on), so no figure reported is one that a
choice was made on. Each document is BOS + its UTF-8 bytes + EOS, concatenated in title order and cut into
fixed blocks, as data.py does for tokens.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

from galore_bench import data

SOURCE = "wiki-offline-bytes"
BOS, EOS = 256, 257
VOCAB_SIZE = 258  # the 256 byte values, BOS, EOS
SPLITS = ("train", "tune", "test")
SPLIT_RULE = (f"{data._SPLIT_RULE}; validation halved: int(sha256(title)[16:32]) % 2 == 0 -> tune, "
              "else test")


def split_of(title: str) -> str:
    """'train', 'tune' or 'test' for a document title: data.py's split, its validation part halved."""
    if data.split_of(title) == "train":
        return "train"
    return "tune" if int(hashlib.sha256(title.encode("utf-8")).hexdigest()[16:32], 16) % 2 == 0 else "test"


def encode(texts: list[str]) -> np.ndarray:
    """BOS bytes EOS for each text, concatenated, as uint16 (bytes 0-255, BOS 256, EOS 257)."""
    pieces = []
    for text in texts:
        pieces += [np.array([BOS], np.uint16), np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16),
                   np.array([EOS], np.uint16)]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)


def decode(ids: np.ndarray) -> list[str]:
    """The texts back from a stream `encode` made (for tests and for reading a batch by eye)."""
    texts, current = [], bytearray()
    for value in np.asarray(ids).tolist():
        if value == BOS:
            current = bytearray()
        elif value == EOS:
            texts.append(current.decode("utf-8"))
        else:
            current.append(value)
    return texts


@functools.lru_cache(maxsize=2)
def _streams(max_docs: int | None) -> dict[str, np.ndarray]:
    docs = data.load_documents(max_docs=max_docs)
    streams = {split: encode([text for title, text in docs if split_of(title) == split]) for split in SPLITS}
    for stream in streams.values():
        stream.flags.writeable = False  # shared by every caller in this process
    return streams


def load_stream(split: str, max_docs: int | None = None) -> np.ndarray:
    """The split's documents as one byte stream. Encoding 4.6 MB of text takes well under a second, so nothing
    is cached on disk; within a process the three streams are built once (reading and checking the corpus file
    by sha256 is the slow part)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _streams(max_docs)[split]


def batches(split: str, seq_len: int, batch_size: int, seed: int = 0, max_docs: int | None = None
            ) -> data.TokenBatches:
    """Fixed blocks of `seq_len` bytes; shuffled for train, in order for the held-out splits."""
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2 (one input and one predicted byte)")
    stream = load_stream(split, max_docs)
    n = len(stream) // seq_len
    return data.TokenBatches(stream[: n * seq_len].reshape(n, seq_len), batch_size, seed, split == "train",
                             SOURCE, VOCAB_SIZE)


@functools.lru_cache(maxsize=2)
def _titles(max_docs: int | None) -> tuple[str, ...]:
    return tuple(title for title, _ in data.load_documents(max_docs=max_docs))


def info(max_docs: int | None = None) -> dict:
    """Provenance for a record: the text file, the byte vocabulary, the split rule, documents and bytes per split."""
    titles = _titles(max_docs)
    return {"source": SOURCE,
            "text": {"package": data.WIKI_DIST, "version": data.WIKI_VERSION, "file": data.WIKI_FILE,
                     "sha256": data.WIKI_SHA256, "licence": data.TEXT_LICENCE},
            "tokenizer": {"kind": "UTF-8 bytes", "vocab_size": VOCAB_SIZE, "bos_id": BOS, "eos_id": EOS},
            "split_rule": SPLIT_RULE, "max_docs": max_docs,
            "documents": {s: sum(split_of(t) == s for t in titles) for s in SPLITS},
            "tokens": {s: len(load_stream(s, max_docs)) for s in SPLITS}}
