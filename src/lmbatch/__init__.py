"""lmbatch: offline batch inference for LLMs.

Where each import path lives (pyproject.toml, [tool.setuptools.package-dir]):

    lmbatch           src/lmbatch/   process setup (openmp) and test/demo assets (testing)
    lmbatch.engine    engine/        the continuous-batching engine; needs torch and transformers only
    lmbatch.io        io/            datasets on storage <-> engine requests, outputs, run database
    lmbatch.flows     flows/         the Prefect flow, its config and the CLI

The top package sits under src/ so that a checkout's root never shadows an installed lmbatch:
`python -c "import lmbatch.engine"` run from the root works with a normal install too.
Data flows one way: flows -> io -> engine. The design is in docs/design.md.
"""

__version__ = "0.1.0"
