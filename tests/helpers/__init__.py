"""What the tests share, as a package (tests/ is on pytest's pythonpath; see pyproject.toml).

    op_cases       the float ops' cases, tolerances and float64 expectations
    exact_cases    exact mode's input generators and checks
    solver_cases   gradient oracles, saved-tensor counting, training loops for the solver tests
    bench_cases    running benchmark CLIs in process
    cuda_cases     nvcc host programs, compute-sanitizer, stream checks
    backends       which backends the parametrized op tests run on, and on which device

ROOT is the repository root.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
