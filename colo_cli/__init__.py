"""colo-compare: compare the network output of two replicas packet by packet."""

__version__ = "0.1.0"

from ._build import install_pure_finder, pure_forced  # noqa: E402

if pure_forced():
    # run the core's pure-Python modules even where compiled ones are
    # installed (see _build.py)
    install_pure_finder()
