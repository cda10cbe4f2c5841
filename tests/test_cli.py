"""The dhf command line end to end on a small generated labelled image folder."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from deephash_faiss.cli import main


def run(*args):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r


@pytest.fixture(scope="module")
def built(image_folder, trained_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "idx")
    r = run("build-index", image_folder, "--model", trained_model, "-o", out, "-q", "--shard-size", "30",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "indexed 72 images" in r.output
    return out


def test_train_command(image_folder, tmp_path):
    out = str(tmp_path / "m.pt")
    r = run("train", image_folder, "-o", out, "--backbone", "smallcnn", "--bits", "16", "--epochs", "1",
            "--batch-size", "16", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert os.path.exists(out) and "smallcnn, 16 bits, 3 classes" in r.output


def test_search_json_returns_same_class(built, image_folder):
    for cls in ("red", "green", "blue"):
        q = os.path.join(image_folder, cls, "003.png")
        for mode in ("bcs", "hds", "es"):
            r = run("search", "--query", q, "--index", built, "--mode", mode, "-k", "10", "--json",
                    "--device", "cpu")
            assert r.exit_code == 0, r.output
            out = json.loads(r.output)
            assert out["mode"] == mode and out["query"] == q
            assert len(out["results"]) == 10
            assert set(out["results"][0]) >= {"rank", "path", "label", "hamming", "distance"}
            assert [x["rank"] for x in out["results"]] == list(range(1, 11))
            same = sum(x["label"] == cls for x in out["results"])
            assert same >= 8, (mode, cls, out["results"])
            if mode == "bcs":
                assert all(x["distance"] is None for x in out["results"])
                hs = [x["hamming"] for x in out["results"]]
                assert hs == sorted(hs)
            else:
                ds = [x["distance"] for x in out["results"]]
                assert ds == sorted(ds)


def test_search_folder_batch_and_table(built, image_folder):
    r = run("search", "--query", os.path.join(image_folder, "red"), "--index", built, "-k", "3", "--json",
            "--device", "cpu")
    assert r.exit_code == 0
    assert len(json.loads(r.output)) == 24
    r = run("search", "--query", os.path.join(image_folder, "red", "000.png"), "--index", built, "-k", "3",
            "--device", "cpu")
    assert r.exit_code == 0 and "rank" in r.output and "red" in r.output


def test_info(built):
    r = run("info", built)
    assert r.exit_code == 0 and "72" in r.output and "16 bits" in r.output
    m = json.loads(run("info", built, "--json").output)["manifest"]
    assert m["count"] == 72 and len(m["shards"]) == 3 and m["bits"] == 16


def _one_line_error(r):
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "Traceback" not in r.output
    return lines[0]


def test_bad_paths_give_one_line_errors(built, tmp_path, image_folder):
    assert "no such file" in _one_line_error(run("search", "--query", str(tmp_path / "nope.jpg"), "--index", built))
    assert "no such index directory" in _one_line_error(
        run("search", "--query", os.path.join(image_folder, "red", "000.png"), "--index", str(tmp_path / "x")))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images found" in _one_line_error(run("search", "--query", str(empty), "--index", built))
    assert "no such folder" in _one_line_error(run("build-index", str(tmp_path / "none"), "-o", str(tmp_path / "o")))
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(os.path.join(image_folder, "red", "000.png"), flat / "a.png")
    assert "no --model given" in _one_line_error(run("build-index", str(flat), "-o", str(tmp_path / "o2")))
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert "cannot use query" in _one_line_error(run("search", "--query", str(bad), "--index", built))
    assert "-k" in _one_line_error(run("search", "--query", os.path.join(image_folder, "red", "000.png"),
                                       "--index", built, "-k", "0"))
    assert "larger than the index" in _one_line_error(
        run("search", "--query", os.path.join(image_folder, "red", "000.png"), "--index", built, "-k", "1000"))


def test_model_index_bit_mismatch(built, image_folder, tmp_path):
    from deephash_faiss.model import build_model, save_checkpoint

    m = build_model("smallcnn", 32, ["red", "green", "blue"], weights="none", load_size=24)
    p = str(tmp_path / "m32.pt")
    save_checkpoint(m, p)
    line = _one_line_error(run("search", "--query", os.path.join(image_folder, "red", "000.png"), "--index",
                               built, "--model", p))
    assert "32-bit codes but the index has 16-bit codes" in line


def test_build_without_model_trains_first(image_folder, tmp_path):
    out = str(tmp_path / "auto")
    r = run("build-index", image_folder, "-o", out, "--backbone", "smallcnn", "--bits", "16", "--epochs", "1",
            "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "no --model given: fine-tuning" in r.output
    assert os.path.exists(os.path.join(out, "model.pt"))


def test_console_script_help():
    exe = shutil.which("dhf") or os.path.join(os.path.dirname(sys.executable), "dhf")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "build-index" in out.stdout and "search" in out.stdout
