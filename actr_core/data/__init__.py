"""Data: benchmark readers over fsspec, synthetic pairs, samples with ground-truth flow, shards, loading.

See ``docs/data.md``. The batch schema lives in :mod:`actr_core.data.schema`.
"""
