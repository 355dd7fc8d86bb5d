"""MkDocs hook: serve MathJax from the site itself, so that the equations render with no network.

The script comes from the django-static-mathjax package (MathJax 3's distribution as package data; in
the `docs` extra). ``tex-svg-full.js`` is one file with every TeX extension and SVG output, so it
loads nothing else: no fonts, no extensions fetched on demand.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

MATHJAX_SCRIPT = "tex-svg-full.js"
SITE_PATH = f"assets/mathjax/{MATHJAX_SCRIPT}"


def mathjax_script() -> Path:
    try:
        import mathjax  # the django-static-mathjax distribution
    except ImportError as error:
        raise PluginError(
            "the documentation needs the django-static-mathjax package for MathJax "
            "(pip install 'mlstm-spec[docs]')") from error
    path = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5" / MATHJAX_SCRIPT
    if not path.is_file():
        raise PluginError(f"django-static-mathjax has no {path}; expected MathJax 3's es5 build there")
    return path


def on_files(files, config):
    files.append(File.generated(config, SITE_PATH, abs_src_path=str(mathjax_script())))
    return files
