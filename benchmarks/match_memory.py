"""Memory and time of ``actr match`` on a very large pair: peak RSS and wall time of the whole command.

    python benchmarks/match_memory.py --checkpoint runs/quickstart/model_best.pt          (6000 × 4000 JPEGs)
    python benchmarks/match_memory.py --checkpoint runs/quickstart/model_best.pt --width 8000 --height 6000
    python benchmarks/match_memory.py --dry-run                      (a small pair and a random model: the plumbing)

Writes a source and a target JPEG of ``--width × --height`` (matplotlib's bundled ``grace_hopper.jpg``
enlarged; the target is the same photo shifted and rotated a little), then runs
``python -m pipelines.match SRC TRG --checkpoint ...`` in a subprocess limited to ``--threads``
threads and prints: the subprocess's peak resident memory (``resource.getrusage(RUSAGE_CHILDREN)``,
the maximum over its lifetime), its wall time, the part of it spent after the imports (the
matching itself: reading, reducing, the model both ways, drawing, writing), and its CPU time
(user + system), which other work on the machine does not inflate the way it inflates wall time. Targets of the
project: 2 GiB and 15 s on 2 cores with the main job's model. A benchmark prints figures; it
asserts nothing about them.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RSS_GIB, TARGET_SECONDS = 2.0, 15.0  # the project's targets for a 6000 × 4000 pair on 2 cores
# The child: time the imports apart from the matching (everything the command imports, imported first),
# then run actr match's own entry point.
CHILD = """
import resource, sys, time
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
start = time.perf_counter()
import matplotlib.figure, torch
import actr_core.api, actr_core.metrics, actr_core.training, actr_core.viz.matches
from pipelines.entry import run
from pipelines import match
imported, imported_cpu = time.perf_counter(), cpu()
status = run(match.cli, sys.argv[1:], prog="actr match")
print(f"TIMES import_s={imported - start:.3f} match_s={time.perf_counter() - imported:.3f} "
      f"match_cpu_s={cpu() - imported_cpu:.3f}", flush=True)
sys.exit(status)
"""


def write_pair(folder: Path, width: int, height: int) -> tuple[Path, Path]:
    """A source and a target JPEG of ``width × height`` (a photo, and the photo shifted and rotated)."""
    from matplotlib import cbook
    from PIL import Image

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    source = photo.resize((width, height), Image.Resampling.BILINEAR)
    target = source.rotate(4, resample=Image.Resampling.BILINEAR, translate=(width // 30, height // 40))
    paths = folder / "source.jpg", folder / "target.jpg"
    for image, path in zip((source, target), paths, strict=True):
        image.save(path, quality=90)
    return paths


def measure(argv: Sequence[str], threads: int) -> dict[str, float]:
    """Run ``actr match argv`` in a subprocess; its exit status, peak RSS (GiB) and times (s)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"actr match exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    times = dict(word.split("=") for word in done.stdout.split("TIMES ")[-1].split())
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the finished subprocess (and any earlier ones)
    return {
        "status": done.returncode,
        "peak_rss_gib": usage.ru_maxrss / 2**20,  # KiB on Linux
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": wall,
        "import_s": float(times["import_s"]),
        "match_s": float(times["match_s"]),
        "match_cpu_s": float(times["match_cpu_s"]),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint of actr train (the main job's model)")
    parser.add_argument("--width", type=int, default=6000, help="source and target width in pixels (default 6000)")
    parser.add_argument("--height", type=int, default=4000, help="source and target height in pixels (default 4000)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the match (default 2)")
    parser.add_argument("--dry-run", action="store_true", help="a 160 × 120 pair and a random actr_conv_tiny: the plumbing only")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.width, args.height = 160, 120
        model = ["--model", "actr_conv_tiny", "--size", "64"]
    elif args.checkpoint is None:
        parser.error("give --checkpoint PATH (or --dry-run)")
    else:
        model = ["--checkpoint", str(args.checkpoint)]
    with tempfile.TemporaryDirectory(prefix="match_memory_") as tmp:
        source, target = write_pair(Path(tmp), args.width, args.height)
        figures = measure([str(source), str(target), *model, "--out", str(Path(tmp) / "out")], args.threads)
        report = json.loads((Path(tmp) / "out" / "matches.json").read_text())
    figures.update(width=args.width, height=args.height, threads=args.threads, matches=len(report["confidence"]))
    print(
        f"actr match on a {args.width} × {args.height} pair, {args.threads} thread(s): peak RSS {figures['peak_rss_gib']:.2f} GiB "
        f"(target {TARGET_RSS_GIB:g}), wall {figures['wall_s']:.1f} s of which imports {figures['import_s']:.1f} s and "
        f"matching {figures['match_s']:.1f} s (target {TARGET_SECONDS:g} s); CPU time {figures['cpu_s']:.1f} s, "
        f"{figures['match_cpu_s']:.1f} s of it matching (wall time on idle CPUs is at most about this); "
        f"{figures['matches']} matches; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    return figures


if __name__ == "__main__":
    main()
