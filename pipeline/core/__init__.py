"""The domain core: records, splits, prompts, explainers and simulators, scores, ablation, detection and fuzzing.

Free of Dagster, the warehouse and HTTP clients (tests/test_layering.py holds it to that); `pipeline.infra`
and `assets` build on it.
"""
