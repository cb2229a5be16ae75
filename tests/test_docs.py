"""The docs stay true: the API example runs as written."""
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.slow  # the API example end to end: trains and evaluates
def test_api_example_runs_as_written():
    text = (DOCS / "api.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "docs/api.md", "exec"), {})
