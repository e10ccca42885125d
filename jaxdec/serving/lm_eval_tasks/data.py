"""Datasets of the local lm-eval tasks: JSONL files next to this module, read without `datasets.load_dataset`
(no download, no cache). The task YAMLs name it as ``custom_dataset: !function data.load``."""
import json
import os


def load(data_file: str, split: str = "test", **_metadata):
    """A `datasets.DatasetDict` with one split holding the rows of ``data_file`` (relative to this folder)."""
    import datasets

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), data_file)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
