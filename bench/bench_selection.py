"""The selection benchmark on data anyone has offline: runs `thresher -m +experiment=selection_benchmark`
and prints its table (benchmark.md), with the command, machine and time.

    .venv/bin/python bench/bench_selection.py --data shapes                    # synthetic, no extra package
    .venv/bin/python bench/bench_selection.py --data digits                    # needs scikit-learn
    .venv/bin/python bench/bench_selection.py --data digits --samplers random,coreset,typical \\
        --budgets 0.05,0.1,0.2 --seeds 1,2,3 --epochs 30
    .venv/bin/python bench/bench_selection.py --data digits --ssl-epochs 20      # SSL embeddings, made once

digits: scikit-learn's handwritten digits (1797 8x8 images, 10 classes, shipped inside its wheel),
written as PNG class folders upscaled to --size px, then run as data=folder. shapes: thresher's
own synthetic shapes (3 classes, easy). Everything else is the preset's (held-out split, cosine
schedule); `--set key=value` passes more overrides. --ssl-epochs N first trains the backbone
self-supervised once (enable_training=true, stages=[scan,embed], on the same held-out split) and
gives every job its data/embeddings.csv through embeddings=, instead of each job embedding with
random weights. scikit-learn is not a thresher dependency:
`.venv/bin/pip install scikit-learn` for --data digits.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_digits(folder: Path, size: int) -> int:
    """scikit-learn's digits as <folder>/<digit>/<index>.png, grey, upscaled to size x size."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("--data digits needs scikit-learn: .venv/bin/pip install scikit-learn")
    import numpy as np
    from PIL import Image

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        target = folder / str(label) / f"{index:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).convert("RGB").save(target)
    return len(digits.images)


def ssl_embeddings(data_overrides: list, epochs: int, env: dict):
    """One run of scan and embed with enable_training=true on the sweep's data and held-out split;
    returns its data/embeddings.csv (None on failure, with the run's output printed)."""
    command = [sys.executable, "-m", "app", *data_overrides, "enable_training=true", f"ssl.epochs={epochs}",
               "stages=[scan,embed]", "note=bench_ssl_embeddings"]
    print("# " + " ".join(command[1:]))
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    runs = sorted(Path(env["THRESHER_WORK_DIR"]).glob("*_bench_ssl_embeddings"))
    if result.returncode != 0 or not runs or not (runs[-1] / "data/embeddings.csv").is_file():
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
        print(f"the SSL embedding run failed (exit code {result.returncode})")
        return None
    fell = [line.split("] - ")[-1] for line in result.stderr.splitlines() + result.stdout.splitlines()
            if "no-learning level" in line]
    print(f"# SSL embeddings in {(time.perf_counter() - started) / 60:.1f} min; {fell[-1] if fell else ''}")
    return runs[-1] / "data/embeddings.csv"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("shapes", "digits"), default="shapes")
    parser.add_argument("--samplers", default="random,coreset")
    parser.add_argument("--budgets", default="0.02,0.05,0.1,0.2")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--size", type=int, default=32,
                        help="the image size the model trains at (digits: written at it)")
    parser.add_argument("--n-images", type=int, default=480, help="shapes: how many images")
    parser.add_argument("--holdout", type=float, default=0.2, help="data.holdout_fraction (0: the preset's own)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the sweep goes (default: a temp folder)")
    parser.add_argument("--set", action="append", default=[], help="a further override, key=value")
    parser.add_argument("--ssl-epochs", type=int, default=0,
                        help="train SSL embeddings once for this many epochs and share them (0: random weights)")
    args = parser.parse_args()

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_selection_"))
    # what every run of the benchmark shares (the SSL run too), then what the sweep varies
    data = ["hardware=cpu", f"data.image_size={args.size}"]
    if args.data == "digits":
        folder = work_dir / "digits"
        n_images = write_digits(folder, args.size)
        # a mirrored digit is another digit (or none): no flips
        data += ["data=folder", f"data.input_dir={folder}", "data.augment.hflip=0"]
    else:
        n_images = args.n_images
        data += [f"data.n_images={n_images}", f"data.shapes_image_size={max(32, args.size)}"]
    if args.holdout > 0:
        data.append(f"data.holdout_fraction={args.holdout}")
    data += args.set
    overrides = ["-m", "+experiment=selection_benchmark", f"note=bench_{args.data}", f"sampler={args.samplers}",
                 f"sampler.stopping_condition.n_samples={args.budgets}", f"seed={args.seeds}",
                 f"trainer.epochs={args.epochs}", *data]

    env = {**os.environ, "THRESHER_WORK_DIR": str(work_dir / "runs"), "PYTHONUNBUFFERED": "1"}
    env.setdefault("THRESHER_CACHE_DIR", str(work_dir / "cache"))
    if args.ssl_epochs > 0:
        embeddings = ssl_embeddings(data, args.ssl_epochs, env)
        if embeddings is None:
            return 1
        overrides.append(f"embeddings={embeddings}")
    command = [sys.executable, "-m", "app", *overrides]
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.data}: {n_images} images")
    print("# " + " ".join(command[1:]))
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    duration = time.perf_counter() - started
    sweeps = sorted((work_dir / "runs/multirun").glob("*"))
    if not sweeps or not (sweeps[-1] / "benchmark.md").is_file():
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
        print(f"no benchmark.md was written (exit code {result.returncode})")
        return 1
    print((sweeps[-1] / "benchmark.md").read_text())
    print(f"# {duration / 60:.1f} min in all (exit code {result.returncode}, load {os.getloadavg()[0]:.1f}); "
          f"sweep: {sweeps[-1]}")
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
