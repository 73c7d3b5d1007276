"""One-call embed check for a GPU node: throughput of every data path, side by side, one table.

Makes its own synthetic slides (several slide ids share each file, so the cohort is large
without writing many slides), tiles them at 0.5 µm/px, 224 px, then for each encoder measures:

- ``model``: random uint8 tiles already on the device -> normalise -> encoder (the ceiling);
- ``e2e pixels``: ``run_embed`` with ``--decode auto`` on the CPU path (workers decode and
  resize with tifffile/Pillow, today's loader);
- ``e2e decode cpu``: ``--decode cpu`` (workers read compressed tiles, decode with torchvision);
- ``e2e decode gpu``: ``--decode gpu`` (the main process decodes whole batches on the GPU);
  skipped with a note without CUDA;
- ``per-tile OpenSlide``: the common baseline (one OpenSlide ``read_region`` per tile,
  torchvision transforms, float32 batches), on a capped number of tiles;

in tiles/s and as ratios to ``model``, with the CPU cores kept busy (user + system CPU seconds
of the mode's process and its loader workers / wall seconds) and the peak GPU memory. Before
that it checks that GPU-decoded tiles equal CPU-decoded ones and OpenSlide's (YCbCr JPEG and
an Aperio-style RGB-coded JPEG with JPEGTables). Writes ``gpu_check.json`` and
``gpu_check.md`` to ``OUT`` and prints the markdown.

Every mode runs in its own process with a time limit (``--quick``: in this process), so a
failing mode is a row saying so and the others still run. ``--budget-s`` bounds the whole run:
modes that would start after it are reported as skipped.

    benchmarks/gpu_check.sh OUT                       # GPU node: ~5-8 min on one H100
    benchmarks/gpu_check.sh OUT --quick --device cpu  # seconds; checks the script (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_modes import MODES, cohort_rows, decode_check, prepare  # noqa: E402

FULL_ENCODERS = "resnet50_trunc,uni"  # uni: ViT-L/16 (UNI's architecture), random weights
QUICK_ENCODERS = "mobilenetv3_small_050"  # the script, not the speed, is checked
MODE_ORDER = ["model", "e2e_pixels", "e2e_cpu", "e2e_gpu", "baseline"]
LABELS = {
    "model": "model only",
    "e2e_pixels": "e2e pixels (worker decode, PIL)",
    "e2e_cpu": "e2e --decode cpu",
    "e2e_gpu": "e2e --decode gpu",
    "baseline": "per-tile OpenSlide",
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for gpu_check.json, gpu_check.md and the work files")
    p.add_argument("--quick", action="store_true", help="tiny slides and counts, in-process")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--encoders", default=None, help=f"comma list [{FULL_ENCODERS}]")
    p.add_argument(
        "--modes",
        default=",".join(MODE_ORDER),
        help="comma list of modes to run; model only always runs (the e2e sizes and ratios)",
    )
    p.add_argument("--workers", type=int, default=0, help="loader workers [usable CPUs - 1, <= 16]")
    p.add_argument("--batch-size", type=int, default=0, help="0: 256 on CUDA, 32 on CPU")
    p.add_argument("--slides", type=int, default=0, help="distinct slide files [4; quick 1]")
    p.add_argument("--size-px", type=int, default=0, help="slide side [8192; quick 1024]")
    p.add_argument(
        "--e2e-seconds", type=float, default=6.0, help="e2e cohort ~ model tiles/s x this"
    )
    p.add_argument("--max-tiles", type=int, default=60_000, help="most tiles of one e2e mode")
    p.add_argument("--baseline-tiles", type=int, default=3000, help="tiles of the baseline")
    p.add_argument("--mode-timeout", type=int, default=120, help="seconds per mode")
    p.add_argument("--budget-s", type=float, default=400, help="no mode starts after this")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.modes.split(",")) - set(MODE_ORDER))
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {','.join(MODE_ORDER)}")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.cpus = cpus or 1
    if args.quick:
        args.encoders = args.encoders or QUICK_ENCODERS
        args.slides, args.size_px = args.slides or 1, args.size_px or 1024
        args.batch_size = args.batch_size or 8
        args.max_tiles, args.baseline_tiles = min(args.max_tiles, 24), min(args.baseline_tiles, 8)
        args.workers = args.workers or -1  # -1: read in the main process (no worker start-up)
    args.encoders = args.encoders or FULL_ENCODERS
    args.slides, args.size_px = args.slides or 4, args.size_px or 8192
    args.batch_size = args.batch_size or (256 if args.device == "cuda" else 32)
    args.workers = max(0, args.workers or max(1, min(args.cpus - 1, 16)))
    return args


def child_argv(args, mode: str, encoder: str, n_tiles: int) -> list[str]:
    spec = json.dumps({"mode": mode, "encoder": encoder, "n_tiles": n_tiles})
    keep = [
        args.out, "--device", args.device, "--workers", str(args.workers),
        "--batch-size", str(args.batch_size), "--slides", str(args.slides),
        "--size-px", str(args.size_px), "--_child", spec,
    ]  # fmt: skip
    return [sys.executable, str(Path(__file__).resolve()), *keep]


def run_mode(args, mode: str, encoder: str, n_tiles: int) -> dict:
    """One mode: in a child process with a time limit (in-process with ``--quick``)."""
    if args.quick:
        try:
            return measure(args, mode, encoder, n_tiles)
        except Exception as exc:
            return {
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            }
    try:
        out = subprocess.run(
            child_argv(args, mode, encoder, n_tiles),
            capture_output=True,
            text=True,
            timeout=args.mode_timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.mode_timeout} s"}
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {out.returncode}: {tail[:300]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args, mode: str, encoder: str, n_tiles: int) -> dict:
    """Run one mode and add its CPU use and peak GPU memory."""
    import torch

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = MODES[mode](args, encoder, n_tiles)  # times itself: set-up and warm-up left out
    res["cpu_cores"] = res.pop("cpu_s") / max(res["seconds"], 1e-9)
    res["tiles_per_s"] = res["tiles"] / max(res["seconds"], 1e-9)
    res["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return res


def environment(args) -> dict:
    import torch
    import torchvision

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "cpus_usable": args.cpus,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "quick": args.quick,
    }
    return env


def run_all(args) -> dict:
    """Every mode of every encoder; the files are rewritten after each (a kill leaves them)."""
    t_start = time.perf_counter()
    report = {"environment": environment(args), "encoders": {}, "cohort": "", "seconds": 0.0}
    report["decode_check"] = {}
    prepare(args)
    report["cohort"] = cohort_rows(args)
    report["decode_check"] = decode_check(args)
    print(f"[gpu_check] decode check: {report['decode_check']}", file=sys.stderr)
    modes = ["model"] + [m for m in MODE_ORDER[1:] if m in args.modes.split(",")]
    for encoder in args.encoders.split(","):
        rows: dict[str, dict] = {}
        n_e2e = 0
        report["encoders"][encoder] = rows
        for mode in modes:
            report["seconds"] = time.perf_counter() - t_start
            write(args, report)
            if mode == "e2e_gpu" and args.device != "cuda":
                rows[mode] = {"skipped": "no CUDA device: --decode gpu not measured"}
                continue
            if time.perf_counter() - t_start > args.budget_s:
                rows[mode] = {"skipped": f"over the {args.budget_s:.0f} s budget"}
                continue
            n = args.baseline_tiles if mode == "baseline" else n_e2e
            rows[mode] = run_mode(args, mode, encoder, n)
            if mode == "model":
                tps = rows[mode].get("tiles_per_s", 0.0)
                n_e2e = int(min(args.max_tiles, max(args.batch_size, tps * args.e2e_seconds)))
            model_tps = rows["model"].get("tiles_per_s")
            if model_tps and "tiles_per_s" in rows[mode]:
                rows[mode]["ratio_to_model"] = rows[mode]["tiles_per_s"] / model_tps
            print(f"[gpu_check] {encoder} {mode}: {_cell(rows[mode])}", file=sys.stderr)
    report["seconds"] = time.perf_counter() - t_start
    write(args, report)
    return report


def write(args, report: dict) -> str:
    """Write ``gpu_check.json`` and ``gpu_check.md`` to ``args.out``; returns the markdown."""
    out = Path(args.out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    return text


def _cell(r: dict) -> str:
    if "tiles_per_s" in r:
        return f"{r['tiles_per_s']:.1f} tiles/s ({r['tiles']} tiles)"
    return r.get("error") or r.get("skipped") or "?"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# gpu_check ({'quick' if env['quick'] else 'full'})",
        "",
        f"device {env['device']} ({env['gpu'] or 'no GPU'}), {env['cpus_usable']} usable CPUs, "
        f"{env['workers']} loader workers, batch {env['batch_size']}, torch {env['torch']}, "
        f"torchvision {env['torchvision']}; cohort: {report['cohort']}; "
        f"run time {report['seconds']:.0f} s",
        "",
        "| encoder | mode | tiles | tiles/s | / model | CPU cores busy | GPU peak MB | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for enc, rows in report["encoders"].items():
        for mode, r in rows.items():
            if "tiles_per_s" not in r:
                note = r.get("error") or r.get("skipped", "")
                lines.append(f"| {enc} | {LABELS[mode]} | | | | | | {note} |")
                continue
            gpu = f"{r['gpu_peak_mb']:.0f}" if r.get("gpu_peak_mb") is not None else "-"
            lines.append(
                f"| {enc} | {LABELS[mode]} | {r['tiles']} | {r['tiles_per_s']:.1f} | "
                f"{r.get('ratio_to_model', 0):.2f} | {r['cpu_cores']:.1f} | {gpu} | "
                f"{r.get('note', '')} |"
            )
    lines += ["", "Decoded tiles vs references (max / mean abs difference, 0-255):", ""]
    for name, d in report["decode_check"].items():
        lines.append(f"- {name}: {d}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    if args._child:  # one mode in a child process: JSON on stdout
        spec = json.loads(args._child)
        print(json.dumps(measure(args, spec["mode"], spec["encoder"], spec["n_tiles"])))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run_all(args)
    print(markdown(report))
    failed = [
        f"{e} {m}"
        for e, rows in report["encoders"].items()
        for m, r in rows.items()
        if "error" in r
    ]
    bad_decode = [k for k, d in report["decode_check"].items() if not d.get("ok", False)]
    if failed or bad_decode:
        print(f"[gpu_check] FAILED: {', '.join(failed + bad_decode)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
