"""``python -m ddpmctl`` (and ``torchrun -m ddpmctl``) runs the command-line interface."""

from ddpmctl.cli.main import main

if __name__ == "__main__":
    main()
