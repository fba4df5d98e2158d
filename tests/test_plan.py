"""Plans and saved folders: round trip, atomic writes, and clear errors on bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from nets import randomize_bn, tiny_resnet
from rankdown import CompressConfig, ParamFraction, Plan, apply_plan, compress, load_compressed, save_compressed
from rankdown.errors import LayerNotFoundError, OutputExistsError, PlanError


@pytest.fixture
def compressed():
    model = randomize_bn(tiny_resnet()).eval()
    return compress(
        model, CompressConfig("tucker2", ParamFraction(0.4)), torch.randn(1, 3, 16, 16), model_spec="nets:tiny_resnet"
    )


def test_round_trip_gives_identical_outputs(tmp_path, compressed):
    out = save_compressed(tmp_path / "run", compressed.model, compressed.plan, {"hello": 1})
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "plan.json", "report.json"]
    fresh = tiny_resnet()  # a newly built original; its weights are all replaced
    loaded = load_compressed(out, fresh)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed.model(x))
    assert str(loaded) == str(compressed.model)


def test_plan_json_round_trip(compressed):
    text = compressed.plan.to_json()
    d = json.loads(text)
    assert d["format"] == "rankdown-plan" and d["version"] == 1 and d["model"] == "nets:tiny_resnet"
    assert Plan.from_json(text).to_dict() == d
    some = next(iter(d["layers"].values()))
    assert set(some) == {"method", "rank", "layer_type", "weight_shape"}


def test_apply_plan_checks_the_model(compressed):
    plan = Plan.from_json(compressed.plan.to_json())
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(LayerNotFoundError):
        apply_plan(model, plan)
    d = json.loads(compressed.plan.to_json())
    d["layers"]["layer1.0.conv1"]["weight_shape"] = [99, 16, 3, 3]
    with pytest.raises(PlanError, match=r"layer1\.0\.conv1.*expects Conv2d"):
        apply_plan(tiny_resnet(), Plan.from_dict(d))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(format="other"), "not a rankdown plan"),
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d["layers"]["fc"].update(method="nope"), "unknown method 'nope'"),
        (lambda d: d["layers"]["fc"].pop("rank"), "malformed plan"),
    ],
)
def test_bad_plans_are_refused(compressed, mutate, match):
    d = json.loads(compressed.plan.to_json())
    mutate(d)
    with pytest.raises(PlanError, match=match):
        Plan.from_dict(d)
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{")


def test_non_empty_output_is_not_overwritten_without_force(tmp_path, compressed):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not empty"):
        save_compressed(out, compressed.model, compressed.plan)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp folders left
    # --force replaces only what rankdown wrote: a folder holding a user's file is refused.
    with pytest.raises(OutputExistsError, match="not a rankdown output.*mine.txt"):
        save_compressed(out, compressed.model, compressed.plan, force=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    (out / "mine.txt").unlink()
    save_compressed(out, compressed.model, compressed.plan)
    save_compressed(out, compressed.model, compressed.plan, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "plan.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failed_write_leaves_nothing(tmp_path, compressed, monkeypatch):
    import rankdown.planning.plan as plan_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(plan_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(tmp_path / "run", compressed.model, compressed.plan)
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_weights(tmp_path, compressed):
    out = save_compressed(tmp_path / "run", compressed.model, compressed.plan)
    (out / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(PlanError, match="could not be read"):
        load_compressed(out, tiny_resnet())
    save_file({"x": torch.zeros(2)}, str(out / "model.safetensors"))
    with pytest.raises(PlanError, match="does not match"):
        load_compressed(out, tiny_resnet())
    (out / "model.safetensors").unlink()
    with pytest.raises(PlanError, match="no model.safetensors"):
        load_compressed(out, tiny_resnet())
    with pytest.raises(PlanError, match="no plan.json"):
        load_compressed(tmp_path, tiny_resnet())
