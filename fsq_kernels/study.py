"""The FSQ vs VQ codebook study; it lives in fsq_kernels/train/study.py (``fsq-train study``).
This module keeps ``python -m fsq_kernels.study`` and ``from fsq_kernels.study import ...`` working."""

import sys

from .train.study import (  # noqa: F401
    CSV_COLUMNS, DEFAULT, PAPER_LEVELS, QUICK, StudySettings, evaluate_codebook, main, run_study, study_config,
    train_and_evaluate,
)

if __name__ == "__main__":
    sys.exit(main())
