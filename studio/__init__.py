"""The studio: train small adapters on a few images and compose them at sampling time.

>>> import studio
>>> (studio.ASSETS / "__init__.py").is_file()
True
"""

from importlib.util import find_spec
from pathlib import Path

__version__ = "0.1.0"

# The shipped assets: the repository's assets/ folder in a checkout or an editable install,
# site-packages/studio/assets after a plain `pip install .`.
ASSETS = Path(find_spec("studio.assets").submodule_search_locations[0])
