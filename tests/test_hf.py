"""Hugging Face models through the user path: tiny random Llama and BERT models built from configs
here (nothing downloaded), text data, whitening, closed-form allocation, perplexity, save/load and
generation. Skipped without transformers (the optional extra rankdown[hf])."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import hfnets
from rankdown import CompressConfig, FixedRank, ParamFraction, compress, evaluate
from rankdown.app.pipeline import MeasureOptions, open_saved
from rankdown.data.text import text_data
from rankdown.decompose import whitened_truncated_svd
from rankdown.fitting.metrics import collect, factorize_weighted
from rankdown.methods import get_method
from rankdown.models.hf import load_model, load_tokenizer, token_speed
from rankdown.planning.allocate import Budget, spectrum_curves
from rankdown.planning.compress import allocate_ranks, select_targets
from rankdown.surgery import record_inputs
from rankdown.workload import tied_layers
from test_reliability import assert_refused, in_process

FAST = ["--latency-runs", "2", "--no-guard", "-q"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return hfnets.llama_folder(tmp_path_factory.mktemp("llama"), train_steps=20)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return hfnets.bert_folder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("text")
    calib, ev = d / "calib.txt", d / "eval.txt"
    calib.write_text(hfnets.TEXT)
    ev.write_text(" ".join(reversed(hfnets.TEXT.split()))[:2500])  # other sentences, same words
    return calib, ev


def _calib(llama: Path, texts, seq_len: int = 32):
    spec = f"hf:{llama}"
    return load_model(spec), text_data(texts[0], load_tokenizer(spec), seq_len=seq_len)


def test_text_data_is_fixed_length_windows_and_says_so(llama, texts):
    tok = load_tokenizer(f"hf:{llama}")
    d = text_data(texts[0], tok, seq_len=16, max_sequences=5)
    x = d.inputs(5)
    assert x["input_ids"].shape == (5, 16) and bool((x["attention_mask"] == 1).all())
    assert "5 sequences x 16 tokens = 80 tokens" in d.describe() and d.task == "causal-lm"
    ids = tok.encode(hfnets.TEXT, add_special_tokens=False)
    assert d.example()["input_ids"][0].tolist() == ids[:16]  # windows from the start, no special tokens


def test_perplexity_matches_the_models_own_loss(llama, texts):
    model, data = _calib(llama, texts)
    q = evaluate({"dense": model}, data, reference=None)
    x = data.inputs(10**6)
    with torch.no_grad():
        loss = model(**x, labels=x["input_ids"]).loss  # mean over every shifted position
    assert q["metrics"]["perplexity"]["dense"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert q["metrics"]["tokens_scored"]["dense"] == x["input_ids"][:, 1:].numel()


def test_whitening_is_exact_at_full_rank_in_float64():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 20, generator=g, dtype=torch.float64)
    x = torch.randn(200, 20, generator=g, dtype=torch.float64) * torch.linspace(0.01, 3, 20, dtype=torch.float64)
    a, b = whitened_truncated_svd(w, x.T @ x, 12)
    assert float((a @ b - w).norm() / w.norm()) < 1e-5


def test_a_gram_that_is_not_positive_definite_does_not_crash():
    w = torch.randn(8, 10, dtype=torch.float64)
    x = torch.randn(3, 10, dtype=torch.float64)  # 3 samples: rank-3 Gram, singular
    gram = x.T @ x
    gram[0, 0] -= 1e-9  # and a hair indefinite
    a, b = whitened_truncated_svd(w, gram, 4)
    assert torch.isfinite(a @ b).all()
    a, b = whitened_truncated_svd(w, torch.zeros(10, 10, dtype=torch.float64), 4)  # dead inputs
    assert torch.isfinite(a @ b).all()


def test_closed_form_truncation_loss_equals_the_measured_whitened_output_error(llama, texts):
    """The spectrum allocator's error at rank r is the relative output error of the whitened
    rank-r fit on the calibration data, without a forward pass."""
    model, data = _calib(llama, texts)
    model = model.double()
    x = data.inputs(10**6)
    config = CompressConfig("svd", FixedRank(4), skip=tied_layers(model))
    targets = select_targets(model, config).targets
    metrics = collect(model, targets, x, "covariance")
    inputs = record_inputs(model, data.example(), targets)
    method = get_method("svd", torch.nn.Linear)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    curves = spectrum_curves(model, {n: method for n in names}, inputs, metrics, points=10**6)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0])) for n in names
    ]
    with torch.no_grad():
        model(**x)
    for h in hooks:
        h.remove()
    for n in names:
        layer = model.get_submodule(n)
        for opt in curves[n].options[:-1:3]:
            fact = factorize_weighted(method, n, layer, opt.rank, metrics[n])
            with torch.no_grad():
                xin = seen[n].reshape(-1, seen[n].shape[-1])
                err = (xin @ (layer.weight - fact.module.reconstruct_weight()).T).norm() / (xin @ layer.weight.T).norm()
            assert float(err) == pytest.approx(opt.error, rel=1e-3, abs=1e-6), (n, opt.rank)


def test_whitened_allocation_beats_plain_svd_and_meets_the_layer_budget(llama, texts):
    model, data = _calib(llama, texts)
    x = data.inputs(10**6)
    base = CompressConfig("svd", ParamFraction(0.5), skip=tied_layers(model))
    targets = select_targets(model, base).targets
    ppl = {}
    for metric in ("frobenius", "covariance", "activation", "mahalanobis"):
        metrics = None if metric == "frobenius" else collect(model, targets, x, metric)
        policy = allocate_ranks(
            model, base, x, Budget(params=0.6, scope="layers"), criterion="spectrum", metrics=metrics
        )
        result = compress(model, dataclasses.replace(base, rank=policy), data.example(), metrics=metrics)
        rows = [r for r in result.layers if r.target]
        before, after = sum(r.before.params for r in rows), sum(r.after.params for r in rows)
        assert 0.5 * before <= after <= 0.6 * before
        ppl[metric] = evaluate({"c": result.model}, data, reference=None)["metrics"]["perplexity"]["c"]
    assert ppl["covariance"] < ppl["frobenius"]


def test_cli_compress_eval_and_generate_after_loading(llama, texts, tmp_path, capsys):
    args = ["compress", "--model", f"hf:{llama}", "--calib-data", f"text:{texts[0]}", "--eval-data"]
    args += [f"text:{texts[1]}", "--seq-len", "32", "--method", "svd", "--metric", "covariance"]
    args += ["--target-params", "0.7", "--budget-scope", "layers", "--sensitivity", "spectrum"]
    args += ["--calibration", "24", "--reconstruct", "joint"]
    code, out, err = in_process([*args, "--out", "out", *FAST], capsys, tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    fitted = [r["info"]["calibration"] for r in report["layers"] if r["method"]]
    assert len(fitted) >= 10 and all(f["how"] == "closed form" for f in fitted)  # block by block
    assert {"statistics", "allocation", "factorization", "reconstruction"} <= set(report["seconds"])
    q = report["quality"]["metrics"]
    assert {"perplexity", "top1_agreement", "kl_to_dense", "tokens_scored"} <= set(q)
    assert report["budget"]["scope"] == "layers" and report["budget"]["delivered_fraction"] <= 0.72
    assert {"prefill_tokens_per_s", "decode_tokens_per_s"} <= set(report["tokens_per_s"]["compressed"])
    head = next(r for r in report["layers"] if r["name"] == "lm_head")
    assert head["method"] is None  # tied to the embedding: stays dense
    assert "perplexity" in out and "tokens/s decode" in out
    # The plan names an hf: model, which is data: it is rebuilt without --model, outputs identical.
    saved = open_saved(tmp_path / "out", MeasureOptions())
    ids = torch.arange(3, 40).view(1, -1) % 300
    from rankdown.planning.plan import load_compressed

    again = load_compressed(tmp_path / "out", load_model(f"hf:{llama}"))
    with torch.no_grad():
        assert torch.equal(saved.model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert again.lm_head.weight is again.model.embed_tokens.weight  # still tied after loading
    gen = again.generate(input_ids=ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert gen.shape == (1, 11)
    code, out, err = in_process(
        ["eval", "out", "--eval-data", f"text:{texts[1]}", "--seq-len", "32", *FAST], capsys, tmp_path
    )
    assert code == 0, err
    assert "perplexity" in out


def test_encoder_is_judged_by_embedding_cosine(bert, texts, tmp_path, capsys):
    args = ["compress", "--model", f"hf:{bert}", "--calib-data", f"text:{texts[0]}", "--seq-len", "32"]
    args += ["--method", "svd", "--metric", "activation", "--params", "0.5", "--no-latency", "--out", "out", "-q"]
    code, _, err = in_process(args, capsys, tmp_path)
    assert code == 0, err
    q = json.loads((tmp_path / "out" / "report.json").read_text())["quality"]["metrics"]
    assert 0.5 < q["embedding_cosine"]["compressed"] <= 1.0 + 1e-6 and "top1_agreement" not in q


def test_token_speed_reports_prefill_and_decode(llama):
    model = load_model(f"hf:{llama}")
    s = token_speed({"dense": model}, torch.arange(1, 17).view(1, -1), new_tokens=4, runs=1, threads=1)
    assert s["dense"]["prefill_tokens_per_s"] > 0 and s["dense"]["decode_tokens_per_s"] > 0


@pytest.mark.parametrize(
    "make, culprit",
    [
        (lambda d: ["--model", f"hf:{d}/missing"], "no such folder"),
        (lambda d: ["--model", "hf:/etc/hostname.gguf"], "no such GGUF file"),
        (lambda d: ["--model", f"hf:{d}"], "config.json"),
        (lambda d: ["--model", "nets:tiny_vgg", "--calib-data", "text:/etc/hostname"], "needs a tokenizer"),
    ],
)
def test_bad_hf_inputs_are_one_line(tmp_path, capsys, make, culprit):
    (tmp_path / "empty").mkdir()
    args = ["compress", *make(tmp_path / "empty"), "--params", "0.5", "--out", "out"]
    if "--calib-data" not in args:
        args += ["--calib-data", "text:/etc/hostname"]
    assert_refused(args, culprit, capsys, tmp_path)


def test_text_shorter_than_one_sequence_is_refused(llama, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("too short")
    args = ["compress", "--model", f"hf:{llama}", "--calib-data", f"text:{tmp_path / 'short.txt'}"]
    assert_refused([*args, "--params", "0.5", "--out", "out"], "--seq-len", capsys, tmp_path)


def test_corrupt_or_nan_weights_in_a_model_folder_are_one_line(llama, texts, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    corrupt, nan = tmp_path / "corrupt", tmp_path / "nan"
    for d in (corrupt, nan):
        shutil.copytree(llama, d)
    (corrupt / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes()[:500])
    state = load_file(str(nan / "model.safetensors"))
    key = next(k for k in state if "q_proj" in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    for folder, culprit in ((corrupt, "could not be loaded"), (nan, key)):
        args = ["compress", "--model", f"hf:{folder}", "--calib-data", f"text:{texts[0]}", "--params", "0.5"]
        assert_refused([*args, "--out", "out"], culprit, capsys, tmp_path)


def test_spectrum_allocation_with_another_method_is_refused_up_front(tmp_path, capsys):
    args = ["compress", "--model", "nets:tiny_vgg", "--input-shape", "3,16,16", "--calib-data", "noise"]
    args += ["--method", "tucker2", "--sensitivity", "spectrum", "--speedup", "2", "--out", "out"]
    assert_refused(args, "--sensitivity spectrum", capsys, tmp_path)


@pytest.mark.slow
def test_a_causal_lm_is_fine_tuned_on_its_text_by_next_token_loss(llama, texts):
    from rankdown.training.train import TrainConfig, finetune

    model, data = _calib(llama, texts)
    result = compress(model, CompressConfig("svd", ParamFraction(0.4), skip=tied_layers(model)), data.example())
    before = evaluate({"c": result.model}, data, reference=None)["metrics"]["perplexity"]["c"]
    ds = data.dataset
    assert ds is not None
    config = TrainConfig(epochs=3, batch_size=4, lr=3e-3, causal_lm=True, augment=False)
    history = finetune(result.model, ds, config)  # no labels, no teacher: the text is its own label
    after = evaluate({"c": result.model}, data, reference=None)["metrics"]["perplexity"]["c"]
    assert after < 0.9 * before and history[-1]["train_loss"] < history[0]["train_loss"]
    assert math.exp(history[-1]["train_loss"]) == pytest.approx(after, rel=0.5)  # the same quantity


@pytest.mark.slow
def test_cli_finetunes_a_causal_lm_on_text(llama, texts, tmp_path, capsys):
    args = ["compress", "--model", f"hf:{llama}", "--calib-data", f"text:{texts[0]}", "--seq-len", "32"]
    args += ["--method", "svd", "--target-params", "0.6", "--budget-scope", "layers", "--out", "out", *FAST]
    code, _, err = in_process([*args, "--no-latency"], capsys, tmp_path)
    assert code == 0, err
    args = ["finetune", "out", "--train-data", f"text:{texts[0]}", "--eval-data", f"text:{texts[1]}"]
    args += ["--seq-len", "32", "--epochs", "2", "--batch-size", "4", "--lr", "3e-3", "--no-latency", *FAST]
    code, out, err = in_process(args, capsys, tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    history = report["finetune"]["history"]
    assert len(history) == 2 and history[1]["train_loss"] < history[0]["train_loss"]  # next-token loss falls
    assert "perplexity" in report["quality"]["metrics"] and "perplexity" in out
