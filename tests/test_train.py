"""Training engine: exact resume, determinism, distillation and freezing, Force Regularization, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rankdown.decompose import energy_rank, singular_values
from rankdown.errors import RankdownError
from rankdown.training.train import ForceRegularizer, TrainConfig, finetune
from rankdown.zoo.fashion import Split

HERE = Path(__file__).parent


def synthetic(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    w = torch.randn(64, 4, generator=g)
    return Split(x, (x.reshape(n, -1) @ w).argmax(1))


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(512, 4))


CFG = TrainConfig(epochs=3, batch_size=32, lr=3e-3, max_steps_per_epoch=5)


def weights(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def test_same_seed_same_result_and_loss_falls():
    a, b = small_model(), small_model()
    ha = finetune(a, synthetic(), CFG)
    finetune(b, synthetic(), CFG)
    assert torch.equal(weights(a), weights(b))
    assert ha[-1]["train_loss"] < ha[0]["train_loss"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    straight = small_model()
    finetune(straight, synthetic(), CFG, checkpoint_dir=tmp_path / "a")
    import rankdown.training.train as tr

    real = tr._save_checkpoint
    calls = []

    def crash_after_first(*a, **k):
        real(*a, **k)
        calls.append(1)
        raise KeyboardInterrupt("killed after epoch 1")

    monkeypatch.setattr(tr, "_save_checkpoint", crash_after_first)
    interrupted = small_model()
    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, synthetic(), CFG, checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(tr, "_save_checkpoint", real)
    assert json.loads((tmp_path / "b/last/meta.json").read_text())["epoch"] == 1
    resumed = small_model()  # a fresh process would start from a fresh model
    history = finetune(resumed, synthetic(), CFG, checkpoint_dir=tmp_path / "b", resume=True)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert torch.equal(weights(resumed), weights(straight))


def test_resume_errors(tmp_path):
    with pytest.raises(RankdownError, match="no checkpoint"):
        finetune(small_model(), synthetic(), CFG, checkpoint_dir=tmp_path, resume=True)
    (tmp_path / "last").mkdir()
    (tmp_path / "last/meta.json").write_text("{}")
    with pytest.raises(RankdownError, match="could not be read"):
        finetune(small_model(), synthetic(), CFG, checkpoint_dir=tmp_path, resume=True)


def test_freeze_dense_trains_only_named_layers_and_distillation_runs():
    model, teacher = small_model(), small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=32, max_steps_per_epoch=3, freeze_dense=True, distill=0.5)
    finetune(model, synthetic(), cfg, teacher=teacher, trainable=["4"])
    after = model.state_dict()
    assert torch.equal(before["0.weight"], after["0.weight"])
    assert not torch.equal(before["4.weight"], after["4.weight"])
    with pytest.raises(RankdownError, match="freeze_dense needs"):
        finetune(small_model(), synthetic(), cfg)
    with pytest.raises(RankdownError, match="distillation weight"):
        finetune(small_model(), synthetic(), TrainConfig(distill=2.0))


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_force_regularization_lowers_effective_rank(kind):
    torch.manual_seed(0)
    layer = nn.Linear(24, 32, bias=False)
    rank0 = energy_rank(singular_values(layer.weight), 0.95)
    g = ForceRegularizer.force_grad(layer.weight, kind)
    # Forces are tangent: to first order they turn filters without changing their norms.
    assert torch.allclose((g * layer.weight).sum(1), torch.zeros(32), atol=1e-4)
    reg = ForceRegularizer({"fc": layer}, strength=0.02 if kind == "l2" else 0.01, kind=kind)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    for _ in range(100):
        opt.zero_grad()
        layer.weight.grad = torch.zeros_like(layer.weight)
        reg.apply()
        opt.step()
    assert energy_rank(singular_values(layer.weight), 0.95) < rank0


def test_force_regularization_in_training_lowers_rank():
    def run(strength):
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))
        torch.manual_seed(0)
        for p in model.parameters():
            nn.init.normal_(p, std=0.2)
        cfg = TrainConfig(epochs=3, batch_size=32, lr=3e-3, force_reg=strength, augment=False, weight_decay=0.0)
        finetune(model, synthetic(512), cfg, regularized={"1": model[1]})
        return energy_rank(singular_values(model[1].weight), 0.95)

    assert run(0.1) < run(0.0)


def _torchrun(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",  # the rendezvous store binds a free port itself: no race between picking and binding
        str(HERE / "ddp_worker.py"),
        str(out),
        *extra,
    ]
    full = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RANKDOWN_QUIET": "1",
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **(env or {}),
    }
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=300)


@pytest.mark.slow
def test_ddp_two_processes_stay_identical_and_resume_after_a_killed_worker(tmp_path):
    p = _torchrun(tmp_path / "a")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "a/result.json").read_text())
    assert res["world"] == 2 and res["sums"][0] == res["sums"][1]  # replicas identical
    losses = [h["train_loss"] for h in res["history"]]
    assert losses[-1] < losses[0]
    # Kill one worker in the middle of epoch 3: epochs 1-2 are checkpointed and survive.
    p = _torchrun(tmp_path / "b", env={"KILL_RANK1_AT_EPOCH": "3"})
    assert p.returncode != 0
    assert json.loads((tmp_path / "b/ckpt/last/meta.json").read_text())["epoch"] == 2
    p = _torchrun(tmp_path / "b", "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = json.loads((tmp_path / "b/result.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]

    def strip(rows):  # throughput is a timing, not a result
        return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]

    assert strip(resumed["history"]) == strip(res["history"])
    assert resumed["sums"][0] == resumed["sums"][1]
    assert resumed["sums"][0] == pytest.approx(res["sums"][0], rel=1e-5)


def test_adaptive_force_is_scaled_to_the_loss_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5, bias=False)
    loss_grad = torch.randn(5, 6) * 7.0
    layer.weight.grad = loss_grad.clone()
    ForceRegularizer({"fc": layer}, strength=0.5, adaptive=True).apply()
    added = layer.weight.grad - loss_grad
    assert float(added.norm()) == pytest.approx(0.5 * float(loss_grad.norm()), rel=1e-5)
    direction = ForceRegularizer.force_grad(layer.weight, "l2")
    assert torch.allclose(added / added.norm(), direction / direction.norm(), atol=1e-6)
