"""``python -m colo_cli`` is ``colo-compare``."""

from .cli import main

main()
