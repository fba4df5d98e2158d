"""Data files and model specs: real formats, clear errors."""

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_idx
from rankdown.models.load import ModelError, load_state_dict_file, resolve_factory
from rankdown.zoo import BUNDLED, build_model
from rankdown.zoo.fashion import DataError, load_fashion_mnist, read_idx


def test_reads_gz_and_plain_idx(tmp_path):
    import numpy as np

    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    write_idx(tmp_path / "a", arr, 2051, gz=True)
    write_idx(tmp_path / "b", arr, 2051, gz=False)
    assert (read_idx(tmp_path / "a", 2051) == arr).all()
    assert (read_idx(tmp_path / "b", 2051) == arr).all()


def test_corrupt_idx_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 10)
    with pytest.raises(DataError, match="magic 2051"):
        read_idx(tmp_path / "bad", 2051)
    write_idx(tmp_path / "short", [[1, 2], [3, 4]], 2050, gz=False)
    raw = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short", 2050)


def test_missing_data_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "nowhere")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid", tmp_path)


def test_fake_dataset_loads_normalised(fake_fashion):
    split = load_fashion_mnist("test", fake_fashion, limit=10)
    assert split.images.shape == (10, 1, 28, 28) and split.labels.dtype == torch.int64
    assert sum(len(y) for _, y in split.batches(4)) == 10


def test_model_specs(tmp_path):
    with pytest.raises(ModelError, match="not a bundled model"):
        build_model("resnet9000")
    with pytest.raises(ModelError, match="cannot import module"):
        build_model("no_such_pkg.mod:make")
    with pytest.raises(ModelError, match="no attribute 'nothing'"):
        build_model("nets:nothing")
    assert resolve_factory("nets:tiny_vgg")().__class__.__name__ == "TinyVGG"
    with pytest.raises(ModelError, match="not an nn.Module"):
        build_model("nets:make_not_a_module")


def test_weights_files(tmp_path):
    m = build_model("nets:tiny_vgg")
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(st))
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": m.state_dict()}, pt)
    for path in (st, pt):
        m2 = build_model("nets:tiny_vgg", path)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True))
    with pytest.raises(ModelError, match="does not exist"):
        build_model("nets:tiny_vgg", tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(ModelError, match="could not be read"):
        load_state_dict_file(tmp_path / "bad.safetensors")
    torch.save({"a": [1, 2]}, tmp_path / "notstate.pt")
    with pytest.raises(ModelError, match="flat state dict"):
        load_state_dict_file(tmp_path / "notstate.pt")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="does not fit the model"):
        build_model("nets:tiny_vgg", tmp_path / "other.safetensors")


def test_pickled_objects_are_never_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="never unpickles code"):
        load_state_dict_file(tmp_path / "evil.pt")


def test_bundled_model_ships_weights(has_bundled_weights):
    if not has_bundled_weights:
        pytest.skip("bundled weights not built yet")
    model = build_model("fashion-vgg")
    assert model(torch.zeros(2, *BUNDLED["fashion-vgg"].input_shape)).shape == (2, 10)
