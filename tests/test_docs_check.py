"The docs browser check (tools/docs_check.py): its checks catch a blank page, a broken figure and a missing chapter."
import base64
import io
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import docs_check  # noqa: E402


def _png(w=8, h=6) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.arange(w * h * 3).reshape(h, w, 3) % 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_visible_text_and_images():
    dom = f'<html><head><style>p{{}}</style></head><body><script>var x=1</script><p>Hello <b>there</b></p>' \
          f'<img src="data:image/png;base64,{_png()}"><img src="data:image/png;base64,AAAA"></body></html>'
    assert docs_check.visible_text(dom) == "Hello there"
    assert docs_check.decodable_images(dom) == (1, 1)


def test_a_table_left_as_text_is_found_and_a_rendered_one_is_not():
    "nbconvert's Markdown renderer gives up on a whole table when a cell holds a `|` in code (`<|audio|>`) and prints it as a paragraph."
    from nbconvert.filters.markdown_mistune import markdown2html_mistune
    broken = markdown2html_mistune("| # | chapter |\n|---|---|\n| 08 | chat and `<|audio|>` tokens |\n")
    fixed = markdown2html_mistune("| # | chapter |\n|---|---|\n| 08 | chat and <code>&lt;&#124;audio&#124;&gt;</code> tokens |\n")
    assert docs_check.raw_table_rows(broken) and "<table>" in fixed and docs_check.raw_table_rows(fixed) == []
    code = "<pre>| a | b |\n|---|---|</pre><p>a | b, then ---</p>"  # a table in a code block, pipes in prose
    assert docs_check.raw_table_rows(code) == []


def test_expected_media_counts_shown_figures_and_players(tmp_path):
    nb = nbformat.v4.new_notebook()
    fig = nbformat.v4.new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"})
    audio = nbformat.v4.new_output("display_data", data={"text/html": "<audio controls></audio><audio controls></audio>"})
    shown, hidden = nbformat.v4.new_code_cell("plot()"), nbformat.v4.new_code_cell("#| hide\nplot()")
    shown.outputs, hidden.outputs = [fig, audio], [fig]
    nb.cells = [shown, hidden]
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert docs_check.expected_media(tmp_path / "x.ipynb") == dict(figures=1, audio=2)


@pytest.mark.skipif(docs_check.find_browser() is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_a_blank_page_a_broken_figure_and_a_missing_chapter_fail(tmp_path):
    nbs, site = tmp_path / "nbs", tmp_path / "site"
    nbs.mkdir(); site.mkdir()
    (nbs / "sidebar.yml").write_text("website:\n  sidebar:\n    contents:\n      - index.ipynb\n      - 01_a.ipynb\n      - 02_b.ipynb\n")
    nb = nbformat.v4.new_notebook()
    c = nbformat.v4.new_code_cell("plot()")
    c.outputs = [nbformat.v4.new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"})]
    nb.cells = [c]
    for n in ("index", "01_a", "02_b"): nbformat.write(nb, nbs / f"{n}.ipynb")
    pages = docs_check.sidebar_pages(nbs)
    nav = '<nav id="course-nav"><a href="index.html">Home</a><a href="01_a.html">A</a></nav>'  # 02_b missing
    prose = "<p>" + "words " * 200 + "</p>"
    (site / "index.html").write_text(f'<html><body>{nav}<h1>Home</h1>{prose}<img src="data:image/png;base64,{_png()}"></body></html>')
    (site / "01_a.html").write_text("<html><body></body></html>")  # blank
    shots = site / "_check"; shots.mkdir()
    good = docs_check.check_page(docs_check.find_browser(), site, "index.ipynb", pages, shots, nbs)
    assert good.figures == "1/1" and any("navigation lacks" in p for p in good.problems) and not any("blank" in p for p in good.problems)
    blank = docs_check.check_page(docs_check.find_browser(), site, "01_a.ipynb", pages, shots, nbs)
    assert any(p.startswith("blank") for p in blank.problems) and any("figures missing" in p for p in blank.problems)
    assert docs_check.check_page(docs_check.find_browser(), site, "02_b.ipynb", pages, shots, nbs).problems == ["page missing"]


def test_expected_media_of_a_markdown_page_counts_its_png_images(tmp_path):
    (tmp_path / "results.md").write_text("# Results\n\n![a](results_files/a-1.png)\n\ntext ![b](results_files/b-1.png) ![c](c.svg)\n")
    assert docs_check.expected_media(tmp_path / "results.md") == dict(figures=2, audio=0)
