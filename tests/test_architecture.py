"""The layering of src/emmito (docs/architecture.md), checked on the source.

- Stage modules import only ground modules, never another stage (imports
  inside functions count too).
- Ground modules import neither stages nor the top layer.
- The on-disk contract (dataset name, attribute keys, the results layout) is
  spelled only in emmito.contract.
- Functions stay short: none over 80 lines, no ``run_cli`` over 24.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "emmito"

STAGES = {"convert", "train", "infer", "merge", "segment", "tune", "trace", "upsample", "evaluate", "export", "measure", "suggest"}
TOP = {"cli", "report", "view", "summary", "crop", "__main__"}
CONTRACT = "contract"
FORBIDDEN_LITERALS = ('"main"', '"volume_depth"', '"downsample_xy"', '"channels"', '"voxel_size"', '"offset"', '"results/')
MAX_FUNCTION_LINES = 80
MAX_RUN_CLI_LINES = 24


def modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def emmito_imports(path: Path) -> set[str]:
    """Every emmito module that ``path`` imports, at any depth (functions included)."""
    names: set[str] = set()
    package = set(modules())
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "emmito" and len(parts) > 1:
                    names.add(parts[1])
        elif isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] != "emmito":
                continue
            if len(parts) > 1:
                names.add(parts[1])
            else:  # from emmito import x, y
                names.update(alias.name for alias in node.names if alias.name in package)
    return names - {path.stem}


def test_every_stage_module_exists() -> None:
    assert STAGES <= set(modules()), sorted(STAGES - set(modules()))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_imports_no_other_stage(stage: str) -> None:
    wrong = sorted(emmito_imports(modules()[stage]) & STAGES)
    assert not wrong, f"emmito.{stage} imports stage module(s) {wrong}: move the shared piece into a ground module"


def test_ground_modules_import_no_stage_and_no_top_layer() -> None:
    ground = set(modules()) - STAGES - TOP
    wrong = {name: sorted(emmito_imports(modules()[name]) & (STAGES | TOP)) for name in sorted(ground)}
    wrong = {name: found for name, found in wrong.items() if found}
    assert not wrong, f"ground modules import stages or the top layer: {wrong}"


def test_the_import_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from emmito.segment import decode\n    import emmito.trace\n    from emmito import io\n")
    assert emmito_imports(source) == {"segment", "trace", "io"}


def test_the_contract_is_spelled_only_in_the_contract_module() -> None:
    found = []
    for name, path in modules().items():
        if name == CONTRACT:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for literal in FORBIDDEN_LITERALS:
                if literal in line or literal.replace('"', "'") in line:
                    found.append(f"{path.name}:{number}: {literal}")
    assert not found, "contract names spelled outside emmito.contract:\n" + "\n".join(found)


def function_lengths() -> list[tuple[str, str, int]]:
    lengths = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((name, node.name, node.end_lineno - node.lineno + 1))
    return lengths


def test_no_function_is_over_80_lines() -> None:
    long = [f"{m}.{f}: {n} lines" for m, f, n in function_lengths() if n > MAX_FUNCTION_LINES]
    assert not long, "split these functions:\n" + "\n".join(long)


def test_every_run_cli_is_a_thin_wrapper() -> None:
    long = [f"{m}.run_cli: {n} lines" for m, f, n in function_lengths() if f == "run_cli" and n > MAX_RUN_CLI_LINES]
    assert not long, "move the work of these run_cli into the stage's functions:\n" + "\n".join(long)


def test_the_literal_checker_matches_both_quotes() -> None:
    line = "x = attrs['voxel_size']"
    assert any(literal.replace('"', "'") in line for literal in FORBIDDEN_LITERALS)
    assert re.search(r"\"main\"", 'ds = f["main"]')
