"""Where metalearn's own files are."""

from pathlib import Path

# The Hydra config tree (conf/ of the checkout, beside src/).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
