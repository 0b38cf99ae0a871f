"""`import common` / `import threed` need torch only (DESIGN: lazy optional deps)."""

import subprocess
import sys

HEAVY = ("transformers", "open3d", "spconv", "matplotlib", "decord", "av", "PIL", "cumm")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_import_common_and_threed_need_torch_only():
    code = (
        "import common, common.engine, threed, threed.vggt, threed.scannet, threed.tsp3d\n"
        "import threed.evaluation\n"
        "from threed import VGGT, TokenMerging, TextGuidedPruning, load_scene"
    )
    assert _loaded_after(code) == []


def test_lazy_exports_resolve():
    import threed

    for name in threed.__all__:
        assert getattr(threed, name) is not None
