"""Gradio demo; same as `vartk demo` (see `python demos/app.py --help`)."""
from vartk.demo import main

if __name__ == "__main__":
    main()
