"""Compare ACTR as released in actr_core with the released code itself, on the same weights and input.

Needs a checkout of the released code (github YXSUNMADMAX/ACTR), which is never bundled:

    python pipelines/compare_released.py --actr-repo /path/to/ACTR [--checkpoint model_best.pth]

Without ``--checkpoint`` both models use the released code's random initialisation (seeded): the
released model is built with an empty iBOT file, its state dict is loaded into ours with
``load_official_actr``, and both run in eval mode on the same random 256×256 pair. With
``--sharpen K`` the released decoder's q/k projections are scaled by K first, so that attention and
the soft-argmax are far from uniform (a stricter check than the near-uniform random init). Large K
makes the released model itself ill-conditioned: ``--noise-floor`` measures how far the released
model moves when the input changes by 1e-6, the floor below which no fp32 re-implementation can go; ``--dtype float64`` lowers that floor (the
released code rounds its coarse mapping to float32 once, in ``unnormalise_and_convert_mapping_to_flow``).
Prints the max |difference| of the final flow (and exits 1 above ``--tol``, 1e-4 by default).
``--write-key-table PATH`` also writes the released state dict's names and shapes as JSON (this is
how ``tests/fixtures/actr_released_keys.json`` was made).
"""

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_released(repo: Path, empty_ibot: Path) -> torch.nn.Module:
    """The released ``ACTR`` with its own random initialisation (as in its training script)."""
    if not (repo / "models" / "ACTR.py").is_file():
        raise SystemExit(f"{repo} is not a checkout of the released ACTR code (no models/ACTR.py)")
    sys.path.insert(0, str(repo))
    from models.ACTR import ACTR  # the released code, from the checkout

    with contextlib.redirect_stdout(io.StringIO()):  # it prints every backbone key it fails to load
        return ACTR(ibot_ckp_file=str(empty_ibot), feature_size=64, depth=6, num_heads=8, mlp_ratio=4, freeze=True)


def write_key_table(model: torch.nn.Module, path: Path) -> None:
    """Write the released state dict as JSON, one key a line: ``name: [shape, dtype, is_parameter]``."""
    params = {name for name, _ in model.named_parameters()}
    lines = [
        f"  {json.dumps(name)}: {json.dumps([list(t.shape), str(t.dtype).removeprefix('torch.'), name in params])}"
        for name, t in model.state_dict().items()
    ]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {len(lines)} keys to {path}")


def sharpen_decoder(model: torch.nn.Module, factor: float) -> None:
    """Scale the q and k rows of every decoder attention projection by ``factor`` (in place)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("decoder.") and ".qkv." in name:
                dim = param.shape[0] // 3
                param[: 2 * dim] *= factor


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actr-repo", type=Path, required=True, help="checkout of github YXSUNMADMAX/ACTR")
    parser.add_argument("--checkpoint", type=Path, default=None, help="released model_best.pth (optional)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sharpen", type=float, default=1.0, help="scale of the decoder q/k weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument(
        "--noise-floor",
        action="store_true",
        help="also run the released model on the source image plus 1e-6 noise: how much fp32 rounding alone moves it",
    )
    parser.add_argument("--write-key-table", type=Path, default=None, help="also write the key/shape table (JSON)")
    args = parser.parse_args(argv)

    from actr_core.models import load_official_actr

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty_ibot.pth"
        torch.save({}, empty)
        theirs = build_released(args.actr_repo.resolve(), empty)
    if args.write_key_table is not None:
        write_key_table(theirs, args.write_key_table)
    if args.checkpoint is not None:
        raw = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        theirs.load_state_dict(raw.get("state_dict", raw), strict=True)
    if args.sharpen != 1.0:
        sharpen_decoder(theirs, args.sharpen)
    dtype = getattr(torch, args.dtype)
    theirs = theirs.eval().to(args.device, dtype)
    ours = load_official_actr(theirs.state_dict()).eval().to(args.device, dtype)

    src = torch.randn(args.batch, 3, 256, 256, device=args.device, dtype=dtype)
    trg = torch.randn(args.batch, 3, 256, 256, device=args.device, dtype=dtype)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = theirs(src, trg)
        t1 = time.perf_counter()
        out = ours(src, trg)
        t2 = time.perf_counter()
        floor = None
        if args.noise_floor:
            floor = (theirs(src + 1e-6 * torch.randn_like(src), trg) - ref).abs().max().item()
    diff = (ref - out.flow).abs().max().item()
    print(f"released code flow {tuple(ref.shape)}, ours {tuple(out.flow.shape)}")
    print(
        f"flow range [{ref.min().item():.3f}, {ref.max().item():.3f}] (64-grid cells), "
        f"per-path spread {out.flows_per_path.std(dim=1).mean().item():.4f}"
    )
    print(f"forward: released {t1 - t0:.2f} s, ours {t2 - t1:.2f} s ({args.device}, {args.dtype}, batch {args.batch})")
    if floor is not None:
        print(f"noise floor: max |released(src + 1e-6 noise) - released(src)| = {floor:.3e}")
    print(f"max |released - ours| = {diff:.3e} (tolerance {args.tol:g})")
    if not diff <= args.tol:
        raise SystemExit(1)
    return diff


if __name__ == "__main__":
    main()
