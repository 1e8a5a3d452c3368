"""Sphinx configuration of the skdict documentation.

Build (from the repository root)::

    python -m sphinx -W --keep-going -b html doc doc/_build/html

Add ``-D plot_gallery=0`` to skip running the gallery examples.
No extension reaches the network (intersphinx is off).
"""

import os
import sys
import warnings
from importlib.util import find_spec

sys.path.insert(0, os.path.abspath(".."))

import skdict  # noqa: E402

project = "skdict"
author = "the skdict developers"
copyright = "2026, the skdict developers"
version = release = skdict.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb",
                    "auto_examples/*.py", "auto_examples/*.zip"]
default_role = "literal"

# -- autodoc / autosummary / numpydoc ----------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False



def _skip_metadata_request(app, what, name, obj, skip, options):
    """scikit-learn's generated ``set_*_request`` methods are not skdict API."""
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_metadata_request)


# -- sphinx-gallery ----------------------------------------------------------------
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings(
    "ignore", category=UserWarning,
    message="Matplotlib is currently using agg, which is a non-GUI backend",
)
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("matplotlib",),
    "doc_module": ("skdict",),
    "backreferences_dir": "generated/backreferences",
}

# -- HTML --------------------------------------------------------------------------
if find_spec("pydata_sphinx_theme") is not None:
    html_theme = "pydata_sphinx_theme"
    html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}
else:
    html_theme = "alabaster"
html_title = f"skdict {release}"
html_static_path = ["_static"]
html_show_sourcelink = False

# no network: no intersphinx, no remote images
intersphinx_mapping = {}
