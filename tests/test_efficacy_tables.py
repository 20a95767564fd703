"""benchmarks/efficacy.py's goal table (each target beside the worst run) and group table (means beside
worst cases), clip-recipe worlds apart; the mean of several jobs' projectors; tables of saved runs."""
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch  # noqa: E402
from efficacy import goal_table, group_table, mean_projector  # noqa: E402


def row(variant, world, seed, exact, mc, retain, twin=None, relearn="absent", text=0.0):
    r = dict(variant=variant, world=world, model="llava", forget_people=1, seed=seed, chance=0.05,
             forget_exact=exact, forget_mc=mc, retain_drop=retain, twin_drop=twin, text_dnll=text)
    if relearn != "absent":
        r["relearn"] = relearn
    return r


def test_goal_table_takes_the_worst_run_per_world_kind_and_compares_relearning():
    rows = [row("default", "clip-recipe", 0, 5, 30, 2.0, relearn=None),
            row("default", "bench", 0, 10, 40, 9.0, relearn=20),
            row("v", "clip-recipe", 0, 15, 60, 1.0, relearn=12),
            row("v", "clip-lookalike", 1, 0, 20, 7.5, twin=40.0),
            row("v", "bench", 0, 40, 90, 3.0, relearn=30, text=1e-3)]
    lines = goal_table(rows, "v").splitlines()
    cells = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    assert cells["forget exact"] == ["<= chance + 5", "chance + 10", "<= chance + 5", "chance + 35"]
    assert cells["forget MC"] == ["<= 35%", "60%", "<= 40%", "90%"]
    assert cells["retain drop"] == ["<= 1", "7.5", "<= 12", "3.0"]
    assert cells["twin drop"][1] == "40.0" and cells["twin drop"][3] == "-"
    assert cells["text answers"][1] == "bit-identical in 2 of 2 runs"
    assert cells["text answers"][3] == "bit-identical in 0 of 1 runs"
    # 12 steps against the default's "not within 40": fewer; 30 against 20: not fewer
    assert cells["relearning"][1] == "min 12; fewer than the default in 1 of 1"
    assert cells["relearning"][3] == "min 30; fewer than the default in 0 of 1"


def test_group_table_counts_forgetting_runs_and_puts_means_beside_worst_cases():
    rows = [row("v", "clip-recipe", 0, 5, 30, 2.0),
            row("v", "clip-lookalike", 1, 15, 10, 4.0, twin=40.0),
            row("v", "bench", 0, 40, 90, 3.0),
            row("w", "bench", 0, 0, 20, 1.0, twin=10.0)]
    lines = group_table(rows).splitlines()
    cells = {line.strip("| ").split(" | ")[0]: line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    # chance 5%: exact 5 is within chance + 5, 15 is not
    assert cells["v"] == ["1 / 2", "20.0% / 30.0%", "3.0 / 4.0", "40.0 / 40.0", "0 / 1", "90.0% / 90.0%", "3.0 / 3.0", "-"]
    assert cells["w"] == ["-", "-", "-", "-", "1 / 1", "20.0% / 20.0%", "1.0 / 1.0", "10.0 / 10.0"]


def test_the_mean_of_jobs_counts_an_untouched_tensor_as_the_original():
    original = {"a": torch.zeros(2), "b": torch.ones(2), "c": torch.full((2,), 5.0)}
    names = {"a": "proj.a", "b": "proj.b", "c": "proj.c"}
    jobs = [[{"name": "proj.a", "new": torch.tensor([3.0, 6.0])}],
            [{"name": "proj.a", "new": torch.tensor([1.0, 0.0])}, {"name": "proj.b", "new": torch.tensor([4.0, 7.0])}]]
    mean = mean_projector(original, jobs, names)
    assert set(mean) == {"a", "b"}  # c: no job changed it
    torch.testing.assert_close(mean["a"], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(mean["b"], torch.tensor([2.5, 4.0]))  # (1 + 4) / 2, (1 + 7) / 2


def test_tables_of_saved_runs_keep_the_draws_asked_for(tmp_path):
    rows = [dict(row("v", "bench", seed, 0, 25, retain), retain_mc_drop=0.0, text_exact_drop=0.0, steps_kept=None,
                 job_warnings=0) for seed, retain in ((0, 2.0), (3, 30.0))]
    (tmp_path / "runs.json").write_text(json.dumps({"rows": rows}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "efficacy.py"

    def variant_line(*seeds):
        out = subprocess.run([sys.executable, str(script), "--table", str(tmp_path / "runs.json"), "--seeds", *seeds],
                             capture_output=True, text=True, check=True).stdout
        return next(line for line in out.splitlines() if line.startswith("| v | "))

    first, both = variant_line("0"), variant_line("0", "3")
    assert first.split(" | ")[1] == "1" and " 2.0 | " in first
    assert both.split(" | ")[1] == "2" and " 30.0 | " in both
