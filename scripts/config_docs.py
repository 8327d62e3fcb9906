"""Regenerate docs/config.md from the field docstrings in imgcls/config.py."""
from pathlib import Path

from imgcls.config import reference_markdown

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    path.write_text(reference_markdown())
    print(f"wrote {path}")
