"""`make docs`: build the docs site.

With Quarto installed this is nbdev's own `nbdev_docs` (site in _docs/). Quarto cannot be installed offline, so
without it we process the notebooks the way nbdev does for Quarto (`proc_nbs`: hide `#| hide` cells, render
`show_doc`, ...) and render each processed notebook to static HTML with nbconvert, adding a navigation sidebar
built from nbs/sidebar.yml, so the site can still be read and checked in a browser here. Its equations are typeset by
a copy of MathJax in the site (from the `jupyter-server-mathjax` wheel, a dev requirement), so they render offline
too; without that package the pages load MathJax from its CDN, as nbconvert does.

    python tools/build_docs.py                # the site
    python tools/build_docs.py --readme-only  # README.md from nbs/index.ipynb
"""
import argparse
import base64
import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import yaml

from speechllm_course.core import atomic_write

ROOT = Path(__file__).resolve().parents[1]
NBS, OUT = ROOT / "nbs", ROOT / "_docs"


def chapters() -> list[str]:
    "Page sources in sidebar order: notebooks, and Markdown pages such as results.md."
    side = yaml.safe_load((NBS / "sidebar.yml").read_text())
    return [c for c in side["website"]["sidebar"]["contents"] if isinstance(c, str) and c.endswith((".ipynb", ".md"))]


def html_name(page: str) -> str:
    return Path(page).with_suffix(".html").name


def _markdown_page(name: str):
    "A Markdown page as a one-cell notebook, its figures inlined (as nbconvert does for notebook outputs) so the page stands alone."
    text = (NBS / name).read_text(encoding="utf-8")
    inline = lambda m: f"![{m[1]}](data:image/png;base64,{base64.b64encode((NBS / m[2]).read_bytes()).decode()})"
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", inline, text))])


def _front_matter(nb) -> dict:
    "The YAML front matter nbdev's processing puts in a raw cell ('---' ... '---'), or {}."
    for c in nb.cells:
        if c.cell_type == "raw" and c.source.lstrip().startswith("---"):
            body = c.source.strip().strip("-")
            try: return yaml.safe_load(body) or {}
            except yaml.YAMLError: return {}
    return {}


def _title(nb) -> str:
    "The page title: the front matter's (processed notebooks), else the first '# ' heading."
    fm = _front_matter(nb)
    if fm.get("title"): return str(fm["title"])
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", c.source, re.M)
            if m:
                return m.group(1).strip()
    return "untitled"


def _for_static_html(nb):
    """What Quarto would do with a processed notebook and nbconvert does not: the front matter becomes the page's title and
    summary, `#| echo: false` cells show only their output, and Quarto's link attributes ({target=...}) go."""
    fm = _front_matter(nb)
    cells = []
    for c in nb.cells:
        if c.cell_type == "raw" and c.source.lstrip().startswith("---"):
            if fm.get("title"):
                head = f"# {fm['title']}" + (f"\n\n> {' '.join(str(fm['description']).split())}" if fm.get("description") else "")
                cells.append(nbformat.v4.new_markdown_cell(head))
            continue
        if c.cell_type == "code" and re.search(r"^#\|\s*echo:\s*false", c.source, re.M):
            c.metadata.setdefault("tags", []).append("hide-input")
        if c.cell_type == "code":
            for o in c.get("outputs", []):
                md = o.get("data", {}).get("text/markdown")
                if md: o["data"]["text/markdown"] = re.sub(r"\{target=\"_blank\"[^}]*\}", "", "".join(md))
        cells.append(c)
    nb.cells = cells
    return nb


def _strip_hidden(nb):
    "Drop cells nbdev would not show (#| hide, the Colab install cell, default_exp)."
    keep = []
    for c in nb.cells:
        first = c.source.lstrip().splitlines()[:3]
        directives = [l.replace(" ", "") for l in first if l.replace(" ", "").startswith("#|")]
        if any(d.startswith(("#|hide", "#|default_exp", "#|include:false")) for d in directives):
            continue
        keep.append(c)
    nb.cells = keep
    return nb


def write_readme() -> Path:
    "README.md from nbs/index.ipynb (what nbdev_readme does, without Quarto)."
    nb = _strip_hidden(nbformat.read(NBS / "index.ipynb", as_version=4))
    parts = []
    for c in nb.cells:
        if c.cell_type == "markdown":
            src = re.sub(r"\]\((\d\d[a-z]?_[a-z_]+\.ipynb|results\.md)\)", r"](nbs/\1)", c.source)  # links work from the repo root
            parts.append(src.replace("> ", "> ", 1))
        elif c.cell_type == "code":
            parts.append(f"```python\n{c.source}\n```")
    text = "<!-- generated from nbs/index.ipynb by `make readme`: edit the notebook, not this file -->\n\n" + "\n\n".join(parts) + "\n"
    with atomic_write(ROOT / "README.md", "w", encoding="utf-8") as f: f.write(text)
    return ROOT / "README.md"


MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full"  # nbconvert's own choice: TeX and MathML input, HTML-CSS output


def local_mathjax() -> Path | None:
    "The folder holding MathJax.js from the `jupyter-server-mathjax` package, or None when it is not installed."
    try: import jupyter_server_mathjax
    except ImportError: return None
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    return static if (static / "MathJax.js").is_file() and (static / "config" / f"{MATHJAX_CONFIG}.js").is_file() else None


def static_site() -> Path:
    "Process the notebooks like nbdev does, then render them to HTML with a sidebar."
    from nbconvert import HTMLExporter
    from nbdev.serve import proc_nbs
    proc = Path(proc_nbs(NBS))  # -> _proc/ with nbdev's processors applied
    names = chapters()
    titles = {}
    pages = {}
    for n in names:
        p = proc / n
        if n.endswith(".md"):
            if not (NBS / n).exists(): raise SystemExit(f"sidebar.yml lists {n}, but nbs/{n} does not exist")
            pages[n] = _markdown_page(n)
        elif not p.exists():
            raise SystemExit(f"sidebar.yml lists {n}, but nbs/{n} does not exist")
        else:
            pages[n] = _for_static_html(_strip_hidden(nbformat.read(p, as_version=4)))
        titles[n] = _title(pages[n])
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    from nbconvert.preprocessors import TagRemovePreprocessor
    exporter = HTMLExporter(template_name="lab")
    mathjax = local_mathjax()
    if mathjax is not None:
        shutil.copytree(mathjax, OUT / "mathjax")
        exporter.mathjax_url = f"mathjax/MathJax.js?config={MATHJAX_CONFIG}"
    else:
        print("jupyter-server-mathjax not installed: the pages load MathJax from its CDN (no equations offline)", file=sys.stderr)
    exporter.register_preprocessor(TagRemovePreprocessor(remove_input_tags={"hide-input"}), enabled=True)
    for n in names:
        body, _ = exporter.from_notebook_node(pages[n])
        page = html_name(n)
        nav = "".join(f'<li class="{"active" if m == n else ""}"><a href="{html_name(m)}">{html.escape(titles[m])}</a></li>'
                      for m in names)
        sidebar = (f'<nav id="course-nav" aria-label="chapters"><div class="course-title">speechllm-course</div>'
                   f'<ul>{nav}</ul></nav>')
        style = ("<style>#course-nav{position:fixed;top:0;left:0;width:230px;height:100%;overflow:auto;background:#f6f7f9;"
                 "border-right:1px solid #ddd;padding:12px;font:14px sans-serif}#course-nav ul{list-style:none;padding:0}"
                 "#course-nav li{margin:6px 0}#course-nav li.active a{font-weight:bold}"
                 ".course-title{font-weight:bold;font-size:16px}body{margin-left:250px!important}</style>")
        body = body.replace("</head>", style + "</head>", 1).replace("<body", "<body", 1)
        body = re.sub(r"(<body[^>]*>)", r"\1" + sidebar.replace("\\", "\\\\"), body, count=1)
        body = re.sub(r'href="(\d\d[a-z]?_[a-z_]+|index)\.ipynb', r'href="\1.html', body)  # cross-links between chapters
        (OUT / page).write_text(body, encoding="utf-8")
    (OUT / "index.html").exists() or shutil.copy(OUT / html_name(names[0]), OUT / "index.html")
    return OUT


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme-only", action="store_true")
    args = ap.parse_args()
    print("README:", write_readme().relative_to(ROOT))
    if args.readme_only:
        return 0
    if shutil.which("quarto"):
        return subprocess.call([str(Path(sys.executable).with_name("nbdev_docs"))], cwd=ROOT)
    out = static_site()
    print(f"Quarto not found: static site in {out.relative_to(ROOT)}/ ({len(list(out.glob('*.html')))} pages); "
          f"open {out.relative_to(ROOT)}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
