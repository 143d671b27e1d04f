"Comparing a run's printed outputs with the committed ones (tools/compare_outputs.py): what it leaves out, and what it catches."
import sys
from pathlib import Path

import nbformat
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import compare_outputs  # noqa: E402


def _table(df: pd.DataFrame):
    return nbformat.v4.new_output("execute_result", data={"text/html": df.to_html(), "text/plain": df.to_string()})


def _stream(text: str):
    return nbformat.v4.new_output("stream", name="stdout", text=text)


def _chapter(folder: Path, outputs_per_cell, sources=None, name="03_probing.ipynb") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter")]
    for i, outputs in enumerate(outputs_per_cell):
        cell = nbformat.v4.new_code_cell(sources[i] if sources else f"cell_{i}()")
        cell.outputs = outputs
        nb.cells.append(cell)
    nbformat.write(nb, folder / name)
    return folder / name


def _scores(loss: float, seconds: float) -> pd.DataFrame:
    return pd.DataFrame({"phone accuracy": [0.812, 0.455], "final loss": [loss, 2.0], "train_seconds": [seconds, 12.0]}, index=["cpc", "mfcc"])


def test_timings_paths_and_build_logs_are_left_out(tmp_path):
    committed = [[_stream("CPC ready in 0.4 s; 0.71 M parameters\nsaved to /work/main/data/course/cpc\n")],
                 [_table(_scores(1.25, 130.9))], [_stream("probe 0.812 in 12.3 s (177x real time), 114.4 ms/step\n")],
                 [_stream("build: {'final_loss': 0.0202, 'ms_per_step': 68.71, 'train_seconds': 12.5}\n"
                          "200 questions answered in 0.4 s (557.5 per second)\n"
                          "first unit after 2.0, 4.0 steps (8, 13 ms vs 32, 17, 26 ms in this run)\n")]]
    ours = [[_stream("CPC step 150/1500 loss 3.8346 lr 1.99e-03 117.2 ms/step\nCPC ready in 250.1 s; 0.71 M parameters\n"
                     "saved to /tmp/fresh/data/course/cpc\n"),
             nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": "bar"})],
            [_table(_scores(1.25, 250.0))], [_stream("probe 0.812 in 40.0 s (30x real time), 300.0 ms/step\n")],
            [_stream("build: {'final_loss': 0.0202, 'ms_per_step': 64.88, 'train_seconds': 30.1}\n"
                     "200 questions answered in 1.2 s (172.0 per second)\n"
                     "first unit after 2.0, 4.0 steps (8, 12 ms vs 33, 16, 27 ms in this run)\n")]]
    a, b = _chapter(tmp_path / "run", ours), _chapter(tmp_path / "nbs", committed)
    assert compare_outputs.compare_chapter(a, b) == []
    assert compare_outputs.main(["--ours", str(tmp_path / "run"), "--committed", str(tmp_path / "nbs")]) == 0


def test_a_changed_score_is_caught_line_by_line(tmp_path, capsys):
    committed = [[_table(_scores(1.25, 130.9))],
                 [_stream("holds: A beats B (0.9 vs 0.1)\nbuild: {'final_loss': 0.0202}\n15.1 vs 12.8 positions per second\n"
                          "first unit after 2.0, 4.0 steps (8, 13 ms)\n")]]
    ours = [[_table(_scores(1.31, 130.9))],
            [_stream("DOES NOT HOLD: A beats B (0.4 vs 0.5)\nbuild: {'final_loss': 0.0213}\n15.1 vs 12.9 positions per second\n"
                     "first unit after 2.0, 5.0 steps (8, 13 ms)\n")]]
    a, b = _chapter(tmp_path / "run", ours), _chapter(tmp_path / "nbs", committed)
    diffs = compare_outputs.compare_chapter(a, b)
    assert [d["cell"] for d in diffs] == [0, 1]
    assert diffs[0]["only_ours"] == ["cpc | 0.812 | 1.31 | <t>"] and diffs[0]["only_committed"] == ["cpc | 0.812 | 1.25 | <t>"]
    # a loss is a result, not a timing; a rate is one too, unless it stands beside a wall time
    assert diffs[1]["only_ours"][1:] == ["build: {'final_loss': 0.0213}", "15.1 vs 12.9 positions per second",
                                         "first unit after 2.0, 5.0 steps (<t>)"]  # steps are counts, not wall times
    assert compare_outputs.main(["--ours", str(tmp_path / "run"), "--committed", str(tmp_path / "nbs")]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT HOLD: A beats B (0.4 vs 0.5)" in out and "0 of 1 chapters print the same" in out


def test_other_sources_and_missing_chapters_are_reported(tmp_path, capsys):
    _chapter(tmp_path / "nbs", [[_stream("1\n")]], sources=["print(1)"])
    _chapter(tmp_path / "nbs", [[_stream("2\n")]], name="04_ssl.ipynb")
    _chapter(tmp_path / "run", [[_stream("1\n")]], sources=["print(1)  # edited"])
    assert compare_outputs.main(["--ours", str(tmp_path / "run"), "--committed", str(tmp_path / "nbs")]) == 1
    out = capsys.readouterr().out
    assert "other sources than the committed notebook" in out and "04_ssl: not in" in out and "1 not run" in out


def test_bad_arguments_are_named(tmp_path, capsys):
    _chapter(tmp_path / "nbs", [[_stream("1\n")]])
    assert compare_outputs.main(["--ours", str(tmp_path / "nowhere"), "--committed", str(tmp_path / "nbs")]) == 2
    assert "--ours: expected a folder" in capsys.readouterr().err
    assert compare_outputs.main(["--ours", str(tmp_path / "nbs"), "--committed", str(tmp_path / "nbs"), "--only", "99"]) == 2
    assert "--only: no chapter" in capsys.readouterr().err
    assert compare_outputs.main(["--ours", str(tmp_path / "nbs"), "--committed", str(tmp_path / "nbs"), "--lines", "-1"]) == 2
    assert "--lines: expected a count >= 0, got -1" in capsys.readouterr().err
