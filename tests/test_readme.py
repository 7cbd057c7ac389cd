"""The READMEs and results/: generated from the JSON, short where a newcomer starts, and no file unaccounted for."""
import glob
import json
import os
import re
import sys

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import update_readme  # noqa: E402

READMES = ["README.md", os.path.join("results", "README.md"), os.path.join("results", "archive", "README.md")]


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def without_blocks(text):
    """The hand-written part of a README: its text outside the generated blocks."""
    return re.sub(r"<!-- results:(\w+) -->\n.*?<!-- /results:\1 -->", "", text, flags=re.S)


@pytest.mark.parametrize("name", list(update_readme.BLOCKS))
def test_the_tables_are_those_the_json_in_results_gives(name):
    """Running scripts/update_readme.py would change nothing: every table matches results/ as committed."""
    assert update_readme.render(name) == read(name), f"run python scripts/update_readme.py: {name} is stale"


def test_the_readme_is_short_and_starts_with_the_quick_start():
    lines = read("README.md").splitlines()
    assert len(lines) <= 300
    first_screen = "\n".join(lines[:40])
    for command in ("pip install -r requirements.txt", "python -m data.tinyshakespeare",
                    "python train_gpt2.py --config tiny", "python scripts/sample.py out/tiny"):
        assert command in first_screen, command


def test_no_measured_figure_is_typed_into_the_readmes():
    """Times, memory, rates and ratios appear only inside the generated blocks (a configuration's sizes and factors
    may be written: 2^19 tokens, 50,304 words, 8× the tokens)."""
    figure = re.compile(r"\d[\d,.]*\s?(?:ms\b|GiB|GB/s|TFLOP/s|tok(?:ens)?/s|%)|\d\.\d+\s?[x×]")
    for name in READMES:
        assert not figure.findall(without_blocks(read(name))), name


def test_every_link_of_the_readmes_leads_to_a_file():
    for name in READMES:
        folder = os.path.dirname(os.path.join(ROOT, name))
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", read(name)):
            if not target.startswith("http"):
                assert os.path.exists(os.path.join(folder, target)), f"{name} links {target}"


def stem(filename):
    return os.path.splitext(filename)[0]


def test_results_holds_only_what_the_readmes_show_and_the_archive_lists_the_rest():
    """A top-level file of results/ is named in README.md or results/README.md (a comparison's .md and .png go with
    its .json); a run folder results/runs/<gpu>/<name> belongs to a comparison shown; everything in archive/ has its
    line in archive/README.md."""
    shown = read("README.md") + read(os.path.join("results", "README.md"))
    kept = [f for f in os.listdir(RESULTS) if f not in ("README.md", "archive", "runs")]
    assert [f for f in kept if f"{stem(f)}.json" not in shown and f not in shown] == []
    runs = os.path.join(RESULTS, "runs")
    for gpu in os.listdir(runs):
        for name in os.listdir(os.path.join(runs, gpu)):
            assert f"compare_{name}_{gpu}.json" in kept, f"results/runs/{gpu}/{name}"

    archive = os.path.join(RESULTS, "archive")
    index = read(os.path.join("results", "archive", "README.md"))
    listed = set(re.findall(r"^\| `([\w-]+)` \|", index, flags=re.M))
    archived = {stem(f) for f in os.listdir(archive) if f not in ("README.md", "runs")}
    assert archived == listed
    for gpu in os.listdir(os.path.join(archive, "runs")):
        for name in os.listdir(os.path.join(archive, "runs", gpu)):
            assert f"compare_{name}_{gpu}" in archived, f"results/archive/runs/{gpu}/{name}"


@pytest.mark.parametrize("folder", ["results", os.path.join("results", "archive")])
def test_each_comparisons_run_folders_hold_the_runs_of_its_table(folder):
    """results/runs/<gpu>/<name>/<backend>-<mode>/, where it was kept, is the run behind that row of
    compare_<name>_<gpu>.json: its summary gives the row's loss and ms/step (a later comparison of the same name must
    not sit beside older runs). Some comparisons' runs stayed on the GPU machine."""
    for path in sorted(glob.glob(os.path.join(ROOT, folder, "compare_*.json"))):
        name, gpu = stem(os.path.basename(path))[len("compare_"):].rsplit("_", 1)
        with open(path) as f:
            rows = [r for r in json.load(f)["rows"] if r["status"] == "ok"]
        for r in rows:
            run = os.path.join(ROOT, folder, "runs", gpu, name, f"{r['backend']}-{'compile' if r['compile'] else 'eager'}")
            if not os.path.isdir(run):
                continue
            with open(os.path.join(run, "summary.json")) as f:
                summary = json.load(f)
            assert (summary["final_loss"], summary["mean_ms"]) == (r["loss"], r["ms"]), run


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_numpy_is_bounded_where_triton_3_6_is_installed(platform):
    """Triton 3.6's CPU interpreter fails with numpy 2.4: wherever requirements.txt installs Triton 3.6, it keeps
    numpy below 2.4."""
    env = {"sys_platform": platform}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        wanted = [Requirement(line.split("#")[0]) for line in f if line.split("#")[0].strip()]
    wanted = {r.name: r.specifier for r in wanted if r.marker is None or r.marker.evaluate(env)}
    assert "numpy" in wanted
    if "triton" in wanted and wanted["triton"].contains("3.6.0"):
        assert not wanted["numpy"].contains("2.4.0") and wanted["numpy"].contains("2.3.5")
