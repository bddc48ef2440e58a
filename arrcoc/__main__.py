"""``python -m arrcoc``: the ``arrcoc`` command, for launchers that run a module (``torchrun -m arrcoc eval ...``)."""

from .cli import main

if __name__ == "__main__":
    main()
