"""`python -m app.benchmark SWEEP_DIR`: gather a selection-benchmark sweep again (finished, still
running, or partly failed) into benchmark.csv, benchmark.md and learning_curve.png, and print the
table. Exits 2 with one line when SWEEP_DIR holds no sweep."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from app.errors import UserError, print_user_error


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory `thresher -m` wrote "
                                                      "(<work_dir>/multirun/<stamp>_<note>)")
    parser.add_argument("--no-plot", action="store_true", help="write the CSV and the table only")
    args = parser.parse_args(argv)
    from app.benchmark.aggregate import aggregate

    try:
        benchmark = aggregate(args.sweep_dir, plot=not args.no_plot)
    except UserError as error:
        print_user_error(error)
        return 2
    print(benchmark.markdown)
    print(f"wrote {', '.join(str(path) for path in benchmark.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
