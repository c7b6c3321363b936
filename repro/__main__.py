"""`python -m repro` runs the Hydra app."""

from repro.cli import main

if __name__ == "__main__":
    main()
