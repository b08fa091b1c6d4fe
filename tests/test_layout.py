"""Dependencies point one way: ops <- models <- {checkpoint, generation, train, serve} <- cli."""

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rwkvpy"
ABOVE = ("checkpoint", "generation", "train", "cli", "loading", "bench", "serve")


def imports(path: Path) -> list[str]:
    """Every module a file imports, deferred imports included."""
    text = path.read_text()
    found = re.findall(r"^\s*from\s+([.\w]+)\s+import", text, flags=re.M)
    found += re.findall(r"^\s*import\s+([.\w]+)", text, flags=re.M)
    return found


def test_ops_and_models_import_nothing_above_them():
    bad = []
    for layer in ("ops", "models"):
        for path in (SRC / layer).glob("*.py"):
            for module in imports(path):
                parts = module.lstrip(".").split(".")
                top = parts[1] if parts[0] == "rwkvpy" and len(parts) > 1 else parts[0]
                if module.startswith(".") or module.startswith("rwkvpy"):
                    if top in ABOVE:
                        bad.append(f"{path.relative_to(SRC)} imports {module}")
    assert not bad, bad


def test_ops_import_no_model():
    bad = [f"{p.name}: {m}" for p in (SRC / "ops").glob("*.py") for m in imports(p)
           if "models" in m.split(".")]
    assert not bad, bad
