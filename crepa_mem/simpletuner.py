"""Old path of `crepa_mem.integrations.simpletuner`, kept for `python -m crepa_mem.simpletuner` and imports."""
from crepa_mem.integrations.simpletuner import *  # noqa: F401,F403
from crepa_mem.integrations.simpletuner import __all__, main  # noqa: F401

if __name__ == "__main__":
    main()
