"""Evaluation on M2E2: the pure scorer (:mod:`rmpl_ds.evaluate.m2e2`) and the reports (:mod:`rmpl_ds.evaluate.report`).

Nothing is imported here, so that ``rmpl-ds score --help`` does not load matplotlib or torch.
"""
