"""Write docs/api.md from the docstrings of the public API (``__all__`` of each package).

python scripts/gen_api_docs.py            # rewrite docs/api.md
python scripts/gen_api_docs.py --check    # exit 1 if docs/api.md is out of date
"""

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
MODULES = (
    "actr_core",
    "actr_core.imaging",
    "actr_core.flow",
    "actr_core.blocks",
    "actr_core.models",
    "actr_core.data",
    "actr_core.metrics",
    "actr_core.viz",
    "actr_core.training",
    "actr_core.hub",
)


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    sig = re.sub(r" at 0x[0-9a-f]+", "", sig)
    return re.sub(r"<class '([\w.]+)'>", r"\1", sig)


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python scripts/gen_api_docs.py` (a test checks it is current).",
        "Shapes use the axis letters of [conventions](conventions.md).",
    ]
    for name in MODULES:
        module = importlib.import_module(name)
        lines += ["", f"## `{name}`", "", _summary(module), ""]
        for item in getattr(module, "__all__", ()):
            obj = getattr(module, item)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                lines.append(f"- `{item}`: constant")
                continue
            kind = "class" if inspect.isclass(obj) else "function"
            target = obj.__init__ if inspect.isclass(obj) and "__init__" in vars(obj) else obj
            sig = _signature(target).replace("(self, ", "(").replace("(self)", "()")
            lines.append(f"- {kind} `{item}{sig}`: {_summary(obj)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print("docs/api.md is out of date: run python scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
