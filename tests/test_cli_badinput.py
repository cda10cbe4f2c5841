"""Bad input to the dhf command line: one ``Error:`` line, non-zero exit, no traceback, and
nothing written or replaced (outputs checked before the work, not after it)."""

import json
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from clihelp import one_error, run  # noqa: E402

CPU = ("--device", "cpu", "-q")


def last_error(r, *needles):
    """A handled failure after log lines: non-zero exit, no traceback, one ``Error:`` line on
    stderr and it is the last; each needle in it (any case). Returns it."""
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert "unexpected" not in errors[0], errors[0]
    for n in needles:
        assert n.lower() in errors[0].lower(), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def built(image_folder, trained_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("badinput") / "idx")
    run("build-index", image_folder, "--model", trained_model, "-o", out, *CPU, ok=True)
    return out


@pytest.fixture
def a_file(tmp_path):
    p = tmp_path / "afile.txt"
    p.write_text("x")
    return str(p)


def _bad_folder(root):
    """Two class folders holding only files that are not decodable images."""
    for cls, name, data in (("a", "x.jpg", b"not an image"), ("b", "y.png", b"\x89PNG\r\n\x1a\n trunc")):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        with open(os.path.join(root, cls, name), "wb") as f:
            f.write(data)
    return root


def test_train_refuses_an_unwritable_checkpoint_before_training(image_folder, a_file, tmp_path):
    base = ("train", image_folder, "--backbone", "smallcnn", "--epochs", "1", *CPU)
    one_error(run(*base, "-o", os.path.join(a_file, "m.pt")), "cannot write", "not a folder")
    one_error(run(*base, "-o", str(tmp_path)), "is a folder")
    assert sorted(os.listdir(tmp_path)) == ["afile.txt"]  # no temp file, no fc7 cache


def test_train_refuses_sizes_below_one_pixel(image_folder, tmp_path):
    base = ("train", image_folder, "-o", str(tmp_path / "m.pt"), "--backbone", "smallcnn", "--epochs", "1", *CPU)
    one_error(run(*base, "--load-size", "-5"), "--load-size must be at least 1")
    one_error(run(*base, "--input-size", "0"), "--input-size must be at least 1")
    assert not os.path.exists(tmp_path / "m.pt")


def test_smallcnn_refuses_imagenet_weights(image_folder, tmp_path):
    # before: accepted and ignored, so the CPU default froze a random backbone
    line = one_error(run("train", image_folder, "-o", str(tmp_path / "m.pt"), "--backbone", "smallcnn",
                         "--weights", "imagenet", "--epochs", "1", *CPU))
    assert "no pretrained weights" in line and "--weights none" in line


def test_unsupervised_too_few_images_says_so_and_leaves_no_cache(image_folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        shutil.copy(os.path.join(image_folder, "red", f"{i:03d}.png"), flat / f"{i}.png")
    out = tmp_path / "out"
    r = run("train", str(flat), "-o", str(out / "m.pt"), "--backbone", "smallcnn", *CPU)
    line = last_error(r, "at least 8 images", "6 given")
    assert "--bits 8" not in line  # it was already 8 bits: the old hint asked for what had failed
    assert not out.exists() or not os.listdir(out)  # no .m.pt.fc7-cache left beside the checkpoint


@pytest.mark.parametrize("args, needle", [
    (("--index-type", "multihash", "--nhash", "0"), "--nhash must be at least 1"),  # before: an unreadable index
    (("--index-type", "hash", "--hash-bits", "0"), "--hash-bits must be at least 1"),
    (("--index-type", "hash", "--nflip", "-1"), "nflip"),
])
def test_build_index_bad_index_parameters_leave_no_folder(image_folder, trained_model, tmp_path, args, needle):
    out = tmp_path / "new" / "idx"
    one_error(run("build-index", image_folder, "--model", trained_model, "-o", str(out), *args, *CPU),
              needle, stream="output")
    assert not out.exists()  # before: a folder with .lock and .dhf-files was left


def test_build_index_missing_model_leaves_no_folder(image_folder, tmp_path):
    out = tmp_path / "idx"
    one_error(run("build-index", image_folder, "--model", str(tmp_path / "nope.pt"), "-o", str(out), *CPU),
              "model file not found")
    assert not out.exists()


def test_build_index_under_a_file(image_folder, trained_model, a_file):
    one_error(run("build-index", image_folder, "--model", trained_model, "-o", os.path.join(a_file, "idx"), *CPU),
              "cannot create the index folder")


def test_build_of_only_undecodable_images_keeps_the_index(built, trained_model, tmp_path):
    idx = str(tmp_path / "idx")
    shutil.copytree(built, idx)
    before = json.loads(run("info", idx, "--json", ok=True).stdout)["manifest"]
    bad = _bad_folder(str(tmp_path / "bad"))
    r = run("build-index", bad, "--model", trained_model, "-o", idx, *CPU)
    last_error(r, "none of the 2 images", "could be decoded", "not changed")
    after = json.loads(run("info", idx, "--json", ok=True).stdout)["manifest"]
    assert after == before and after["count"] == 72  # before: replaced by an index of 0 rows, exit 0
    assert not [n for n in os.listdir(idx) if n.startswith(".partial-")]
    new = tmp_path / "new"
    last_error(run("build-index", bad, "--model", trained_model, "-o", str(new), *CPU), "could be decoded")
    assert not new.exists()


def test_shard_output_is_a_file(built, a_file):
    one_error(run("shard", built, "-n", "2", "-o", a_file), "exists and is not a folder")
    one_error(run("shard", built, "-n", "2", "-o", os.path.join(a_file, "x")), "not a folder")


def test_evaluate_refuses_an_unwritable_output_before_evaluating(built, image_folder, a_file, tmp_path):
    base = ("evaluate", "--index", built, "--queries", image_folder, "--mode", "bcs", "--no-plots", *CPU)
    r = run(*base, "-o", os.path.join(a_file, "r.json"))
    one_error(r, "cannot write --output", "not a folder")
    assert "mAP" not in r.output  # refused before the work, not after it
    one_error(run(*base, "-o", str(tmp_path)), "is a folder")


def test_demo_bad_arguments_write_nothing(tmp_path, a_file):
    out = tmp_path / "demo"
    one_error(run("demo", "-o", str(out), "--epochs", "0", *CPU), "--epochs must be at least 1")
    one_error(run("demo", "-o", str(out), "--bits", "12", *CPU), "multiple of 8")
    assert not out.exists()  # before: the 1,797 digit PNGs were written first
    one_error(run("demo", "-o", a_file, *CPU), "not a folder")
