"""The site cache: each case validated and preprocessed once, invalidated one case at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from common.config import compose
from common.data import cache as cache_module
from common.data.cache import PersistentCases, ValidationCache, preprocessed_dir
from common.data.dataset import make_loader
from common.data.site import scan_site


def scan(site: Path, folder: Path) -> tuple:
    cache = ValidationCache(folder)
    return scan_site(site, validation_cache=cache), cache


def touch(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_validation_is_reused_and_only_a_changed_case_is_redone(site_dir: Path, tmp_path: Path) -> None:
    first, cache = scan(site_dir, tmp_path / "cache")
    assert cache.hits == 0 and cache.misses == len(first.cases) + sum(1 for r in first.rejected if r.path.is_dir())
    again, cache = scan(site_dir, tmp_path / "cache")
    assert cache.misses == 0 and [c.case_id for c in again.cases] == [c.case_id for c in first.cases]
    changed = again.cases[0]
    touch(next(iter(changed.images.values())))
    _, cache = scan(site_dir, tmp_path / "cache")
    assert cache.misses == 1  # only the touched case


def test_a_file_that_became_bad_is_caught_although_its_case_was_cached(site_dir: Path, tmp_path: Path) -> None:
    index, _ = scan(site_dir, tmp_path / "cache")
    case = index.cases[0]
    path = next(iter(case.images.values()))
    path.write_bytes(path.read_bytes()[:100])  # truncated: new size, new fingerprint
    later, _ = scan(site_dir, tmp_path / "cache")
    assert case.case_id in {r.case_id for r in later.rejected}


def test_a_damaged_validation_cache_is_rebuilt_not_trusted(site_dir: Path, tmp_path: Path) -> None:
    index, _ = scan(site_dir, tmp_path / "cache")
    (tmp_path / "cache" / "validation.json").write_text("{broken")
    again, cache = scan(site_dir, tmp_path / "cache")
    assert cache.hits == 0 and len(again.cases) == len(index.cases)
    entries = json.loads((tmp_path / "cache" / "validation.json").read_text())
    entries[index.cases[0].case_id]["problems"] = [{"path": 1}]  # garbage inside a matching entry
    (tmp_path / "cache" / "validation.json").write_text(json.dumps(entries))
    third, cache = scan(site_dir, tmp_path / "cache")
    assert cache.misses == 1 and len(third.cases) == len(index.cases)


def test_preprocessed_cases_match_the_uncached_pipeline_and_survive_damage(site_dir: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    cfg = compose(["+experiment=tiny", "data.size=16"]).data
    index = scan_site(site_dir)
    folder = preprocessed_dir(tmp_path / "state")
    reference = list(make_loader(index.cases, cfg, train=False))
    cached = list(make_loader(index.cases, cfg, train=False, cache_dir=folder))
    for a, b in zip(reference, cached):
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    entries = sorted(folder.glob("*.pt"))
    assert len(entries) == len(index.cases)
    # later messages read the entries instead of preprocessing again
    calls = []
    original = PersistentCases._pre_transform
    monkeypatch.setattr(PersistentCases, "_pre_transform", lambda self, item: calls.append(1) or original(self, item))
    list(make_loader(index.cases, cfg, train=False, cache_dir=folder))
    assert calls == []
    entries[0].write_bytes(entries[0].read_bytes()[:50])  # a damaged entry is rebuilt, not trusted
    again = list(make_loader(index.cases, cfg, train=False, cache_dir=folder))
    assert len(calls) == 1 and all(torch.equal(a["image"], b["image"]) for a, b in zip(reference, again))


def test_another_output_size_is_preprocessed_afresh_not_read_from_the_cache(site_dir: Path, tmp_path: Path) -> None:
    index = scan_site(site_dir)
    folder = preprocessed_dir(tmp_path / "state")
    small = compose(["+experiment=tiny", "data.size=16"]).data
    list(make_loader(index.cases, small, train=False, cache_dir=folder))
    large = compose(["+experiment=tiny", "data.size=24"]).data
    batches = list(make_loader(index.cases, large, train=False, cache_dir=folder))
    assert all(b["image"].shape[2:] == (24, 24, 24) for b in batches)
    assert len(list(folder.glob("*.pt"))) == 2 * len(index.cases)  # both sizes kept, each under its own key


def test_labels_are_read_fresh_and_training_augmentation_still_runs(site_dir: Path, tmp_path: Path) -> None:
    cfg = compose(["+experiment=tiny", "data.size=16"]).data
    index = scan_site(site_dir)
    folder = tmp_path / "pre"
    list(make_loader(index.cases, cfg, train=False, cache_dir=folder))
    relabeled = [type(c)(**{**c.__dict__, "labels": tuple(1 - v if v >= 0 else v for v in c.labels)}) for c in index.cases]
    batch = next(iter(make_loader(relabeled[:2], cfg, train=False, cache_dir=folder)))
    assert batch["labels"].tolist() == [list(c.labels) for c in relabeled[:2]]
    a = torch.stack([x["image"] for x in make_loader(index.cases, cfg, train=True, seed=1, cache_dir=folder).dataset])
    b = torch.stack([x["image"] for x in make_loader(index.cases, cfg, train=True, seed=1).dataset])
    assert a.shape == b.shape and not torch.equal(a, torch.stack(
        [x["image"] for x in make_loader(index.cases, cfg, train=False, cache_dir=folder).dataset]))


def test_check_site_warm_fills_the_cache_the_session_then_uses(site_dir: Path, tmp_path: Path, capsys) -> None:
    from client.check_site import add_arguments, run
    from client.session import SiteSession
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    state = tmp_path / "state"
    assert run(parser.parse_args([str(site_dir), "--warm", "--experiment", "tiny", "--state-path", str(state)])) == 0
    assert "validated and preprocessed" in capsys.readouterr().out
    assert (state / "cache" / "validation.json").is_file() and list((state / "cache" / "preprocessed").glob("*.pt"))
    session = SiteSession.open({"data-path": str(site_dir), "state-path": str(state)}, compose(["+experiment=tiny"]))
    assert session.cache_hits == len(session.index.cases) and session.description()["cache_hits"] > 0


def test_code_changes_invalidate_the_validation_cache(site_dir: Path, tmp_path: Path, monkeypatch) -> None:
    scan(site_dir, tmp_path / "cache")
    monkeypatch.setattr(cache_module, "_CODE", "another-version")
    _, cache = scan(site_dir, tmp_path / "cache")
    assert cache.hits == 0


def test_survival_is_read_fresh_like_the_labels(site_dir: Path, tmp_path: Path) -> None:
    cfg = compose(["+experiment=tiny", "data.size=16"]).data
    cases = scan_site(site_dir).cases[:2]
    folder = tmp_path / "pre"
    list(make_loader(cases, cfg, train=False, cache_dir=folder))
    followed = [type(c)(**{**c.__dict__, "survival": (100.0 * (i + 1), 1)}) for i, c in enumerate(cases)]
    batch = next(iter(make_loader(followed, cfg, train=False, cache_dir=folder)))
    assert batch["survival"].tolist() == [[100.0, 1.0], [200.0, 1.0]]
