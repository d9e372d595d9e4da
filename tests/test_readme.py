"""The README's kernel example runs as written (the README stays true)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md lost its python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["out"].shape == namespace["q"].shape
    assert namespace["pooled"].shape == (4, 3, 256)
    assert namespace["visible"].shape == (4, 49, 768)
    assert namespace["mask"].sum(1).eq(147).all()
    assert namespace["maps"].sum() > 0
