"""kdjax.data.corpus (``kdjax.data.text``): byte-level windows of the standard library's
source, or the user's corpus. (``take_batch`` is tests/test_data.py's.)"""

import os
import sysconfig

import numpy as np
import pytest

from kdjax import data
from kdjax.errors import InputError


def test_stdlib_corpus_windows_and_split_by_file():
    ds = data.text(32)
    assert ds.num_classes == 256 and ds.x_train.dtype == np.int32 and ds.x_train.shape[1] == 32
    np.testing.assert_array_equal(ds.y_train[:, :-1], ds.x_train[:, 1:])  # next-byte labels
    np.testing.assert_array_equal(ds.x_train, data.text(32).x_train)  # deterministic
    root = sysconfig.get_paths()["stdlib"]
    first = open(os.path.join(root, data.TEXT_MODULES[0] + ".py"), "rb").read()[:33]
    assert bytes(ds.x_train[0].astype(np.uint8)) == first[:32] and ds.y_train[0, -1] == first[32]
    used = [m for m in data.TEXT_MODULES if os.path.isfile(os.path.join(root, m + ".py"))]
    val_file = open(os.path.join(root, used[9] + ".py"), "rb").read()  # every 10th file is validation
    assert bytes(ds.x_test[0].astype(np.uint8)) == val_file[:32]
    assert f"{len(used)} files" in ds.name
    small = data.text(32, max_bytes=3300)
    assert small.x_train.shape == (103, 32) and len(small.x_test) == 10


def test_user_corpus(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_bytes(bytes(range(256)) * 4)  # 1024 bytes: the last 102 are validation
    ds = data.text(10, txt)
    assert ds.x_train.shape == (92, 10) and ds.x_test.shape == (10, 10) and ds.name == "c.txt"
    np.savez(tmp_path / "t.npz", train=np.arange(1000) % 500, validation=np.arange(100))
    ds = data.text(8, tmp_path / "t.npz")
    assert ds.num_classes == 500 and ds.x_test.shape == (12, 8)


def test_text_errors(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(InputError, match="non-empty"):
        data.text(8, tmp_path / "empty.txt")
    with pytest.raises(InputError, match="no such file"):
        data.text(8, tmp_path / "missing.txt")
    np.savez(tmp_path / "bad.npz", tokens=np.arange(10))
    with pytest.raises(InputError, match="'train' and 'validation'"):
        data.text(8, tmp_path / "bad.npz")
    np.savez(tmp_path / "neg.npz", train=np.arange(-1, 100), validation=np.arange(100))
    with pytest.raises(InputError, match=">= 0"):
        data.text(8, tmp_path / "neg.npz")
    (tmp_path / "short.txt").write_bytes(b"abc" * 10)
    with pytest.raises(InputError, match="at least 65 training tokens.*got 27"):
        data.text(64, tmp_path / "short.txt")
    with pytest.raises(InputError, match="length: expected an int >= 1, got 0"):
        data.text(0)
