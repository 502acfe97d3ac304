"""The imputer's written-out attention against ``nn.MultiheadAttention`` with the same weights, in
one run: forward+backward of ``CrossSequenceImputer`` (demo stem width 8) on one batch, one thread.

    python tests/benchmarks/bench_imputer.py [--size 48] [--batch 2] [--missing 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.model.imputation import CrossSequenceImputer  # noqa: E402


def module_attend(self: CrossSequenceImputer, keys: torch.Tensor, available: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What ``_attend`` replaces: the module over every (voxel, target) pair, then the missing ones."""
    query = self.query_norm(self.query).expand(keys.shape[0], -1, -1)
    return self.attention(query, keys, keys, key_padding_mask=~available, need_weights=False)[0][target]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--missing", type=int, default=1, help="missing sequences per case (1-3)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    imputer = CrossSequenceImputer(channels=8)
    features = torch.randn(args.batch, 4, 8, args.size, args.size, args.size, requires_grad=True)
    available = torch.ones(args.batch, 4, dtype=torch.bool)
    available[:, 1:1 + args.missing] = False
    written = CrossSequenceImputer._attend
    seconds: dict[str, list[float]] = {"nn.MultiheadAttention": [], "written out": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        for name, attend in (("nn.MultiheadAttention", module_attend), ("written out", written)):
            CrossSequenceImputer._attend = attend
            start = time.perf_counter()
            imputer(features, available).features.sum().backward()
            seconds[name].append(time.perf_counter() - start)
    CrossSequenceImputer._attend = written
    base, ours = (statistics.median(v) for v in seconds.values())
    print(f"{args.batch}x8x{args.size}^3, {args.missing} missing, forward+backward, median of {args.repeats}:")
    for name, values in seconds.items():
        print(f"  {name:<22} {statistics.median(values):.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"  ratio written/module  {ours / base:.2f}")


if __name__ == "__main__":
    main()
