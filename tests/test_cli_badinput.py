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


# ---------------------------------------------------------------- tryout findings (twenty-eighth session)

@pytest.mark.parametrize("cmd", [
    ("shard", "{idx}", "-n", "2", "-o", ""),
    ("train", "{imgs}", "-o", "", "--backbone", "smallcnn", "--epochs", "1", *CPU),
    ("build-index", "{imgs}", "--model", "{model}", "-o", "", *CPU),
    ("evaluate", "--index", "{idx}", "--queries", "{imgs}", "--output", "", *CPU),
])
def test_an_empty_output_path_is_refused(built, image_folder, trained_model, tmp_path, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)
    args = [a.format(idx=built, imgs=image_folder, model=trained_model) for a in cmd]
    one_error(run(*args), "is empty")
    assert os.listdir(tmp_path) == []  # nothing written into the current folder


@pytest.mark.parametrize("flags", [("--finetune", "--frozen"), ("--unsupervised", "--frozen"),
                                   ("--finetune", "--unsupervised")])
def test_training_methods_exclude_each_other(image_folder, tmp_path, flags):
    out = str(tmp_path / "m.pt")
    one_error(run("train", image_folder, "-o", out, "--backbone", "smallcnn", "--epochs", "1", *flags, *CPU),
              "exclude each other")
    assert not os.path.exists(out)


def test_resume_refuses_options_its_checkpoint_fixes(image_folder, trained_model, tmp_path):
    one_error(run("train", image_folder, "-o", str(tmp_path / "r.pt"), "--resume", trained_model, "--bits", "32",
                  "--backbone", "alexnet", *CPU), "--resume", "--bits", "--backbone")


@pytest.mark.parametrize("args, needle", [(("--lr", "inf"), "--lr"), (("--lr", "nan"), "--lr"),
                                          (("--seed", "-1"), "--seed"), (("--ema-epochs", "inf"), "--ema-epochs"),
                                          (("--val-fraction", "0.99"), "leaves no training images")])
def test_training_numbers_are_checked_before_training(image_folder, tmp_path, args, needle):
    out = str(tmp_path / "m.pt")
    last_error(run("train", image_folder, "-o", out, "--backbone", "smallcnn", "--epochs", "1", *args, *CPU), needle)
    assert not os.path.exists(out)


def test_a_diverged_training_is_an_error_not_a_model(image_folder, tmp_path):
    from deephash_faiss.errors import DhfError
    from deephash_faiss.train import check_finite_loss

    check_finite_loss({"epoch": 1, "loss": 2.3})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(DhfError, match="diverged at epoch 3"):
            check_finite_loss({"epoch": 3, "loss": bad})
    out = str(tmp_path / "m.pt")
    r = run("train", image_folder, "-o", out, "--backbone", "smallcnn", "--epochs", "3", "--lr", "1e30",
            "--val-fraction", "0", *CPU)
    last_error(r, "diverged", "lower --lr")


def test_evaluate_skips_unknown_classes_and_bad_files(built, image_folder, tmp_path):
    """Queries of a class the index lacks are left out (their AP of 0 would only dilute the
    mean), and an undecodable query is skipped with a note, as in `dhf search`."""
    q = tmp_path / "q"
    shutil.copytree(os.path.join(image_folder, "red"), q / "red")
    ref = json.loads(run("evaluate", "--index", built, "--queries", str(q), "--json", "--no-plots", *CPU,
                         ok=True).stdout)
    shutil.copytree(os.path.join(image_folder, "green"), q / "purple")  # not a class of the index
    (q / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n trunc")
    r = run("evaluate", "--index", built, "--queries", str(q), "--json", "--no-plots", *CPU, ok=True)
    got = json.loads(r.stdout)
    assert "purple" in r.stderr and "broken.png" in r.stderr
    assert got["n_queries"] == ref["n_queries"] and got["skipped_queries"] == ref["n_queries"] + 1
    for m in ("bcs", "hds", "es"):
        assert got[m]["map_at_k"] == pytest.approx(ref[m]["map_at_k"])


def _read_only(path):
    """Make ``path`` refuse new files (chmod for a user, chattr +i for root); None if impossible."""
    import subprocess

    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    r = subprocess.run(["chattr", "+i", path], capture_output=True)
    if r.returncode != 0:
        return None
    return lambda: subprocess.run(["chattr", "-i", path], check=True)


def test_a_read_only_index_is_refused_before_the_work(built, image_folder, tmp_path):
    idx = str(tmp_path / "ro")
    shutil.copytree(built, idx)
    undo = _read_only(idx)
    if undo is None:
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    try:
        for cmd in (("add", idx, image_folder, *CPU), ("remove", idx, "--ids", "1"), ("compact", idx),
                    ("fine-index", idx)):
            one_error(run(*cmd), "cannot write")
    finally:
        undo()
    from deephash_faiss import maintain

    assert maintain.verify(idx) == []


def test_the_training_mode_says_why_labels_are_not_used(image_folder, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(os.path.join(image_folder, "red"), one / "red")
    r = run("train", str(one), "-o", str(tmp_path / "a.pt"), "--backbone", "smallcnn", *CPU, ok=True)
    assert "one class subfolder, red" in r.stderr and "random network" in r.stderr
    mixed = tmp_path / "mixed"
    shutil.copytree(os.path.join(image_folder, "red"), mixed / "red")
    shutil.copytree(os.path.join(image_folder, "green"), mixed / "green")
    for name in sorted(os.listdir(mixed / "green"))[:3]:
        shutil.copy(mixed / "green" / name, mixed / f"loose-{name}")
    r = run("train", str(mixed), "-o", str(tmp_path / "b.pt"), "--backbone", "smallcnn", *CPU, ok=True)
    assert "3 of its 51 images lie directly in the folder" in r.stderr


def test_debug_after_the_subcommand(tmp_path):
    r = run("search", "--index", str(tmp_path / "nope"), "--query", "q.jpg", "--debug")
    assert r.exit_code == 1 and "Traceback" in r.output and "No such option" not in r.output


def test_add_of_only_undecodable_images_keeps_the_index(built, tmp_path):
    idx = str(tmp_path / "idx")
    shutil.copytree(built, idx)
    before = json.load(open(os.path.join(idx, "manifest.json")))
    last_error(run("add", idx, _bad_folder(str(tmp_path / "bad")), *CPU), "could be decoded", "was not changed")
    assert json.load(open(os.path.join(idx, "manifest.json"))) == before
    assert not [n for n in os.listdir(idx) if n.startswith(".partial-")]


def test_options_without_effect_get_a_note(built, image_folder, trained_model, tmp_path):
    q = os.path.join(image_folder, "red", sorted(os.listdir(os.path.join(image_folder, "red")))[0])
    r = run("search", "--index", built, "--query", q, "--mode", "bcs", "--nprobe", "4", "-k", "2", *CPU, ok=True)
    assert "note: --nprobe has no effect with --mode bcs" in r.stderr
    r = run("search", "--index", built, "--query", q, "--hds-mode", "exact", "--refine", "8", "-k", "2", *CPU,
            ok=True)
    assert "note: --refine has no effect with --hds-mode exact" in r.stderr
    r = run("build-index", image_folder, "--model", trained_model, "-o", str(tmp_path / "i"), "--index-type",
            "flat", "--nhash", "4", *CPU, ok=True)
    assert "note: --nhash has no effect with --index-type flat" in r.stderr
    r = run("search", "--index", built, "--query", q, "-k", "2", *CPU, ok=True)
    assert "note:" not in r.stderr
