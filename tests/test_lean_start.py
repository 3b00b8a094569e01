"""A lean start: ``import ovdense`` and ``ovdense --help`` load neither torch nor open_clip nor
mmcv (checked on ``sys.modules`` in a fresh interpreter, never on time); the public names still
load on first use."""

import json
import subprocess
import sys

HEAVY = ("torch", "torchvision", "open_clip", "mmcv", "mmengine", "mmseg", "triton")


def loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; return which heavy modules it left in sys.modules."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return {"heavy": json.loads(done.stdout.strip().splitlines()[-1]), "stdout": done.stdout}


def test_import_ovdense_loads_nothing_heavy():
    assert loaded_after("import ovdense")["heavy"] == []


def test_help_loads_nothing_heavy():
    run = loaded_after("from ovdense.cli import main\n"
                       "try:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert run["heavy"] == [] and "segment" in run["stdout"]


def test_method_table_is_torch_free_and_is_the_one_dense_uses():
    run = loaded_after("import ovdense\nprint(ovdense.list_methods())")
    assert run["heavy"] == []
    from ovdense.backbone.dense import METHODS
    from ovdense.backbone.protocols import METHOD_INFO

    assert str(list(METHODS)) in run["stdout"]
    for name, spec in METHODS.items():
        info = METHOD_INFO[name]
        assert (spec.paper, spec.change, spec.protocol, spec.capture) == (
            info.paper, info.change, info.protocol, info.capture)


def test_public_names_load_on_first_use():
    run = loaded_after("import ovdense\n"
                       "print(ovdense.Segmenter.__module__, ovdense.create_backbone.__module__)")
    assert "ovdense.heads.training_free ovdense.backbone.clip" in run["stdout"]
    assert "torch" in run["heavy"]


def test_all_and_dir_are_truthful():
    import ovdense

    assert set(ovdense.__all__) <= set(dir(ovdense))
    for name in ovdense.__all__:
        assert getattr(ovdense, name) is not None
    from ovdense import Segmenter
    from ovdense.heads.training_free import Segmenter as defined

    assert Segmenter is defined
    try:
        ovdense.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
