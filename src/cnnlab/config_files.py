"""Where the Hydra configs are: inside the package when installed from a wheel, beside `src/` in a checkout."""

from pathlib import Path


def config_dir() -> str:
    """The directory holding train.yaml and the config groups.

    A wheel carries the configs inside the package; a source checkout (editable install) keeps them at its root.
    """
    packaged = Path(__file__).parent / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "configs")
