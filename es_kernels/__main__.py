"""``es-kernels <command>`` / ``python -m es_kernels <command>``."""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: es-kernels <command> [options]\n\n"
            "Evolved Sampling (ES) for PyTorch training loops.\n\n"
            "commands:\n"
            "  demo        train a small network with full, uniform and ES sampling and compare them\n"
            "              (a few minutes on a laptop's CPU; es-kernels demo --help for the options)\n"
            "  estimate    time what ES costs on a model, against full training and uniform sampling\n"
            "              (es-kernels estimate --help)\n\n"
            "options:\n"
            "  -h, --help     this message\n"
            "  -V, --version  the installed version"
        )
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ._version import __version__

        print(f"es-kernels {__version__}")
        return 0
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[0] == "estimate":
        from .estimate import main as estimate_main

        return estimate_main(argv[1:])
    print(f"es-kernels: unknown command {argv[0]!r}; try: es-kernels demo, es-kernels estimate", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
