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
    assert docs_check.expected_media(tmp_path / "x.ipynb") == dict(figures=1, audio=2, math=0)


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
    assert docs_check.expected_media(tmp_path / "results.md") == dict(figures=2, audio=0, math=0)


def test_equations_are_counted_in_prose_only():
    assert docs_check.equations("With $L$ levels of $K$ codes, $L\\log_2 K$ bits:\n$$\\hat z = \\sum_\\ell q_\\ell$$") == 4
    assert docs_check.equations("`$OUT` and\n```bash\necho $HOME $PATH\n```\nno math") == 0  # code is not math
    assert docs_check.equations("it costs \\$5, or \\$6; a lone $ sign") == 0
    assert docs_check.equations("a network $v_\\theta(x_t \\mid\n\\text{units})$ wraps a line") == 1
    assert docs_check.equations("one $ sign here\n\nand one $ sign in the next paragraph") == 0


def test_tex_left_as_text_and_tex_errors_are_found():
    rendered = ('<p>a loss <span class="MathJax" id="MathJax-Element-1-Frame">1−cos</span>'
                '<script type="math/tex">1 - \\cos(h_t, h^{\\prime}_t)</script></p><pre>echo $a$</pre>'
                '<style>.MathJax .merror {color: red}</style>')
    assert docs_check.typeset_equations(rendered) == 1 and docs_check.raw_tex(rendered) == [] and docs_check.tex_errors(rendered) == 0
    assert docs_check.raw_tex("<p>a loss $1 - \\cos(h_t, h'_t)$, averaged</p>") == ["$1 - \\cos(h_t, h'_t)$"]
    failed = '<span class="MathJax_Error" id="MathJax-Element-2-Frame"><span>[Math Processing Error]</span></span>'
    assert docs_check.tex_errors(failed) == 1
    assert docs_check.tex_errors('<span class="MathJax"><span class="merror">Missing argument</span></span>') == 1


@pytest.mark.skipif(docs_check.find_browser() is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_the_static_site_typesets_equations_offline(tmp_path):
    "The static site carries its own MathJax: an equation is typeset with no network, and a page without MathJax fails the check."
    build_docs = pytest.importorskip("build_docs")
    mathjax = build_docs.local_mathjax()
    if mathjax is None: pytest.skip("jupyter-server-mathjax not installed")
    import shutil
    from nbconvert import HTMLExporter
    nbs, site = tmp_path / "nbs", tmp_path / "site"
    nbs.mkdir(); site.mkdir()
    (nbs / "sidebar.yml").write_text("website:\n  sidebar:\n    contents:\n      - 01_a.ipynb\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A\n" + "The levels of a residual quantizer add up: " * 20 + "$\\hat z = \\sum_{\\ell=1}^{L} q_\\ell$.")]
    nbformat.write(nb, nbs / "01_a.ipynb")
    shutil.copytree(mathjax, site / "mathjax")
    exporter = HTMLExporter(template_name="lab")
    exporter.mathjax_url = f"mathjax/MathJax.js?config={build_docs.MATHJAX_CONFIG}"
    body, _ = exporter.from_notebook_node(nb)
    nav = '<nav id="course-nav"><a href="01_a.html">A</a></nav>'
    (site / "01_a.html").write_text(body.replace("<body", "<body data-x", 1).replace("</h1>", "</h1>" + nav, 1))
    shots = site / "_check"; shots.mkdir()
    pages = docs_check.sidebar_pages(nbs)
    rep = docs_check.check_page(docs_check.find_browser(), site, "01_a.ipynb", pages, shots, nbs)
    assert rep.math == "1/1" and rep.problems == [], rep.problems
    shutil.rmtree(site / "mathjax")  # the same page with its MathJax gone: the TeX stays text
    rep = docs_check.check_page(docs_check.find_browser(), site, "01_a.ipynb", pages, shots, nbs)
    assert rep.math == "0/1" and any("equations not typeset" in p for p in rep.problems)
    assert any(p.startswith("TeX shown as text") for p in rep.problems), rep.problems
