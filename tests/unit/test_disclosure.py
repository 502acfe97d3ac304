"""client.disclosure: metric groups over too few cases stay at the site."""

from __future__ import annotations

from client.disclosure import withhold_small_groups


def test_the_cindex_is_withheld_below_min_cases_of_known_survival() -> None:
    metrics = {"n_cases": 10.0, "dice_wt": 0.8, "cindex": 0.7, "n_survival": 4.0}
    assert "cindex" not in withhold_small_groups(metrics, n_seg=10, min_cases=5)
    kept = withhold_small_groups({**metrics, "n_survival": 5.0}, n_seg=10, min_cases=5)
    assert kept["cindex"] == 0.7 and kept["dice_wt"] == 0.8
