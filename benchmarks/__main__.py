"""Command line: ``python -m benchmarks [--quick] | ops ... | plot FILE... | readme FILE...``.

    python -m benchmarks --quick              every benchmark, quick sizes (what `make bench` runs)
    python -m benchmarks ops                  the full ops benchmark on the default device
    python -m benchmarks ops --quick --sizes 2^10,2^12 --out /tmp/b
    python -m benchmarks plot benchmarks/results/ops-cpu-amd-epyc.json
    python -m benchmarks readme benchmarks/results/ops-cpu-amd-epyc.json > performance.md
"""

import argparse
import sys

from . import bench_depth, bench_jacobian, bench_memory, bench_ops, bench_overhead, common

# Every benchmark module: NAME, add_arguments(parser), run(args) -> path of the JSON it wrote.
BENCHMARKS = {bench_ops.NAME: bench_ops, bench_jacobian.NAME: bench_jacobian, bench_depth.NAME: bench_depth,
              bench_memory.NAME: bench_memory, bench_overhead.NAME: bench_overhead}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a few sizes and short timings: under 2 minutes on a 2-core CPU")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when visible, else cpu)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"directory for the JSON and PNG files (default: {common.RESULTS_DIR})")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON and table only")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice, usually one per core)")


def _benchmark_parser(module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {module.NAME}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser)
    parser.add_argument("--output", default=None, metavar="FILE", help="exact path of the JSON file")
    module.add_arguments(parser)
    return parser


def _files_parser(name: str, what: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=what)
    parser.add_argument("files", nargs="+", metavar="FILE", help="result JSON files written by a benchmark")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        if command in BENCHMARKS:
            module = BENCHMARKS[command]
            module.run(_benchmark_parser(module).parse_args(argv[1:]))
        elif command == "plot":
            from . import plots

            plots.main(_files_parser("plot", "Redraw the PNGs of result files.").parse_args(argv[1:]).files)
        elif command == "readme":
            from . import readme

            files = _files_parser("readme", "Print the README's Performance section.").parse_args(argv[1:]).files
            print(readme.markdown(files), end="")
        elif command is None:
            top = argparse.ArgumentParser(
                prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"benchmarks: {', '.join(BENCHMARKS)}; also: plot, readme. "
                       "`python -m benchmarks NAME --help` lists a benchmark's own options.")
            _add_common(top)
            top.parse_args(argv)  # only the common options are accepted here
            for module in BENCHMARKS.values():
                module.run(_benchmark_parser(module).parse_args(argv))
        else:
            known = ", ".join([*BENCHMARKS, "plot", "readme"])
            raise ValueError(f"unknown command {command!r}; expected one of {known} or options only (see --help)")
    except (ValueError, FileNotFoundError) as exc:
        print(f"python -m benchmarks: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
