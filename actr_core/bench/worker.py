"""One benchmark case in its own process: ``python -m actr_core.bench.worker``.

# b batch · H W input frame · h w flow grid (H/4, W/4) · n keypoints · 2 (x, y)

The process reads one JSON request per line on stdin and answers one JSON line on its *original*
stdout; anything the measured code prints goes to stderr (the released ACTR code prints while it
builds). :class:`actr_core.bench.runner.BenchWorker` is the client. Requests (``"op"``):

``setup``
    build the model ``factory(**kwargs)`` (``"package.module:function"``), make the seeded inputs
    (``(batch, 3, H, W)`` source and target, the same in every process for the same seed), return
    the parameter counts and the resident memory after the imports (the baseline) and after
    building (the C heap trimmed). ``memory_limit_mb`` caps the process's data segment
    (``RLIMIT_DATA``, anonymous mappings included): an allocation beyond it raises, so a case too
    large for the machine fails alone instead of calling the kernel's out-of-memory killer.
``forward``
    one timed forward pass (inference mode, bf16 autocast if asked) → wall seconds, and the CPU
    seconds of all the process's threads (less sensitive to other processes' load than wall time).
``matmul``
    one timed dense ``n × n`` product in ``dtype`` → seconds (the yardstick, interleaved).
``reset_peak`` / ``peak``
    reset / read the peak memory (RSS on CPU, ``max_memory_allocated`` on GPU), MiB.
``flops``
    FLOPs of one forward pass (``FlopCounterMode``, fused attention counted) per pair.
``train_setup`` / ``train_step``
    training mode, AdamW over the trainable parameters, a seeded batch of ``train_batch`` pairs of
    the shard schema; one timed step (forward, ``model.loss``, backward, optimiser step) → seconds.
``save_output`` / ``save_state``
    write the flow of the fixed inputs / the state dict to a file (for equality checks).
``quit``

A model is anything whose ``forward(src, trg)`` returns an object with a ``flow`` attribute and
whose ``loss(output, batch)`` gives a scalar (every :class:`actr_core.models.Matcher`).
"""

import contextlib
import importlib
import json
import os
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

import actr_core.models  # noqa: F401  - imported before the baseline is read, in every worker alike
from actr_core.bench.flops import count_flops
from actr_core.bench.memory import peak_rss_mb, release_free_memory, reset_peak_rss, rss_mb
from actr_core.bench.rates import MATMUL_SIDE, _operands, matmul_flops, matmul_seconds
from actr_core.models.base import parameter_count

__all__ = ["BenchState", "load_factory", "main", "synthetic_batch"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
NUM_KEYPOINTS = 10  # keypoints per pair of the synthetic training batch
VALID_FLOW_FRACTION = 0.2  # share of flow cells with ground truth in the synthetic batch
FLOW_RANGE = 8.0  # synthetic ground-truth displacements are uniform in ±FLOW_RANGE flow-grid pixels
LEARNING_RATE = 1e-6  # AdamW step size of the timed training steps (small: the weights barely move)
MIB = 2**20


def load_factory(path: str) -> Callable[..., Any]:
    """The callable named ``"package.module:function"``."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"factory = {path!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def synthetic_batch(
    batch: int, height: int, width: int, *, seed: int, stride: int = 4, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """A seeded training batch of the shard schema: images, keypoints and a sparse flow target."""
    g = torch.Generator().manual_seed(seed + 1)
    h, w = height // stride, width // stride
    size = torch.tensor([width - 1.0, height - 1.0])
    src_kps = torch.rand(batch, NUM_KEYPOINTS, 2, generator=g) * size
    trg_kps = torch.rand(batch, NUM_KEYPOINTS, 2, generator=g) * size
    out = {
        "src_image": torch.randn(batch, 3, height, width, generator=g),
        "trg_image": torch.randn(batch, 3, height, width, generator=g),
        "src_kps": src_kps,
        "trg_kps": trg_kps,
        "valid_kps": torch.ones(batch, NUM_KEYPOINTS, dtype=torch.bool),
        "flow": (torch.rand(batch, 2, h, w, generator=g) * 2 - 1) * FLOW_RANGE,
        "valid_flow": torch.rand(batch, h, w, generator=g) < VALID_FLOW_FRACTION,
    }
    return {k: v.to(device) for k, v in out.items()}


class BenchState:
    """What one worker process holds: the model, its inputs, and the request handlers."""

    def __init__(self) -> None:
        self.baseline_mb = rss_mb()
        self.model: torch.nn.Module | None = None
        self.runner: Callable[..., Any] | None = None
        self.options: dict[str, Any] = {}
        self.operands: dict[str, Any] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.batch: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return torch.device(self.options.get("device", "cpu"))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        dtype = self.options.get("autocast")
        if dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=DTYPES[dtype]):
                yield

    def _inputs(self, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        h, w = self.options["height"], self.options["width"]
        dtype = DTYPES[self.options.get("dtype", "float32")]
        src = torch.randn(batch, 3, h, w, generator=g).to(self.device, dtype)
        trg = torch.randn(batch, 3, h, w, generator=g).to(self.device, dtype)
        if self.options.get("channels_last"):
            src, trg = (x.contiguous(memory_format=torch.channels_last) for x in (src, trg))
        return src, trg

    # ------------------------------------------------------------------ requests
    def setup(
        self,
        *,
        factory: str,
        kwargs: dict[str, Any] | None = None,
        height: int,
        width: int,
        batch: int = 1,
        train_batch: int = 2,
        seed: int = 0,
        threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        autocast: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
        memory_limit_mb: float | None = None,
    ) -> dict[str, Any]:
        if threads is not None:
            torch.set_num_threads(threads)
        if memory_limit_mb is not None:  # an allocation beyond it fails (an error reply), not the machine
            limit = int(memory_limit_mb * MIB)
            resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
        self.options = dict(
            height=height, width=width, batch=batch, train_batch=train_batch, seed=seed, device=device,
            dtype=dtype, autocast=autocast, channels_last=channels_last, compile=compile,
        )
        torch.manual_seed(seed)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random-initialisation notices and the like
            model = load_factory(factory)(**(kwargs or {}))
        model = model.to(self.device, DTYPES[dtype]).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.runner = torch.compile(model) if compile else model
        self.src, self.trg = self._inputs(batch, seed)
        build_s = time.perf_counter() - start
        release_free_memory()
        return {
            "params": parameter_count(model),
            "trainable_params": parameter_count(model, trainable_only=True),
            "rss_baseline_mb": self.baseline_mb,
            "rss_model_mb": rss_mb(),
            "build_s": build_s,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }

    def forward(self) -> dict[str, Any]:
        assert self.runner is not None, "setup first"
        self._sync()
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode(), self._autocast():
            self.runner(self.src, self.trg)
        self._sync()
        return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}

    def matmul(self, *, dtype: str = "float32", n: int = MATMUL_SIDE) -> dict[str, Any]:
        key = f"{dtype}:{n}"
        if key not in self.operands:
            a, b = _operands(n, DTYPES[dtype])
            self.operands[key] = (a.to(self.device), b.to(self.device))
            matmul_seconds(DTYPES[dtype], n, operands=self.operands[key])  # warm-up
        self._sync()
        seconds = matmul_seconds(DTYPES[dtype], n, operands=self.operands[key])
        self._sync()
        return {"seconds": seconds, "flops": matmul_flops(n)}

    def reset_peak(self) -> dict[str, Any]:
        """Drop the yardstick's operands, return free heap pages, and restart the peak from here."""
        self.operands.clear()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return {"reset": True, "current_mb": torch.cuda.memory_allocated(self.device) / MIB}
        release_free_memory()
        return {"reset": reset_peak_rss(), "current_mb": rss_mb()}

    def peak(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"peak_mb": torch.cuda.max_memory_allocated(self.device) / MIB, "kind": "cuda_allocated"}
        return {"peak_mb": peak_rss_mb(), "kind": "rss"}

    def flops(self) -> dict[str, Any]:
        assert self.model is not None, "setup first"
        src, trg = self._inputs(1, self.options["seed"])
        with torch.inference_mode(), self._autocast():
            total, per_op = count_flops(self.model, src, trg)
        return {"flops": total, "per_op": per_op}

    def train_setup(self) -> dict[str, Any]:
        assert self.model is not None, "setup first"
        o = self.options
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
        self.batch = synthetic_batch(o["train_batch"], o["height"], o["width"], seed=o["seed"], device=str(self.device))
        dtype = DTYPES[o["dtype"]]
        for key in ("src_image", "trg_image", "flow"):
            self.batch[key] = self.batch[key].to(dtype)
        return {"trainable_params": sum(p.numel() for p in params)}

    def train_step(self) -> dict[str, Any]:
        assert self.runner is not None and self.optimizer is not None, "train_setup first"
        batch = self.batch
        self._sync()
        start, cpu = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.runner(batch["src_image"], batch["trg_image"])
            loss = self.model.loss(out, batch)
        loss.backward()
        self.optimizer.step()
        self._sync()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "loss": float(loss.detach())}

    def save_output(self, *, path: str) -> dict[str, Any]:
        assert self.runner is not None, "setup first"
        self.model.eval()
        with torch.inference_mode(), self._autocast():
            flow = self.runner(self.src, self.trg).flow
        torch.save(flow.detach().float().cpu(), path)
        return {"path": path, "shape": list(flow.shape)}

    def save_state(self, *, path: str) -> dict[str, Any]:
        assert self.model is not None, "setup first"
        torch.save(self.model.state_dict(), path)
        return {"path": path}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.pop("op")
        if op == "quit":
            return {}
        handler = getattr(self, op, None) if not op.startswith("_") else None
        if handler is None or op in ("handle", "device"):
            raise ValueError(f"unknown request {op!r}")
        return handler(**request)


def main() -> None:
    """Serve requests from stdin until ``quit`` or end of input."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints of the measured code go to stderr
    state = BenchState()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        try:
            reply = {"ok": True, **state.handle(request)}
        except Exception:  # noqa: BLE001 - reported to the client, which raises
            reply = {"ok": False, "error": traceback.format_exc()}
        protocol.write(json.dumps(reply) + "\n")
        if op == "quit":
            break


if __name__ == "__main__":
    main()
