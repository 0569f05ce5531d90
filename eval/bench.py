"""Sampling speed / memory table; see `python eval/bench.py --help` (same as `vartk bench`)."""
from vartk.bench import main

if __name__ == "__main__":
    main()
