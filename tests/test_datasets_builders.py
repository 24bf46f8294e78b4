"""mini-ImageNet, tiered-ImageNet, CIFAR-FS and FC100 builders on tiny files written in the exact
distribution formats (mtl_gbml.data.fake), prepared through the CLI into a temporary TFDS dir.

Every fake image is filled with its global class's colour, so each check below reads the true class
off the pixels: stored labels, sampled episodes (labels, class_ids), split membership.
"""

import json
import os
import pickle
import tempfile

import jax
import ml_collections
import numpy as np
import pytest
from conftest import ROOT, subprocess_env

from mtl_gbml.data import datasets, fake, prepare
from mtl_gbml.data.errors import DataError
from mtl_gbml.data.sampler import make_pool, sample_tasks

SPLITS = ("train", "val", "test")


def _cfg(name, tfds_dir):
    return ml_collections.ConfigDict(
        {
            "name": name,
            "protocol": "standard",
            "tfds_dir": str(tfds_dir),
            "data_dir": "",
            "rotations": False,
        }
    )


def _prepare(name, manual, tfds_dir):
    assert (
        prepare.main(["--dataset", name, "--manual_dir", str(manual), "--data_dir", str(tfds_dir)])
        == 0
    )
    return {s: datasets.load_arrays(_cfg(name, tfds_dir), s) for s in SPLITS}


def _builder_meta(name, tfds_dir, split):
    """(label, class_name, superclass or general label) of every example, from TFDS directly."""
    import tensorflow_datasets as tfds

    b = datasets._builder(name, "standard", str(tfds_dir))
    out = []
    for ex in tfds.as_numpy(b.as_dataset(split=split, shuffle_files=False)):
        extra = ex.get("superclass", ex.get("general_label"))
        extra = extra.decode() if isinstance(extra, bytes) else extra
        out.append((int(ex["label"]), ex["class_name"].decode(), extra))
    return out


def _check_split_arrays(arrays, size, per_class, num_classes):
    """Labels 0..C-1, images right-sized RGB, each label one global class, splits disjoint."""
    seen = {}
    for s in SPLITS:
        x, y = arrays[s]
        assert x.dtype == np.uint8 and x.shape[1:] == (size, size, 3)
        assert sorted(np.unique(y)) == list(range(num_classes[s]))
        glob = np.array([fake.color_class(im) for im in x])
        for label in range(num_classes[s]):
            g = np.unique(glob[y == label])
            assert len(g) == 1, f"{s} label {label} mixes global classes {g}"
            assert (y == label).sum() == per_class
            assert seen.setdefault(int(g[0]), s) == s, f"class {g[0]} in {seen[g[0]]} and {s}"
    return seen


def _check_episodes(x, y, ways=5, shots=1, queries=2, num_tasks=6):
    """Sampled tasks: labels 0..N-1 class-major, class_ids distinct, images of the right class."""
    pool = make_pool(x, y)
    tasks = sample_tasks(pool, jax.random.PRNGKey(0), ways, shots, queries, num_tasks)
    glob_of_label = {
        int(lab): fake.color_class(x[np.flatnonzero(y == lab)[0]]) for lab in np.unique(y)
    }
    uniq = np.unique(y)  # pool class id c is the c-th sorted label
    for t in range(num_tasks):
        ids = np.asarray(tasks.class_ids[t])
        assert len(set(ids.tolist())) == ways
        np.testing.assert_array_equal(
            np.asarray(tasks.support_y[t]), np.repeat(np.arange(ways), shots)
        )
        np.testing.assert_array_equal(
            np.asarray(tasks.query_y[t]), np.repeat(np.arange(ways), queries)
        )
        for xs, ys in (
            (tasks.support_x[t], tasks.support_y[t]),
            (tasks.query_x[t], tasks.query_y[t]),
        ):
            for img, lab in zip(np.asarray(xs), np.asarray(ys), strict=True):
                assert fake.color_class(img) == glob_of_label[int(uniq[ids[lab]])]
        # no image twice within a class of a task
        imgs = np.concatenate([np.asarray(tasks.support_x[t]), np.asarray(tasks.query_x[t])])
        assert len({im.tobytes() for im in imgs}) == len(imgs)


@pytest.mark.parametrize("layout", ["pickle", "jpeg"])
def test_mini_imagenet(tmp_path, layout):
    classes = {"train": 6, "val": 5, "test": 5}
    names = fake.write_mini_imagenet(tmp_path / "raw", layout, classes=classes, per_class=4)
    arrays = _prepare("mini_imagenet", tmp_path / "raw", tmp_path / "tfds")
    _check_split_arrays(arrays, 84, 4, classes)
    _check_episodes(*arrays["train"])
    meta = _builder_meta("mini_imagenet", tmp_path / "tfds", "val")
    assert sorted({(lab, n) for lab, n, _ in meta}) == list(enumerate(sorted(names["val"])))
    # prepared once: a second prepare is a no-op
    assert (
        prepare.main(
            [
                "--dataset",
                "mini_imagenet",
                "--manual_dir",
                str(tmp_path / "raw"),
                "--data_dir",
                str(tmp_path / "tfds"),
            ]
        )
        == 0
    )


def test_tiered_imagenet(tmp_path):
    classes = {"train": 7, "val": 5, "test": 6}
    names = fake.write_tiered_imagenet(tmp_path / "raw", classes=classes, per_class=4, general=2)
    arrays = _prepare("tiered_imagenet", tmp_path / "raw", tmp_path / "tfds")
    _check_split_arrays(arrays, 84, 4, classes)
    _check_episodes(*arrays["train"])
    meta = _builder_meta("tiered_imagenet", tmp_path / "tfds", "train")
    assert sorted({(lab, n, gen) for lab, n, gen in meta}) == [
        (i, n, i % 2) for i, n in enumerate(names["train"])
    ]


def test_tiered_imagenet_non_contiguous_class_ids(tmp_path):
    """label_specific ids need not be 0..C-1: labels become split-local indices in sorted id order
    and class names are looked up by the original id."""
    from mtl_gbml.data.tiered_imagenet import TieredImagenetFewShot

    raw = tmp_path / "raw"
    fake.write_tiered_imagenet(raw, classes=5, per_class=2)
    ids = np.array([7, 2, 30, 11, 19])  # fake class i gets id ids[i]
    with open(raw / "val_labels.pkl", "rb") as f:
        labels = pickle.load(f)
    spec = labels["label_specific"]
    names = [f"unused_{k}" for k in range(31)]
    for i, n in enumerate(labels["label_specific_str"]):
        names[ids[i]] = n
    labels.update(label_specific=ids[spec], label_specific_str=names)
    with open(raw / "val_labels.pkl", "wb") as f:
        pickle.dump(labels, f, protocol=2)
    examples = list(TieredImagenetFewShot._generate_examples(None, str(raw), "val"))
    assert len(examples) == 10
    rank = {int(c): r for r, c in enumerate(sorted(ids))}  # 2->0, 7->1, 11->2, 19->3, 30->4
    for (_, ex), c in zip(examples, spec, strict=True):
        assert ex["label"] == rank[int(ids[c])]
        assert ex["class_name"] == names[ids[c]] and ex["general_label"] == c % 2


def test_cifar_fs_and_fc100(tmp_path):
    fine_names = fake.write_cifar100(tmp_path / "raw", per_class_train=3, per_class_test=1)
    _, _, parent = fake.cifar100_names()
    split_dir = os.path.join(os.path.dirname(datasets.__file__), "splits")
    # CIFAR-FS: the packaged 64/16/20 fine classes, all 4 images of each
    arrays = _prepare("cifar_fs", tmp_path / "raw", tmp_path / "tfds")
    seen = _check_split_arrays(arrays, 32, 4, {"train": 64, "val": 16, "test": 20})
    for s in SPLITS:
        spec = json.load(open(os.path.join(split_dir, "cifar_fs", f"{s}.json")))
        assert {fine_names[g] for g, sp in seen.items() if sp == s} == {f for _, f in spec}
        meta = _builder_meta("cifar_fs", tmp_path / "tfds", s)
        assert sorted({(lab, n) for lab, n, _ in meta}) == list(
            enumerate(sorted(f for _, f in spec))
        )
        assert all(parent[n] == sup for _, n, sup in meta)
    _check_episodes(*arrays["test"])
    # FC100: 12/4/4 superclasses = 60/20/20 fine classes, grouped by superclass
    arrays = _prepare("fc100", tmp_path / "raw", tmp_path / "tfds")
    seen = _check_split_arrays(arrays, 32, 4, {"train": 60, "val": 20, "test": 20})
    sup_seen = {}
    for s in SPLITS:
        sups = json.load(open(os.path.join(split_dir, "fc100", f"{s}.json")))
        fines = {fine_names[g] for g, sp in seen.items() if sp == s}
        assert fines == {f for f, p in parent.items() if p in sups}
        meta = _builder_meta("fc100", tmp_path / "tfds", s)
        by_sup = {}
        for lab, n, sup in meta:
            assert parent[n] == sup
            by_sup.setdefault(sup, set()).add(lab)
        assert sorted(by_sup) == sorted(sups) and all(len(v) == 5 for v in by_sup.values())
        # labels follow (superclass, class) order: each superclass's 5 labels are consecutive
        for v in by_sup.values():
            assert max(v) - min(v) == 4
        for sup in sups:
            assert sup_seen.setdefault(sup, s) == s
    _check_episodes(*arrays["val"])


def test_packaged_split_lists_are_disjoint_and_complete():
    fine, coarse, parent = fake.cifar100_names()
    assert len(fine) == 100 and len(coarse) == 20
    assert all(sum(p == c for p in parent.values()) == 5 for c in coarse)
    split_dir = os.path.join(os.path.dirname(datasets.__file__), "splits")
    fc = [json.load(open(os.path.join(split_dir, "fc100", f"{s}.json"))) for s in SPLITS]
    assert [len(x) for x in fc] == [12, 4, 4] and sorted(sum(fc, [])) == coarse


def test_preparing_leaves_nothing_in_the_temp_dir_and_later_loads_read_the_array_cache(
    tmp_path, monkeypatch
):
    """Preparing leaves nothing in the system's temporary directory: TFDS's builder, made before
    its dataset exists, creates an empty ``mkdtemp("tfds")`` directory that it never removes, and
    the preparation lock lives in the TFDS directory. The decoded-array cache of an RGB dataset
    is found again (its builder has no config directory): a later load needs no TFDS builder."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    raw, tfds_dir = tmp_path / "raw", tmp_path / "tfds"
    fake.write_tiered_imagenet(raw, classes={"train": 3, "val": 2, "test": 2}, per_class=2)
    assert datasets.prepare_from("tiered_imagenet", str(raw), str(tfds_dir))
    assert os.listdir(systmp) == []
    assert (tfds_dir / datasets.LOCK_FILE).is_file()
    x, y = datasets.load_arrays(_cfg("tiered_imagenet", tfds_dir), "val")
    vdir = datasets._version_dir("tiered_imagenet", "standard", str(tfds_dir))
    builder = datasets._builder("tiered_imagenet", "standard", str(tfds_dir))
    assert os.path.samefile(vdir, str(builder.data_dir))
    datasets._load_arrays.cache_clear()

    def no_builder(*args):
        raise AssertionError(f"a TFDS builder was made for {args}: the array cache was missed")

    monkeypatch.setattr(datasets, "_builder", no_builder)
    again_x, again_y = datasets.load_arrays(_cfg("tiered_imagenet", tfds_dir), "val")
    np.testing.assert_array_equal(again_x, x)
    np.testing.assert_array_equal(again_y, y)
    assert os.listdir(systmp) == []


def test_an_unwritable_tfds_dir_is_named(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match=r"a_file/tfds.*Set data\.tfds_dir"):
        datasets.prepare_from("cifar_fs", str(tmp_path / "raw"), str(tmp_path / "a_file/tfds"))


# --- missing and malformed files: a DataError naming the file and the expected format ---


def _prepare_error(name, manual, tmp_path):
    with pytest.raises(DataError) as e:
        datasets.prepare_from(name, str(manual), str(tmp_path / "tfds_err"))
    return str(e.value)


def test_mini_imagenet_errors(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    msg = _prepare_error("mini_imagenet", raw, tmp_path)
    assert "mini-imagenet-cache-train.pkl" in msg and "train.csv" in msg and "image_data" in msg
    fake.write_mini_imagenet(raw, "pickle", classes=5, per_class=3)
    bad = raw / "mini-imagenet-cache-val.pkl"
    bad.write_bytes(pickle.dumps({"images": np.zeros((2, 84, 84, 3), np.uint8)}))
    msg = _prepare_error("mini_imagenet", raw, tmp_path)
    assert str(bad) in msg and "class_dict" in msg
    bad.write_bytes(
        pickle.dumps({"image_data": np.zeros((2, 32, 32, 3), np.uint8), "class_dict": {"a": [0]}})
    )
    msg = _prepare_error("mini_imagenet", raw, tmp_path)
    assert str(bad) in msg and "[N, 84, 84, 3]" in msg
    for idx in ([2], [-1], []):  # one past the 2 rows, negative, none
        bad.write_bytes(
            pickle.dumps(
                {"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": idx}}
            )
        )
        msg = _prepare_error("mini_imagenet", raw, tmp_path)
        assert str(bad) in msg and "indices outside image_data's 2 rows" in msg, idx
    # a class in two splits (files of two distributions mixed): named with both splits
    names = fake.write_mini_imagenet(raw, "pickle", classes=5, per_class=3)
    bad = raw / "mini-imagenet-cache-test.pkl"
    with open(bad, "rb") as f:
        obj = pickle.load(f)
    obj["class_dict"][names["train"][2]] = obj["class_dict"].pop(names["test"][4])
    bad.write_bytes(pickle.dumps(obj))
    msg = _prepare_error("mini_imagenet", raw, tmp_path)
    assert str(bad) in msg and f"class {names['train'][2]} is also in the train split" in msg
    # JPEG layout: a bad header, then a CSV row naming a missing image
    jraw = tmp_path / "jraw"
    fake.write_mini_imagenet(jraw, "jpeg", classes=5, per_class=3)
    (jraw / "val.csv").write_text("file,class\nx.jpg,n1\n")
    msg = _prepare_error("mini_imagenet", jraw, tmp_path)
    assert str(jraw / "val.csv") in msg and "filename,label" in msg
    (jraw / "val.csv").write_text("filename,label\nmissing.jpg,n1\n")
    msg = _prepare_error("mini_imagenet", jraw, tmp_path)
    assert "missing.jpg" in msg


def test_tiered_imagenet_errors(tmp_path):
    raw = tmp_path / "raw"
    fake.write_tiered_imagenet(raw, classes=5, per_class=3)
    os.remove(raw / "test_labels.pkl")
    msg = _prepare_error("tiered_imagenet", raw, tmp_path)
    assert str(raw / "test_labels.pkl") in msg and "label_specific" in msg
    fake.write_tiered_imagenet(raw, classes=5, per_class=3)
    with open(raw / "train_labels.pkl", "wb") as f:  # one label short
        pickle.dump({"label_specific": np.zeros(14, np.int64), "label_general": np.zeros(14)}, f)
    msg = _prepare_error("tiered_imagenet", raw, tmp_path)
    assert "train_images_png.pkl" in msg and "train_labels.pkl" in msg
    fake.write_tiered_imagenet(raw, classes=5, per_class=3)
    with open(raw / "val_images_png.pkl", "wb") as f:  # not PNG bytes
        pickle.dump([b"not a png"] * 15, f)
    msg = _prepare_error("tiered_imagenet", raw, tmp_path)
    assert str(raw / "val_images_png.pkl") in msg and "entry 0" in msg
    # a class in two splits, by name (the ids are split-local, so an id may repeat across splits)
    names = fake.write_tiered_imagenet(raw, classes=5, per_class=3)
    with open(raw / "test_labels.pkl", "rb") as f:
        labels = pickle.load(f)
    labels["label_specific_str"][1] = names["val"][3]
    with open(raw / "test_labels.pkl", "wb") as f:
        pickle.dump(labels, f, protocol=2)
    msg = _prepare_error("tiered_imagenet", raw, tmp_path)
    assert (
        str(raw / "test_labels.pkl") in msg and f"class {names['val'][3]} is also in the val" in msg
    )


def test_cifar_errors(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    msg = _prepare_error("fc100", raw, tmp_path)
    assert "cifar-100-python.tar.gz" in msg
    (raw / "cifar-100-python.tar.gz").write_bytes(b"not a tarball")
    msg = _prepare_error("cifar_fs", raw, tmp_path)
    assert "cifar-100-python.tar.gz" in msg and "tar.gz" in msg


def _blocked_on_a_lock(pid: int) -> bool:
    """Whether process ``pid`` waits for a file lock (a ``->`` line of /proc/locks)."""
    return any(
        line.split()[1] == "->" and line.split()[5] == str(pid)
        for line in open("/proc/locks")
        if len(line.split()) > 5
    )


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux /proc/locks")
def test_a_second_preparer_waits_for_the_first_then_finds_the_dataset_built(tmp_path):
    """Two runs on a fresh machine both want CIFAR-FS in the same TFDS dir (two pytest workers,
    ``time_to_accuracy.py --parallel 2``): while one holds the preparation lock (here the test),
    the other's ``prepare`` waits on it, and once it gets the lock it finds the dataset that the
    first built meanwhile instead of building it again beside it."""
    import subprocess
    import sys
    import time

    raw, tfds_dir = tmp_path / "raw", tmp_path / "tfds"
    fake.write_cifar100(raw, per_class_train=3, per_class_test=1)
    cmd = [sys.executable, "-m", "mtl_gbml.data.prepare", "--dataset", "cifar_fs"]
    cmd += ["--manual_dir", str(raw), "--data_dir", str(tfds_dir)]
    env = subprocess_env(PYTHONPATH=str(ROOT))
    with datasets._prepare_lock(str(tfds_dir)):
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.time() + 120
        while not _blocked_on_a_lock(proc.pid):
            assert proc.poll() is None, proc.communicate()[0]  # it finished without waiting
            assert time.time() < deadline, "the second preparer never waited for the lock"
            time.sleep(0.05)
        builder = datasets._builder("cifar_fs", "standard", str(tfds_dir))
        datasets._build(builder, "cifar_fs", str(raw))  # the first run builds it
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "cifar_fs (standard) already prepared" in out, out
    arrays = {s: datasets.load_arrays(_cfg("cifar_fs", tfds_dir), s) for s in SPLITS}
    _check_split_arrays(arrays, 32, 4, {"train": 64, "val": 16, "test": 20})
