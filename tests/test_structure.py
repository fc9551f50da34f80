"""Structure: the engine never imports service code, and planning never imports torch."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def imported_after(code: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    return set(done.stdout.split())


def test_planning_a_merge_needs_no_torch(tmp_path):
    from merge_engine.synthetic import tiny_state_dict, write_checkpoint

    for name in ("a", "b"):
        write_checkpoint(tmp_path / f"{name}.safetensors", tiny_state_dict("sd2"))
    modules = imported_after(
        "from merge_engine.plan import plan\n"
        "from merge_engine.recipe import parse_recipe\n"
        "from merge_engine.resolve import FileResolver\n"
        "import merge_engine.a1111, merge_engine.inspect, merge_engine.cli\n"
        f"plan(parse_recipe({{'merge': {{'method': 'uniform', 'models': ['a.safetensors', 'b.safetensors']}}}}),"
        f" FileResolver({str(tmp_path)!r})).close()"
    )
    assert "torch" not in modules


def test_engine_imports_no_service_code():
    modules = imported_after("import merge_engine.cli, merge_engine.execute, merge_engine.synthetic")
    assert not modules & {"fastapi", "sqlalchemy", "celery", "app", "worker", "starlette"}


def test_test_modules_have_distinct_names():
    """pytest imports test modules by their base name (no packages under tests/): two files of one
    name in different folders stop the whole run at collection."""
    from collections import Counter
    from pathlib import Path

    names = Counter(path.name for path in Path(__file__).parent.rglob("test_*.py"))
    assert [name for name, n in names.items() if n > 1] == []
