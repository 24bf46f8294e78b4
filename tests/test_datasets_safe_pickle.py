"""The restricted unpickler: plain data and numpy arrays load; anything that would run code is
refused before it runs (a side-effect file shows whether it ran)."""

import builtins
import io
import os
import pickle

import numpy as np
import pytest

from mtl_gbml.data import safe_pickle
from mtl_gbml.data.errors import DataError


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvilEval:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({self.path!r}, 'w').write('pwned')",))


def test_plain_data_and_numpy_load_in_every_protocol():
    obj = {
        "image_data": np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3),
        "class_dict": {"n01": [0], "n02": [1]},
        "f": np.float32(1.5),
        "i": np.int64(7),
        "t": (1, 2.0, "x", b"y", None, True),
        "obj": np.array([b"ab", b"c"], dtype=object),
        "s": np.array(["ab", "c"]),
    }
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        out = safe_pickle.loads(pickle.dumps(obj, protocol=protocol))
        np.testing.assert_array_equal(out["image_data"], obj["image_data"])
        assert out["class_dict"] == obj["class_dict"]
        assert out["f"] == obj["f"] and out["i"] == obj["i"] and out["t"] == obj["t"]
        assert list(out["obj"]) == list(obj["obj"]) and list(out["s"]) == list(obj["s"])


@pytest.mark.parametrize("where", ["top", "nested"])
def test_os_system_pickle_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = _Evil(f"touch {marker}")
    payload = evil if where == "top" else {"image_data": [1, 2, evil], "class_dict": {}}
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError) as e:
        safe_pickle.load(str(path), "a pickled dict")
    assert str(path) in str(e.value) and "system" in str(e.value)
    assert not marker.exists()


def test_builtins_eval_and_exotic_globals_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    for payload in (
        pickle.dumps(_EvilEval(str(marker))),
        b"cposix\nsystem\n(S'true'\ntR.",  # protocol 0 GLOBAL opcode
        b"csubprocess\nPopen\n(S'true'\ntR.",
        b"cnumpy\nload\n(S'x'\ntR.",  # a numpy function outside the allow list
        pickle.dumps(np.random.default_rng(0)),  # numpy object outside the allow list
    ):
        with pytest.raises(pickle.UnpicklingError):
            safe_pickle.loads(payload)
    assert not marker.exists()


def test_codecs_encode_admits_latin1_only():
    assert safe_pickle.loads(pickle.dumps(b"\x00\xffab", protocol=2)) == b"\x00\xffab"
    bad = b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR."
    with pytest.raises(pickle.UnpicklingError):
        safe_pickle.loads(bad)


def test_truncated_and_missing_files_name_the_file(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"a": np.zeros(100)})[:50])
    with pytest.raises(DataError, match="x.pkl.*expected a dict"):
        safe_pickle.load(str(path), "a dict")
    with pytest.raises(DataError, match="missing file .*nope.pkl"):
        safe_pickle.load(str(tmp_path / "nope.pkl"), "a dict")


# malformed pickles that the unpickler fails on with each exception type it is expected to turn
# into a DataError (hand-written opcodes; each checked to raise exactly this type)
_MALFORMED = {
    "ValueError": b"\x80\x09N.",  # unsupported protocol 9
    "TypeError": b"\x80\x02cnumpy\ndtype\nq\x00(K\x01K\x02K\x03K\x04K\x05tR.",  # dtype(5 args)
    "AttributeError": b"\x80\x02K\x01(K\x02e.",  # APPENDS onto an int
    "IndexError": b"\x80\x02]K\x01K\x02s.",  # SETITEM on an empty list
    "EOFError": b"",
}


@pytest.mark.parametrize("kind", sorted(_MALFORMED))
def test_malformed_pickles_are_data_errors_naming_the_file(tmp_path, kind):
    payload = _MALFORMED[kind]
    with pytest.raises(getattr(builtins, kind)):  # what pickle itself raises on it
        pickle.Unpickler(io.BytesIO(payload)).load()
    path = tmp_path / "bad.pkl"
    path.write_bytes(payload)
    with pytest.raises(
        DataError, match=f"bad.pkl is not a readable pickle \\({kind}: .*expected a dict"
    ):
        safe_pickle.load(str(path), "a dict")
    with open(path, "rb") as f, pytest.raises(DataError, match=f"member.pkl .*\\({kind}: "):
        safe_pickle.load_fileobj(f, "member.pkl", "a dict")


# np.array([97, 98, 99], np.uint8) and {'label_specific': that} as Python 2's cPickle (protocol 2)
# writes them: module numpy.core.multiarray, py2 str (SHORT_BINSTRING) data, as in the original
# tiered-ImageNet and CIFAR-100 files
_PY2_ARRAY = (
    b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85U\x01b\x87R"
    b"(K\x01K\x03\x85cnumpy\ndtype\nq\x03U\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xff"
    b"J\xff\xff\xff\xffK\x00tb\x89U\x03abctb"
)


def test_python2_numpy_pickles_load():
    arr = safe_pickle.loads(b"\x80\x02" + _PY2_ARRAY + b".")
    assert arr.dtype == np.uint8 and arr.tolist() == [97, 98, 99]
    d = safe_pickle.loads(b"\x80\x02}q\x00U\x0elabel_specificq\x04" + _PY2_ARRAY + b"s.")
    assert list(d) == ["label_specific"] and d["label_specific"].tolist() == [97, 98, 99]
