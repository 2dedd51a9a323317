"""load -> save keeps every model's meaning: the onnx wheel's models and node tests.

For each model: the saved model passes `check_model(full_check=True)` whenever the original
does, and onnxruntime gives identical outputs for both wherever it can run the original.
benchmarks/roundtrip_counts.py prints the same check as counts.
"""

from __future__ import annotations

import pytest

from graphopt.verify import CorpusModel, roundtrip, wheel_file_models, wheel_node_models

FILE_MODELS = wheel_file_models()
NODE_MODELS = wheel_node_models()


def check(entry: CorpusModel) -> None:
    outcome = roundtrip(entry.load(), entry.feeds_for)
    assert outcome.ok, outcome.problem


@pytest.mark.parametrize("entry", FILE_MODELS, ids=[m.name for m in FILE_MODELS])
def test_roundtrip_shipped_model(entry: CorpusModel) -> None:
    check(entry)


@pytest.mark.parametrize("entry", NODE_MODELS, ids=[m.name for m in NODE_MODELS])
def test_roundtrip_node_model(entry: CorpusModel) -> None:
    check(entry)


def test_collections_are_not_empty() -> None:
    assert len(FILE_MODELS) > 100 and len(NODE_MODELS) > 1500
