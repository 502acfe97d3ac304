"""Training-step time, peak memory and forward time of the network versus MONAI's SegResNet.

Run directly (not collected by pytest)::

    python tests/benchmarks/bench_model.py --presets demo paper --steps 5 --device auto
    python tests/benchmarks/bench_model.py --presets demo --steps 2 --device cpu --out bench.json

Every configuration (each preset, and the SegResNet reference) runs in a fresh subprocess so that
peak-memory figures do not contaminate each other, then the parent prints one markdown table with
ratios ours / SegResNet measured in the same run on the same input:

* train step: forward + loss + backward + AdamW step on a batch of ``--batch`` cases
  (ours: ``MultiTaskLoss``, Dice+CE and all four tasks labelled; SegResNet: ``DiceCELoss``),
  mean over ``--steps`` timed steps after one untimed warm-up step;
* peak memory: CUDA ``torch.cuda.max_memory_allocated`` (parameters, gradients, optimizer state
  and activations); CPU: growth of ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set
  size) from right after the imports to the end of training, in the fresh subprocess. psutil is
  not a project dependency, and ``tracemalloc`` does not see torch's allocator;
* forward: one case of 4 x ``--forward-size``^3 (default 128^3), eval mode, no grad.

On CPU the defaults are small (``--size 32``, ``--forward-size 64``) so that a run takes a couple
of minutes on two cores; a warning says so. Pass ``--size 128 --forward-size 128`` (slow on CPU)
or run on a GPU for paper-scale numbers. On a machine shared with other jobs, ``--threads 1``
gives steadier CPU timings (oversubscribed intra-op threads stall).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere: make `common` importable
    sys.path.insert(0, str(ROOT))

REFERENCE = "segresnet"
CPU_DEFAULT_SIZE = 32
CPU_DEFAULT_FORWARD_SIZE = 64
GPU_DEFAULT_SIZE = 128


def _maxrss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- worker side
def _build(name: str, size: int):
    """The network ``name`` (a model preset, or ``segresnet``) for inputs of side ``size``."""
    if name == REFERENCE:
        from monai.networks.nets import SegResNet

        return SegResNet(spatial_dims=3, init_filters=16, in_channels=4, out_channels=4)
    from common.config import compose
    from common.model import build_model

    return build_model(compose([f"model={name}"]).model, size)


def _synthetic_batch(batch: int, size: int, device: Any) -> dict[str, Any]:
    """Random intensities, a random 4-class segmentation and all four labels known."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(batch, 4, size, size, size, generator=g).to(device),
        "available": torch.ones(batch, 4, dtype=torch.bool, device=device),
        "seg": torch.randint(0, 4, (batch, 1, size, size, size), generator=g).to(device),
        "has_seg": torch.ones(batch, dtype=torch.bool, device=device),
        "labels": torch.randint(0, 2, (batch, 4), generator=g).to(device),
    }


def _loss_fn(name: str, model: Any, device: Any):
    """A callable ``batch -> scalar loss`` that runs the model's forward pass and its loss."""
    from monai.losses import DiceCELoss

    if name == REFERENCE:
        criterion = DiceCELoss(to_onehot_y=True, softmax=True)
        return lambda b: criterion(model(b["image"]).float(), b["seg"])
    from client.losses import MultiTaskLoss

    criterion = MultiTaskLoss().to(device)
    return lambda b: criterion(model(b["image"], b["available"]), b, model.task_weighting).total


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(spec: dict[str, Any], device: Any) -> dict[str, float]:
    import torch

    rss_start = _maxrss_mib()
    model = _build(spec["name"], spec["size"]).to(device).train()
    batch = _synthetic_batch(spec["batch"], spec["size"], device)
    loss_of = _loss_fn(spec["name"], model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = bool(spec["amp"]) and device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_of(batch)
        loss.float().backward()
        optimizer.step()

    step()  # warm-up: allocator, cuDNN autotuning, optimizer state
    times = []
    for _ in range(spec["steps"]):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _maxrss_mib() - rss_start
    return {
        "params": float(sum(p.numel() for p in model.parameters())),
        "step_s": statistics.fmean(times),
        "step_s_min": min(times),
        "peak_mib": peak,
    }


def _forward(spec: dict[str, Any], device: Any) -> dict[str, float]:
    import torch

    size = spec["forward_size"]
    model = _build(spec["name"], size).to(device).eval()
    batch = _synthetic_batch(1, size, device)
    amp = bool(spec["amp"]) and device.type == "cuda"

    def run() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            if spec["name"] == REFERENCE:
                model(batch["image"])
            else:
                model(batch["image"], batch["available"])

    run()  # warm-up
    times = []
    for _ in range(spec["forward_repeats"]):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"forward_s": statistics.fmean(times)}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process."""
    import torch

    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    else:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    # Import (and let Hydra compose once) before the memory baseline, so library loading is not
    # counted as the configuration's memory.
    import monai.losses  # noqa: F401
    import monai.networks.nets  # noqa: F401

    import client.losses  # noqa: F401
    import common.model  # noqa: F401
    from common.config import compose

    compose([])
    result: dict[str, Any] = dict(_train(spec, device))
    if spec["forward_size"] > 0:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result.update(_forward(spec, device))
    return result


# --------------------------------------------------------------------------- parent side
def _run_isolated(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`worker` for ``spec`` in a fresh interpreter; errors become an ``error`` entry."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (lower --steps/--size or raise --timeout)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT ") :])


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}"


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown_table(results: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
    """One row per configuration, with ratios to the SegResNet row."""
    ref = results.get(REFERENCE, {})
    mem_label = "peak GPU MiB" if settings["device"].startswith("cuda") else "peak RSS growth MiB"
    fwd = settings["forward_size"]
    header = (
        f"| model | params (M) | train step s ({settings['batch']}x4x{settings['size']}^3) | step ratio "
        f"| {mem_label} | memory ratio | forward s (1x4x{fwd}^3) | forward ratio |"
    )
    lines = [header, "|" + "---|" * 8]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |" + " |" * 6)
            continue
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f} | {r['step_s']:.3f} | {_ratio(r['step_s'], ref.get('step_s'))} "
            f"| {r['peak_mib']:.0f} | {_ratio(r['peak_mib'], ref.get('peak_mib'))} "
            f"| {_fmt(r.get('forward_s'), '{:.3f}')} | {_ratio(r.get('forward_s'), ref.get('forward_s'))} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["demo", "paper"], help="model presets (common/configs/model/*.yaml)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per configuration")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--size", type=int, default=None, help=f"training input side (default {GPU_DEFAULT_SIZE} on CUDA, {CPU_DEFAULT_SIZE} on CPU)")
    parser.add_argument("--forward-size", type=int, default=None, help=f"forward-pass input side (default 128; {CPU_DEFAULT_FORWARD_SIZE} on CPU); 0 skips it")
    parser.add_argument("--forward-repeats", type=int, default=None, help="timed forward passes (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--batch", type=int, default=1, help="cases per training step")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="fp16 autocast on CUDA (as train.amp)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per configuration")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    on_cpu = device == "cpu"
    size = args.size or (CPU_DEFAULT_SIZE if on_cpu else GPU_DEFAULT_SIZE)
    forward_size = args.forward_size if args.forward_size is not None else (CPU_DEFAULT_FORWARD_SIZE if on_cpu else 128)
    for name, value in (("--size", size), ("--forward-size", forward_size)):
        if value and (value % 8 or value < 16):
            raise SystemExit(f"{name}={value}: must be a multiple of 8 and at least 16 (the encoder downsamples 3x)")
    if on_cpu and (size < GPU_DEFAULT_SIZE or forward_size < 128):
        warnings.warn(
            f"CPU run at {size}^3 (training) and {forward_size}^3 (forward) to stay within minutes; "
            "paper-scale figures need --size 128 --forward-size 128 (slow on CPU) or a GPU",
            stacklevel=1,
        )
    settings = {
        "device": f"cpu ({args.threads} threads)" if on_cpu else f"cuda ({torch.cuda.get_device_name(0)})",
        "size": size,
        "forward_size": forward_size,
        "batch": args.batch,
        "steps": args.steps,
        "amp": bool(args.amp and not on_cpu),
        "torch": torch.__version__,
        "memory_measure": "torch.cuda.max_memory_allocated" if not on_cpu else "ru_maxrss growth in a fresh subprocess",
    }
    results: dict[str, dict[str, Any]] = {}
    for name in [REFERENCE, *args.presets]:
        spec = {
            "name": name,
            "device": device,
            "size": size,
            "forward_size": forward_size,
            "forward_repeats": args.forward_repeats or (1 if on_cpu else 3),
            "batch": args.batch,
            "steps": args.steps,
            "amp": args.amp,
            "threads": args.threads,
        }
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results[name] = _run_isolated(spec, args.timeout)
    table = markdown_table(results, settings)
    print(f"device: {settings['device']}, torch {settings['torch']}, amp={settings['amp']}, steps={args.steps}, "
          f"memory: {settings['memory_measure']}\n")
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
